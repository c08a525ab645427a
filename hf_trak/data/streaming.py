"""A streamed split (``load_dataset(..., streaming=True)``) read once into Arrow files on disk.

TRAK needs a fixed, countable row order: the store's shards, row hashes and scores are
indexed by row. A ``datasets.IterableDataset`` is therefore read once, in order, into
``folder``: rows [s·c, (s+1)·c) go to ``rows-<start>-<stop>.arrow`` (c = ``chunk_size``),
each file written under a temporary name and renamed when complete, then
``spool.json`` records the position reached and the stream's ``state_dict()`` there.
The result is a memory-mapped ``datasets.Dataset`` of those files: no row is held in
memory, and everything downstream (checks, hashes, featurize, top-k, reports) reads it
as it reads any split, so its scores are those of the same rows materialized.

A run killed part-way resumes by position: the stream is restored to the recorded state
(``IterableDataset.load_state_dict``) and reading goes on from the first row not in a
complete file. The stream must yield the same rows in the same order (no shuffle
buffer): its first row and number of shards are checked against the stored ones, and
another stream is refused with the fix named (``overwrite=True`` replaces it). A complete
spool of the same stream is read back as it is, with or without ``overwrite`` (which, passed
on by ``featurize``, is about the features): rows added to the source since are not seen;
delete the folder to read the stream again.
"""

import json
import logging
import os
import re
import shutil
from typing import List, Optional

from hf_trak.errors import InvalidArgumentError, InvalidInputError, OutputExistsError
from hf_trak.store.files import atomic_write, write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "spool.json"
CHUNK_PATTERN = re.compile(r"rows-(\d+)-(\d+)\.arrow$")


def is_stream(data) -> bool:
    """Whether ``data`` is a ``datasets.IterableDataset`` (a streamed split)."""
    from datasets import IterableDataset

    return isinstance(data, IterableDataset)


def spooled(data, stream_dir: Optional[str], save_dir: Optional[str], split: str, state, overwrite: bool = False):
    """``data`` itself, or for a stream its rows spooled into ``<stream_dir>/<split>`` (default stream_dir:
    ``<save_dir>-rows``), by the main process first: the others then read the complete spool back."""
    if not is_stream(data):
        return data
    base = stream_dir or (save_dir.rstrip("/" + os.sep) + "-rows" if save_dir else None)
    if base is None:
        raise InvalidArgumentError(
            f"The {split} split is a stream: it is read once into Arrow files on disk, which need a place. Pass "
            "save_dir (its rows go to <save_dir>-rows) or stream_dir (hf-trak: --save-dir or --stream-dir)."
        )
    with state.main_process_first():
        return spool_stream(data, os.path.join(base, split), overwrite=overwrite)


def _first_row_hash(stream) -> Optional[int]:
    from hf_trak.data.inputs import row_hash

    for row in stream:
        return row_hash(row)
    return None


def _chunk_files(folder: str) -> List[str]:
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHUNK_PATTERN.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found)]


def _write_chunk(path: str, rows: list, features) -> None:
    from datasets.arrow_writer import ArrowWriter

    def write(tmp):
        with ArrowWriter(features=features, path=tmp) as writer:
            for row in rows:
                writer.write(row)
            writer.finalize()

    atomic_write(path, write)


def _read(files: List[str]):
    from datasets import Dataset, concatenate_datasets

    return concatenate_datasets([Dataset.from_file(path) for path in files])


def spool_stream(stream, folder: str, chunk_size: int = 10_000, overwrite: bool = False):
    """The rows of ``stream`` (an ``IterableDataset``) as a memory-mapped ``Dataset`` kept in ``folder``;
    a complete spool of the same stream is read back, a partial one resumed (see the module docstring).
    ``overwrite``: replace the rows of another stream that ``folder`` holds."""
    if not is_stream(stream):
        raise InvalidArgumentError(f"spool_stream takes a datasets.IterableDataset, got {type(stream).__name__}.")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise InvalidArgumentError(f"chunk_size must be a positive number of rows, got {chunk_size!r}.")
    first = _first_row_hash(stream)
    if first is None:
        raise InvalidInputError("The stream yields no rows: there are no examples to featurize.")
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    manifest = {"first_row_hash": first, "num_shards": stream.n_shards, "chunk_size": chunk_size, "rows": 0,
                "state": None, "complete": False}  # fmt: skip
    if os.path.isfile(manifest_path):
        with open(manifest_path) as file:
            stored = json.load(file)
        same = all(stored.get(key) == manifest[key] for key in ("first_row_hash", "num_shards", "chunk_size"))
        if same:
            manifest = stored
        elif overwrite:
            shutil.rmtree(folder)
        else:
            raise OutputExistsError(
                f"{folder} holds the rows of another stream (its first row, number of shards or chunk size "
                "differs). Pass the stream it was made from, another folder, or overwrite=True to replace them."
            )
    os.makedirs(folder, exist_ok=True)
    files = [path for path in _chunk_files(folder) if _stop(path) <= manifest["rows"]]
    for path in set(_chunk_files(folder)) - set(files):  # written after the last record: redone
        os.remove(path)
    if manifest["complete"]:
        return _read(files)
    if manifest["state"] is not None:
        logger.info("Resuming the stream into %s at row %d.", folder, manifest["rows"])
        stream.load_state_dict(manifest["state"])
    features = _read(files[:1]).features if files else stream.features  # every file has the first one's
    rows, start = [], manifest["rows"]
    for row in stream:
        rows.append(row)
        if len(rows) == chunk_size:
            features = _keep_chunk(folder, manifest, stream, rows, start, features)
            start, rows = start + chunk_size, []
    if rows:
        features = _keep_chunk(folder, manifest, stream, rows, start, features)
    manifest["complete"] = True
    write_text(manifest_path, json.dumps(manifest))
    return _read(_chunk_files(folder))


def _stop(path: str) -> int:
    return int(CHUNK_PATTERN.search(path).group(2))


def _keep_chunk(folder: str, manifest: dict, stream, rows: list, start: int, features):
    """Write rows [start, start + len(rows)) and record the position and the stream's state after them;
    returns the features of the files (inferred from the first one when the stream declares none)."""
    path = os.path.join(folder, f"rows-{start:012d}-{start + len(rows):012d}.arrow")
    _write_chunk(path, rows, features)
    manifest.update(rows=start + len(rows), state=stream.state_dict())
    write_text(os.path.join(folder, MANIFEST_NAME), json.dumps(manifest))
    return features if features is not None else _read([path]).features
