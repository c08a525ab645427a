"""Nothing is lost, nothing is overwritten.

Outputs that exist are refused before any work unless ``--overwrite``; an output that
cannot be written is named before any work; files appear complete or not at all, with the
umask's permissions; a failed push names its cause in one line and leaves the store as it was.
"""

import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import DatasetDict

from hf_trak import TRAKer
from hf_trak.cli import main
from hf_trak.errors import OutputExistsError
from hf_trak.store.files import FILE_MODE, atomic_write
from hf_trak.testing.datasets import digits, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_vit, word_tokenizer
from hf_trak.testing.processes import subprocess_env
from tests.hub_server import HubServer


def raw_text(n, seed=0):
    return token_sequences(n, seed=seed).select_columns(["text", "labels"]).rename_column("labels", "label")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model folder, a save_to_disk DatasetDict of raw text and a feature store made from them."""
    root = tmp_path_factory.mktemp("workspace")
    tiny_bert().save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    DatasetDict(train=raw_text(16), test=raw_text(3, seed=1)).save_to_disk(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["featurize", "--model", "model", "--dataset", "data", "--save-dir", "feats", "--proj-dim", "16"])
    except SystemExit as done:
        assert done.code in (0, None)
    finally:
        os.chdir(cwd)
    return root


def cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr()


def digest(folder) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


def test_score_refuses_existing_outputs_before_any_work_and_overwrites_on_request(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    score = ["score", "--save-dir", "feats", "--dataset", "data"]
    assert cli([*score, "--output", "s.npy"], capsys)[0] == 0
    first = np.load("s.npy")
    store_before = digest("feats")
    np.save("s.npy", np.zeros(3))
    code, out = cli([*score, "--output", "s.npy", "--name", "other"], capsys)
    assert (
        code == 1
        and out.err == "hf-trak: error: s.npy exists: choose another --output, or pass --overwrite to replace it.\n"
    )
    assert "Featurizing" not in out.err and digest("feats") == store_before  # refused before any work
    np.testing.assert_array_equal(np.load("s.npy"), np.zeros(3))
    code, out = cli([*score, "--output", "t.npy"], capsys)  # the store already holds scores named "test"
    assert code == 1 and "feats/scores/test.arrow exists" in out.err and not os.path.exists("t.npy")
    assert cli([*score, "--output", "s.npy", "--overwrite"], capsys)[0] == 0
    np.testing.assert_array_equal(np.load("s.npy"), first)


def test_top_k_and_report_refuse_existing_outputs_before_any_work(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    top_k = ["top-k", "--save-dir", "feats", "--dataset", "data", "--k", "2"]
    os.makedirs("taken", exist_ok=True)
    code, out = cli([*top_k, "--output", "taken"], capsys)
    assert code == 1 and "taken exists" in out.err and os.listdir("taken") == []
    open("r.html", "w").write("mine")
    code, out = cli([*top_k, "--output", "top", "--report", "r.html"], capsys)
    assert code == 1 and "r.html exists" in out.err and not os.path.exists("top")
    assert open("r.html").read() == "mine"
    assert cli([*top_k, "--output", "top", "--report", "r2.html"], capsys)[0] == 0
    code, out = cli(["report", "--top-k", "top", "--output", "r.html"], capsys)
    assert code == 1 and open("r.html").read() == "mine"
    assert cli(["report", "--top-k", "top", "--output", "r.html", "--overwrite"], capsys)[0] == 0
    assert open("r.html").read() == open("r2.html").read()
    assert cli([*top_k, "--output", "top", "--overwrite"], capsys)[0] == 0 and not any(
        name.startswith(".top") for name in os.listdir(".")
    )


def test_an_unwritable_output_is_named_before_any_work(workspace, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    code, out = cli(["score", "--save-dir", "feats", "--dataset", "data", "--output", "missing/s.npy"], capsys)
    assert code == 1 and "the folder" in out.err and "missing does not exist" in out.err
    store = tmp_path / "store"
    TRAKer(tiny_vit(), proj_dim=8, save_dir=str(store)).featurize(digits(4), [tiny_vit().state_dict()])
    (store / "scores").write_text("a file where the scores folder goes")  # the store cannot take scores
    code, out = cli(["score", "--save-dir", str(store), "--dataset", "data", "--no-processor"], capsys)
    assert code == 1 and "Cannot write scores into" in out.err and "--output" in out.err
    if os.geteuid() != 0:  # root writes through read-only permissions
        os.remove(store / "scores")
        os.chmod(store, 0o555)
        try:
            code, out = cli(["score", "--save-dir", str(store), "--dataset", "data", "--no-processor"], capsys)
            assert code == 1 and "Cannot write scores into" in out.err
        finally:
            os.chmod(store, 0o755)


def test_the_api_keeps_saved_scores_unless_asked(tmp_path):
    model = tiny_vit()
    traker = TRAKer(model, proj_dim=8, save_dir=str(tmp_path / "s")).featurize(digits(6), [model.state_dict()])
    traker.save_scores(np.ones((6, 2)), "mine")
    with pytest.raises(OutputExistsError, match="mine.arrow exists"):
        traker.save_scores(np.zeros((6, 2)), "mine")
    np.testing.assert_array_equal(traker.store.load_scores("mine"), np.ones((6, 2)))
    traker.save_scores(np.zeros((6, 2)), "mine", overwrite=True)
    np.testing.assert_array_equal(traker.store.load_scores("mine"), np.zeros((6, 2)))


def test_store_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        model = tiny_vit()
        traker = TRAKer(model, proj_dim=8, save_dir=str(tmp_path / "s")).featurize(digits(6), [model.state_dict()])
        modes = {
            os.path.relpath(os.path.join(d, f), traker.save_dir): os.stat(os.path.join(d, f)).st_mode & 0o777
            for d, _, files in os.walk(traker.save_dir)
            for f in files
        }
    finally:
        os.umask(old)
    assert modes["checkpoint-0/kernel.safetensors"] == FILE_MODE == 0o644
    assert set(modes.values()) == {0o644}, modes


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def failing(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), failing)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_failed_push_names_the_cause_in_one_line_and_changes_nothing(tmp_path):
    model = tiny_bert()
    store = str(tmp_path / "store")
    TRAKer(model, proj_dim=8, save_dir=store, dtype=torch.float32).featurize(token_sequences(6), [model.state_dict()])
    before = digest(store)
    push = [sys.executable, "-m", "hf_trak.cli", "push", "--save-dir", store, "--repo-id", "me/feats"]
    offline = subprocess_env(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_DISABLE_XET="1",
                             HF_TOKEN="hf_x", HF_HOME=str(tmp_path / "home"))  # fmt: skip
    done = subprocess.run(push, env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"hf-trak: error: Pushing {store} to me/feats failed: the Hub at http://127.0.0.1:")
    assert "cannot be reached" in done.stderr
    assert digest(store) == before
    with HubServer(write_token="hf_right") as hub:
        env = dict(hub.client_env(tmp_path / "home2"), HF_TOKEN="hf_wrong")
        done = subprocess.run(push, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "the Hub refused the token (HTTP 401)" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and digest(store) == before
        done = subprocess.run([*push, "--token", "hf_right"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "me/feats" in open(os.path.join(store, "README.md")).read()  # the card names the repo once pushed
