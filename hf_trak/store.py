"""The feature store: TRAK features as a self-describing folder of Arrow shards.

Layout (also a Hugging Face dataset repo; ``load_dataset(path, "checkpoint-0")`` works)::

    trak_config.json                        TRAKConfig: model, task, projection, parameters, train set
    README.md                               dataset card (model_cards/trak_features_card.md)
    checkpoint-<m>/features-<start>-<stop>.arrow   rows [start, stop): index (int64),
                                            features (fixed-size list of float16/32: x_i = P_mᵀg_i/√p),
                                            out_to_loss (float32: Q_i)
    checkpoint-<m>/kernel.safetensors       xtx (k × k), kernel K_m = (XtX + λI)⁻¹/mean|·| (k × k), lambda_reg
    scores/<name>.arrow                     target_index (int64), scores (fixed-size list of float32, n)

Shards cover fixed row ranges ``[s·shard_size, (s+1)·shard_size)``, so any process can
write any shard and a run can resume by skipping complete ones. A shard is written to a
hidden temporary file and renamed, so it is only visible once complete. Arrow IPC files
are read memory-mapped, zero-copy, into numpy. Nothing is pickled.
"""

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, TRAKConfig

logger = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"features-(\d+)-(\d+)\.arrow$")
KERNEL_NAME = "kernel.safetensors"


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)``, then rename to ``path``: readers never see a partial file."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _read_table(path: str) -> pa.Table:
    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only (memory-mapped) numpy array; it is never written to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def fixed_size_list_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """(rows, k) numpy view of a fixed-size-list column (zero-copy for a single chunk)."""
    chunks = [chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), -1) for chunk in column.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def write_arrow(path: str, columns: Dict[str, pa.Array]) -> None:
    """Write one record batch of ``columns`` as an Arrow IPC file, atomically."""
    table = pa.table(columns)

    def write(tmp):
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    _atomic_write(path, write)


def fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


