"""Scores kept in a store: ``scores/<name>.arrow``, ``target_index`` and ``scores`` (one row per target, n float32
values), pushed with the features and loaded by name."""

import os
import re
from typing import List

import numpy as np
import pyarrow as pa

from hf_trak.errors import InvalidArgumentError, OutputExistsError
from hf_trak.store.arrow_files import fixed_size_list, fixed_size_list_to_numpy, read_table, write_arrow


def scores_path(root: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise InvalidArgumentError(f"Scores name {name!r} must be letters, digits, '_', '.' or '-'.")
    return os.path.join(root, "scores", f"{name}.arrow")


def save_scores(root: str, name: str, scores: np.ndarray, overwrite: bool = False) -> str:
    """Write ``scores`` (n × m) as ``scores/<name>.arrow`` in the store ``root``, one row per target; returns the
    path. Existing scores of that name are only replaced with ``overwrite``."""
    path = scores_path(root, name)
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: choose another name, or pass overwrite=True to replace it.")
    os.makedirs(os.path.join(root, "scores"), exist_ok=True)
    targets = pa.array(np.arange(scores.shape[1], dtype=np.int64))
    write_arrow(path, {"target_index": targets, "scores": fixed_size_list(np.asarray(scores, dtype=np.float32).T)})
    return path


def score_names(root: str) -> List[str]:
    directory = os.path.join(root, "scores")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(name[: -len(".arrow")] for name in names if name.endswith(".arrow"))


def load_scores(root: str, name: str) -> np.ndarray:
    """The (n × m) scores saved as ``name``."""
    return fixed_size_list_to_numpy(read_table(scores_path(root, name)).column("scores")).T
