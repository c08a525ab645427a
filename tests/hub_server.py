"""A loopback HTTP server speaking the parts of the Hugging Face Hub API that ``huggingface_hub``
and ``datasets`` use to push and load dataset repos, for tests without network.

Endpoints: repo create; README YAML validation; preupload; Git LFS batch + PUT upload; NDJSON commit; repo info
(``/api/datasets/<repo>[/revision/<rev>]``); tree listing; paths-info; ``resolve`` (GET and HEAD,
with ``Range``). One branch (``main``) per repo; any revision name or commit sha resolves to it.
Point the clients at it with ``HF_ENDPOINT=<server.url>`` and ``HF_HUB_DISABLE_XET=1``.
"""

import base64
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

logger = logging.getLogger(__name__)

LFS_SUFFIXES = (".arrow", ".safetensors", ".parquet")
REPO = r"(?P<repo>[^/]+/[^/]+?)"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubState:
    """Repos as ``{repo_id: {"files": {path: bytes}, "lfs": {path: sha256}, "sha": commit}}``, and LFS objects."""

    def __init__(self):
        self.repos, self.lfs_objects, self.lock = {}, {}, threading.Lock()
        self.requests = []  # (method, path) of every request, for assertions
        self.write_token = None  # if set, API writes (POST) without "Bearer <write_token>" get 401
        self.ranges = []  # (path, Range header) of every ranged download

    def entry(self, repo: dict, path: str) -> dict:
        content = repo["files"][path]
        entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
        if path in repo["lfs"]:
            entry["lfs"] = {"oid": repo["lfs"][path], "size": len(content), "pointerSize": 134}
        return entry

    @staticmethod
    def directories(repo: dict) -> set:
        return {"/".join(path.split("/")[:i]) for path in repo["files"] for i in range(1, path.count("/") + 1)}


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState = None

    def log_message(self, fmt, *args):  # keep test output quiet
        logger.debug(fmt, *args)

    # ---------------------------------------------------------------- helpers
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, body: bytes = b"", headers: dict = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _not_found(self, code: str = "EntryNotFound", message: str = "not found"):
        self._json(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str):
        return self.state.repos.get(repo_id)

    @property
    def base(self) -> str:
        return f"http://{self.headers['Host']}"

    # --------------------------------------------------------------- dispatch
    def _route(self, routes):
        self.state.requests.append((self.command, self.path))
        token = self.state.write_token
        if token and self.command == "POST" and self.headers.get("Authorization") != f"Bearer {token}":
            self._body()
            message = "Invalid credentials in Authorization header"
            return self._json(401, {"error": message}, {"X-Error-Message": message})
        path = urlparse(self.path).path
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                return handler(**{k: unquote(v) if v else v for k, v in match.groupdict().items()})
        logger.warning("hub_server: unhandled %s %s", self.command, self.path)
        self._not_found("RepoNotFound", f"unhandled {self.command} {path}")

    def do_GET(self):
        self._route(
            [
                (r"/api/agent-harnesses", lambda: self._json(200, {"standardEnvVars": [], "harnesses": {}})),
                (rf"/api/datasets/{REPO}(?:/revision/(?P<revision>[^/]+))?", self.repo_info),
                (rf"/api/datasets/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", self.tree),
                (rf"/datasets/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", self.resolve),
            ]
        )

    do_HEAD = do_GET

    def do_POST(self):
        self._route(
            [
                (r"/api/repos/create", self.create_repo),
                (r"/api/validate-yaml", self.validate_yaml),
                (rf"/api/datasets/{REPO}/preupload/(?P<revision>[^/]+)", self.preupload),
                (rf"/api/datasets/{REPO}/commit/(?P<revision>[^/]+)", self.commit),
                (rf"/api/datasets/{REPO}/paths-info/(?P<revision>[^/]+)", self.paths_info),
                (rf"/datasets/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            ]
        )

    def do_PUT(self):
        self._route([(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    # -------------------------------------------------------------- endpoints
    def create_repo(self):
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.base}/datasets/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this dataset repo", "url": url})
            self.state.repos[repo_id] = {"files": {}, "lfs": {}, "sha": uuid.uuid4().hex + "00000000"}
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self):
        """The README's YAML header must parse (the Hub checks much more)."""
        content = json.loads(self._body())["content"]
        header = re.match(r"---\n(.*?)\n---", content, re.S)
        try:
            yaml.safe_load(header.group(1) if header else "")
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": str(error)}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo, revision):
        if self._repo(repo) is None:
            return self._not_found("RepoNotFound")
        files = json.loads(self._body())["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000 else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        self._json(200, {"files": modes, "commitOid": self._repo(repo)["sha"]})

    def lfs_batch(self, repo):
        objects = []
        for obj in json.loads(self._body())["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                item["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_upload(self, oid):
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._json(400, {"error": "sha256 mismatch"})
        self.state.lfs_objects[oid] = content
        self._json(200, {})

    def commit(self, repo, revision):
        state = self._repo(repo)
        if state is None:
            return self._not_found("RepoNotFound")
        with self.state.lock:
            for line in self._body().decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    state["files"][value["path"]] = base64.b64decode(value["content"])
                    state["lfs"].pop(value["path"], None)
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.state.lfs_objects:
                        return self._json(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                    state["files"][value["path"]] = self.state.lfs_objects[value["oid"]]
                    state["lfs"][value["path"]] = value["oid"]
                elif item["key"] == "deletedFile":
                    state["files"].pop(value["path"], None)
                    state["lfs"].pop(value["path"], None)
            state["sha"] = uuid.uuid4().hex + "00000000"
        self._json(
            200,
            {
                "commitUrl": f"{self.base}/datasets/{repo}/commit/{state['sha']}",
                "commitOid": state["sha"],
                "success": True,
            },
        )

    def repo_info(self, repo, revision=None):
        state = self._repo(repo)
        if state is None:
            return self._not_found("RepoNotFound", f"Repository {repo} not found")
        siblings = [{"rfilename": path, **({"size": len(c)})} for path, c in sorted(state["files"].items())]
        self._json(
            200,
            {
                "id": repo,
                "_id": repo,
                "author": repo.split("/")[0],
                "sha": state["sha"],
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "cardData": {},
            },
        )

    def tree(self, repo, revision, path=None):
        state = self._repo(repo)
        if state is None:
            return self._not_found("RepoNotFound")
        prefix = (path or "").strip("/")
        recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        under = (lambda p: p.startswith(prefix + "/")) if prefix else (lambda p: True)
        depth = prefix.count("/") + 1 if prefix else 0
        entries = [
            self.state.entry(state, p)
            for p in sorted(state["files"])
            if under(p) and (recursive or p.count("/") == depth)
        ]
        entries += [
            {"type": "directory", "path": d, "oid": git_blob_sha1(d.encode()), "size": 0}
            for d in sorted(HubState.directories(state))
            if under(d) and (recursive or d.count("/") == depth)
        ]
        if prefix and not entries and prefix not in state["files"]:
            return self._not_found("EntryNotFound", f"{prefix} does not exist")
        self._json(200, entries)

    def paths_info(self, repo, revision):
        state = self._repo(repo)
        if state is None:
            return self._not_found("RepoNotFound")
        body = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        directories = HubState.directories(state)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in state["files"]:
                entries.append(self.state.entry(state, path))
            elif path in directories or path == "":
                entries.append({"type": "directory", "path": path, "oid": git_blob_sha1(path.encode()), "size": 0})
        self._json(200, entries)

    def resolve(self, repo, revision, path):
        state = self._repo(repo)
        if state is None:
            return self._not_found("RepoNotFound", f"Repository {repo} not found")
        if path not in state["files"]:
            return self._not_found("EntryNotFound", f"{path} does not exist")
        content = state["files"][path]
        etag = state["lfs"].get(path) or git_blob_sha1(content)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": state["sha"], "Accept-Ranges": "bytes"}
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range:
            self.state.ranges.append((path, self.headers["Range"]))
            start = int(byte_range.group(1))
            stop = int(byte_range.group(2)) + 1 if byte_range.group(2) else len(content)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(content)}"
            return self._send(206, content[start:stop], headers, "application/octet-stream")
        self._send(200, content, headers, "application/octet-stream")


class HubServer:
    """``with HubServer() as hub: ...`` serves on a free loopback port at ``hub.url`` until the block ends."""

    def __init__(self, write_token: str = None):
        self.state = HubState()
        self.state.write_token = write_token
        handler = type("Handler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def client_env(self, home) -> dict:
        """The environment of a process whose huggingface_hub and datasets clients use this Hub, caching in
        ``home`` (empty for a clean cache)."""
        from hf_trak.testing.processes import subprocess_env

        return subprocess_env(
            HF_ENDPOINT=self.url,
            HF_HUB_DISABLE_XET="1",
            HF_TOKEN="hf_test_token",
            HF_HOME=str(home),
            HF_DATASETS_CACHE=os.path.join(str(home), "datasets"),
        )

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