class FeatureStore:
    """A featurization on disk under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str, config: TRAKConfig, temporary: Optional[tempfile.TemporaryDirectory] = None):
        self.root, self.config = root, config
        self._temporary = temporary  # a store in a temporary folder keeps it alive as long as itself

    # ------------------------------------------------------------ open/create
    @classmethod
    def load(cls, root: str) -> "FeatureStore":
        path = os.path.join(root, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{root} holds no TRAK features ({CONFIG_NAME} is missing).")
        with open(path) as file:
            return cls(root, TRAKConfig.from_json_string(file.read()))

    @classmethod
    def validate(cls, root: Optional[str], config: TRAKConfig, overwrite: bool = False) -> Optional[List[str]]:
        """How the store at ``root`` differs from ``config`` for resuming (None: there is no store).

        Raises, writing nothing, if it differs and ``overwrite`` is False.
        """
        if root is None or not os.path.isfile(os.path.join(root, CONFIG_NAME)):
            return None
        mismatches = cls.load(root).config.mismatches(config, resume=True)
        if mismatches and not overwrite:
            raise FileExistsError(
                f"{root} holds features made with other settings ({'; '.join(mismatches)}). Choose another "
                "save_dir, or pass overwrite=True to delete them."
            )
        return mismatches

    @classmethod
    def create_or_resume(cls, root: Optional[str], config: TRAKConfig, overwrite: bool = False) -> "FeatureStore":
        """The store at ``root`` for ``config``: new, resumed (same config), or replaced if ``overwrite``.

        ``root=None`` makes a store in a temporary folder, deleted with the store.
        """
        if root is None:
            temporary = tempfile.TemporaryDirectory(prefix="hf_trak-")
            _atomic_write(
                os.path.join(temporary.name, CONFIG_NAME), lambda tmp: _write_text(tmp, config.to_json_string())
            )
            return cls(temporary.name, config, temporary)
        mismatches = cls.validate(root, config, overwrite)
        if mismatches == []:
            logger.info("Resuming the featurization in %s.", root)
            return cls.load(root)
        if mismatches:
            logger.warning("Deleting the features in %s (overwrite=True).", root)
            shutil.rmtree(root)
        os.makedirs(root, exist_ok=True)
        _atomic_write(os.path.join(root, CONFIG_NAME), lambda tmp: _write_text(tmp, config.to_json_string()))
        return cls(root, config)

    def checkpoint_dir(self, model_id: int) -> str:
        return os.path.join(self.root, f"checkpoint-{model_id}")

    # ----------------------------------------------------------------- shards
    def shard_ranges(self) -> List[Tuple[int, int]]:
        n, size = self.config.num_train_examples, self.config.shard_size
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def shard_path(self, model_id: int, start: int, stop: int) -> str:
        return os.path.join(self.checkpoint_dir(model_id), f"features-{start:09d}-{stop:09d}.arrow")

    def has_shard(self, model_id: int, start: int, stop: int) -> bool:
        return os.path.isfile(self.shard_path(model_id, start, stop))

    def write_shard(self, model_id: int, start: int, features: np.ndarray, out_to_loss: np.ndarray) -> None:
        """Rows ``[start, start + len(features))`` of checkpoint ``model_id``."""
        stop = start + len(features)
        os.makedirs(self.checkpoint_dir(model_id), exist_ok=True)
        write_arrow(
            self.shard_path(model_id, start, stop),
            {
                "index": pa.array(np.arange(start, stop, dtype=np.int64)),
                "features": fixed_size_list(features),
                "out_to_loss": pa.array(np.asarray(out_to_loss, dtype=np.float32)),
            },
        )

    def shard(self, model_id: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(features (rows, k) zero-copy view, out_to_loss (rows,))`` of rows ``[start, stop)``."""
        path = self.shard_path(model_id, start, stop)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Shard {path} is missing: run featurize again to complete the store.")
        table = _read_table(path)
        return fixed_size_list_to_numpy(table.column("features")), table.column("out_to_loss").to_numpy()

    def shards(self, model_id: int) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """``(start, features, out_to_loss)`` of every shard, in row order."""
        for start, stop in self.shard_ranges():
            yield (start, *self.shard(model_id, start, stop))

    def out_to_loss(self, model_id: int) -> np.ndarray:
        return np.concatenate([q for _, _, q in self.shards(model_id)])

    def features(self, model_id: int) -> np.ndarray:
        """All train features of a checkpoint in memory, (n, k) (a copy; ``shards`` streams them)."""
        return np.concatenate([features for _, features, _ in self.shards(model_id)])

    # ----------------------------------------------------------------- kernel
    def has_kernel(self, model_id: int) -> bool:
        return os.path.isfile(os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME))

    def save_kernel(self, model_id: int, xtx: torch.Tensor, kernel: torch.Tensor, lambda_reg: float) -> None:
        tensors = {
            "xtx": xtx.contiguous(),
            "kernel": kernel.contiguous(),
            "lambda_reg": torch.tensor(lambda_reg, dtype=torch.float64),
        }
        path = os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME)
        _atomic_write(path, lambda tmp: save_file(tensors, tmp))

    def load_kernel(self, model_id: int) -> Dict[str, torch.Tensor]:
        path = os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the featurization of checkpoint {model_id} did not finish.")
        return load_file(path)

    def is_complete(self) -> bool:
        return all(self.config.checkpoint_fingerprints) and all(
            self.has_kernel(m) for m in range(self.config.num_checkpoints)
        )

    def record_checkpoint(self, model_id: int, fingerprint: str, base_fingerprint: Optional[str] = None) -> None:
        """Record the weights' fingerprint of checkpoint ``model_id`` (and the base model's) in the config."""
        fingerprints = list(self.config.checkpoint_fingerprints)
        fingerprints[model_id] = fingerprint
        changes = {"checkpoint_fingerprints": fingerprints}
        if base_fingerprint is not None:
            changes["base_fingerprint"] = base_fingerprint
        self.config = dataclasses.replace(self.config, **changes)
        text = self.config.to_json_string()
        _atomic_write(os.path.join(self.root, CONFIG_NAME), lambda tmp: _write_text(tmp, text))

    # ----------------------------------------------------------------- scores
    def save_scores(self, name: str, scores: np.ndarray) -> str:
        """Write ``scores`` (n × m) as ``scores/<name>.arrow``, one row per target; returns the path."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"Scores name {name!r} must be letters, digits, '_', '.' or '-'.")
        os.makedirs(os.path.join(self.root, "scores"), exist_ok=True)
        path = os.path.join(self.root, "scores", f"{name}.arrow")
        write_arrow(
            path,
            {
                "target_index": pa.array(np.arange(scores.shape[1], dtype=np.int64)),
                "scores": fixed_size_list(np.asarray(scores, dtype=np.float32).T),
            },
        )
        return path

    def score_names(self) -> List[str]:
        directory = os.path.join(self.root, "scores")
        return (
            sorted(name[: -len(".arrow")] for name in os.listdir(directory) if name.endswith(".arrow"))
            if os.path.isdir(directory)
            else []
        )

    def load_scores(self, name: str) -> np.ndarray:
        """The (n × m) scores saved as ``name``."""
        table = _read_table(os.path.join(self.root, "scores", f"{name}.arrow"))
        return fixed_size_list_to_numpy(table.column("scores")).T
