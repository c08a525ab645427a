"""The feature store: TRAK features as a self-describing folder of Arrow shards.

It is also a Hugging Face dataset repo (``load_dataset(path, "checkpoint-0")`` works); its files are
listed in the docs (``docs/store_format.md``): ``trak_config.json``, ``train_rows.arrow``, the card,
and per checkpoint m the features X_m and Q_m (``checkpoint-<m>/features-<start>-<stop>.arrow``), Φ_m
(``preconditioned-...``), the kernel (``kernel.safetensors``), per-token statistics and principal factors;
saved scores in ``scores/`` (``hf_trak.store.saved_scores``).

Shards cover fixed row ranges ``[s·shard_size, (s+1)·shard_size)``, so any process can
write any shard and a run can resume by skipping complete ones. Every file is written to a
hidden temporary file and renamed (with the umask's permissions), so it is only visible once
complete. A shard records its row count and the CRC-32 of its columns in its schema
metadata: a resume redoes a shard that does not match (with a warning naming it) and
scoring refuses it (``CorruptStoreError``). Arrow IPC files are read memory-mapped,
zero-copy, into numpy. Nothing is pickled.
"""

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from hf_trak.errors import (
    CorruptStoreError,
    IncompleteStoreError,
    NotFoundError,
    OutputExistsError,
    StoreMismatchError,
)
from hf_trak.store import saved_scores
from hf_trak.store.arrow_files import (
    checksum,
    fixed_size_list,
    fixed_size_list_to_numpy,
    load_safetensors,
    read_table,
    readable_or_removed,
    save_safetensors,
    write_arrow,
)
from hf_trak.store.config import CONFIG_NAME, TRAKConfig
from hf_trak.store.files import write_text
from hf_trak.store.kernel_file import KERNEL_NAME, Matrix, converted, load_kernel_file, save_kernel_file
from hf_trak.store.lock import LOCK_NAME
from hf_trak.store.versions import keeps_kernel_blocks, stores_preconditioned

logger = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"(features|preconditioned)-(\d+)-(\d+)\.arrow$")
PRINCIPAL_FACTORS_NAME = "principal-factors.safetensors"
ROW_HASHES_NAME = "train_rows.arrow"
ROWS_KEY, CHECKSUM_KEY = b"hf_trak.rows", b"hf_trak.crc32"
FEATURES, PRECONDITIONED = "features", "preconditioned"
COLUMNS = {FEATURES: "features", PRECONDITIONED: "phi"}


def shard_ranges(num_rows: int, shard_size: int) -> List[Tuple[int, int]]:
    """The fixed row ranges [s·shard_size, (s+1)·shard_size) ∩ [0, num_rows) of the shards."""
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def _clear(root: str) -> None:
    """Delete what ``root`` holds, but its lock (held by the featurization that replaces the store)."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name == LOCK_NAME:
            continue
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


class FeatureStore:
    """A featurization on disk under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str, config: TRAKConfig, temporary: Optional[tempfile.TemporaryDirectory] = None):
        self.root, self.config = root, config
        self._temporary = temporary  # a store in a temporary folder keeps it alive as long as itself
        # For repeated queries (the explorer, FeatureIndex): keep XᵀX_m and K_m in memory (2·k² float64 each).
        self.keep_kernels = False
        self._grams_and_kernels: Dict[int, Tuple[Tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------ open/create
    @classmethod
    def load(cls, root: str) -> "FeatureStore":
        path = os.path.join(root, CONFIG_NAME)
        if not os.path.isfile(path):
            raise NotFoundError(f"{root} holds no TRAK features ({CONFIG_NAME} is missing).")
        with open(path) as file:
            return cls(root, TRAKConfig.from_json_string(file.read(), root))

    @classmethod
    def validate(cls, root: Optional[str], config: TRAKConfig, overwrite: bool = False) -> Optional[List[str]]:
        """How the store at ``root`` differs from ``config`` for resuming (None: there is no store, or one
        holding no computed file yet, which a rerun simply replaces).

        Raises ``OutputExistsError``, writing nothing, if it differs and ``overwrite`` is False.
        """
        if root is None or not os.path.isfile(os.path.join(root, CONFIG_NAME)):
            return None
        mismatches = cls.load(root).config.mismatches(config, resume=True)
        if mismatches and not cls.holds_work(root):
            logger.info("Replacing the settings of %s, which holds no features yet.", root)
            return None
        if mismatches and not overwrite:
            raise OutputExistsError(
                f"{root} holds features made with other settings ({'; '.join(mismatches)}). Choose another "
                "save_dir, or pass overwrite=True to delete them."
            )
        return mismatches

    @staticmethod
    def holds_work(root: str) -> bool:
        """Whether ``root`` holds a shard, kernel or scores (anything computed)."""
        for _, _, names in os.walk(root):
            computed = [name for name in names if name == KERNEL_NAME or name.endswith(".arrow")]
            if any(not name.startswith(".") and name != ROW_HASHES_NAME for name in computed):
                return True
        return False

    @classmethod
    def create_or_resume(cls, root: Optional[str], config: TRAKConfig, overwrite: bool = False) -> "FeatureStore":
        """The store at ``root`` for ``config``: new, resumed (same config), or replaced if ``overwrite``.

        ``root=None`` makes a store in a temporary folder, deleted with the store.
        """
        if root is None:
            temporary = tempfile.TemporaryDirectory(prefix="hf_trak-")
            write_text(os.path.join(temporary.name, CONFIG_NAME), config.to_json_string())
            return cls(temporary.name, config, temporary)
        mismatches = cls.validate(root, config, overwrite)
        if mismatches == []:
            logger.info("Resuming the featurization in %s.", root)
            return cls.load(root)
        if mismatches:
            logger.warning("Deleting the features in %s (overwrite=True).", root)
            _clear(root)
        os.makedirs(root, exist_ok=True)
        write_text(os.path.join(root, CONFIG_NAME), config.to_json_string())
        return cls(root, config)

    def check_unchanged(self) -> None:
        """Refuse to read a store that was featurized again since it was loaded (its config changed)."""
        with open(os.path.join(self.root, CONFIG_NAME), encoding="utf-8") as file:
            on_disk = TRAKConfig.from_json_string(file.read(), self.root)
        if on_disk != self.config:
            raise StoreMismatchError(
                f"The features in {self.root} were featurized again since they were loaded: load them again "
                "(TRAKer.from_pretrained) to score against them."
            )

    def checkpoint_dir(self, model_id: int) -> str:
        return os.path.join(self.root, f"checkpoint-{model_id}")

    # ----------------------------------------------------------------- shards
    def shard_ranges(self) -> List[Tuple[int, int]]:
        return shard_ranges(self.config.num_train_examples, self.config.shard_size)

    def shard_path(self, model_id: int, start: int, stop: int, kind: str = FEATURES) -> str:
        """The file of rows [start, stop) of checkpoint ``model_id``: ``kind`` "features" (X, Q) or
        "preconditioned" (Φ = XK, Q)."""
        return os.path.join(self.checkpoint_dir(model_id), f"{kind}-{start:09d}-{stop:09d}.arrow")

    def has_shard(self, model_id: int, start: int, stop: int, kind: str = FEATURES) -> bool:
        return os.path.isfile(self.shard_path(model_id, start, stop, kind))

    def write_shard(
        self, model_id: int, start: int, features: np.ndarray, out_to_loss: np.ndarray, kind: str = FEATURES
    ) -> None:
        """Rows ``[start, start + len(features))`` of checkpoint ``model_id``, with their row count and CRC-32."""
        stop = start + len(features)
        features = np.ascontiguousarray(features)
        out_to_loss = np.asarray(out_to_loss, dtype=np.float32)
        os.makedirs(self.checkpoint_dir(model_id), exist_ok=True)
        write_arrow(
            self.shard_path(model_id, start, stop, kind),
            {
                "index": pa.array(np.arange(start, stop, dtype=np.int64)),
                COLUMNS[kind]: fixed_size_list(features),
                "out_to_loss": pa.array(out_to_loss),
            },
            metadata={ROWS_KEY: str(stop - start), CHECKSUM_KEY: str(checksum([features, out_to_loss]))},
        )

    def shard(
        self, model_id: int, start: int, stop: int, kind: str = FEATURES, verify: bool = True
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(features (rows, k) zero-copy view, out_to_loss (rows,))`` of rows ``[start, stop)`` (``kind``
        "preconditioned": Φ instead of X), checked against the row count recorded when it was written and,
        with ``verify``, its checksum (``CorruptStoreError`` names the file)."""
        path = self.shard_path(model_id, start, stop, kind)
        if not os.path.isfile(path):
            raise IncompleteStoreError(f"Shard {path} is missing: run featurize again to complete the store.")
        fix = "run featurize again with the same arguments to redo it"
        try:
            table = read_table(path)
            features = fixed_size_list_to_numpy(table.column(COLUMNS[kind]))
            out_to_loss = table.column("out_to_loss").to_numpy()
        except (pa.ArrowException, OSError, KeyError, ValueError) as error:
            raise CorruptStoreError(f"Shard {path} is corrupt ({error}): {fix}.") from error
        metadata = table.schema.metadata or {}
        if len(features) != stop - start or (ROWS_KEY in metadata and int(metadata[ROWS_KEY]) != stop - start):
            raise CorruptStoreError(f"Shard {path} holds {len(features)} rows, not {stop - start}: {fix}.")
        if verify and CHECKSUM_KEY in metadata and int(metadata[CHECKSUM_KEY]) != checksum([features, out_to_loss]):
            raise CorruptStoreError(f"Shard {path} does not match its checksum (altered after writing): {fix}.")
        return features, out_to_loss

    def has_valid_shard(self, model_id: int, start: int, stop: int, kind: str = FEATURES) -> bool:
        """Whether the shard exists and reads back as written (a corrupt one is reported and deleted)."""
        path = self.shard_path(model_id, start, stop, kind)
        return readable_or_removed(path, lambda: self.shard(model_id, start, stop, kind))

    def statistics_path(self, model_id: int, start: int, stop: int) -> str:
        return os.path.join(self.checkpoint_dir(model_id), f"kernel-statistics-{start:09d}-{stop:09d}.safetensors")

    def has_statistics(self, model_id: int, start: int, stop: int) -> bool:
        return os.path.isfile(self.statistics_path(model_id, start, stop))

    def write_statistics(self, model_id: int, start: int, stop: int, statistics: Dict[str, torch.Tensor]) -> None:
        """The kernel statistics of rows [start, stop) (``kernel_from`` "tokens", "mixed" or "ekfac"), by name."""
        os.makedirs(self.checkpoint_dir(model_id), exist_ok=True)
        save_safetensors(self.statistics_path(model_id, start, stop), statistics)

    def statistics(self, model_id: int, start: int, stop: int) -> Dict[str, torch.Tensor]:
        return load_safetensors(self.statistics_path(model_id, start, stop))

    def has_valid_statistics(self, model_id: int, start: int, stop: int) -> bool:
        """Whether the shard's kernel statistics exist and read (corrupt ones are reported and deleted)."""
        path = self.statistics_path(model_id, start, stop)
        return readable_or_removed(path, lambda: self.statistics(model_id, start, stop))

    def has_preconditioned(self, model_id: int) -> bool:
        """Whether Φ_m is stored for every shard (stores before version 3 hold none: scoring forms it)."""
        return all(self.has_shard(model_id, a, b, PRECONDITIONED) for a, b in self.shard_ranges())

    def verify(self) -> None:
        """Read every shard and kernel and check row counts and checksums (``CorruptStoreError`` names the
        first bad file)."""
        for model_id in range(self.config.num_checkpoints):
            self.load_kernel(model_id)
            if self.config.principal_share:
                self.principal_factors(model_id)
            for start, stop in self.shard_ranges():
                for kind in (FEATURES, PRECONDITIONED):
                    if kind == FEATURES or self.has_shard(model_id, start, stop, kind):
                        self.shard(model_id, start, stop, kind)

    def shards(self, model_id: int) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """``(start, features, out_to_loss)`` of every shard, in row order."""
        for start, stop in self.shard_ranges():
            yield (start, *self.shard(model_id, start, stop))

    def out_to_loss(self, model_id: int) -> np.ndarray:
        return np.concatenate([q for _, _, q in self.shards(model_id)])

    def features(self, model_id: int) -> np.ndarray:
        """All train features of a checkpoint in memory, (n, k) (a copy; ``shards`` streams them)."""
        return np.concatenate([features for _, features, _ in self.shards(model_id)])

    # ------------------------------------------------------- principal factors
    def principal_factors_path(self, model_id: int) -> str:
        return os.path.join(self.checkpoint_dir(model_id), PRINCIPAL_FACTORS_NAME)

    def has_principal_factors(self, model_id: int) -> bool:
        return os.path.isfile(self.principal_factors_path(model_id))

    def has_valid_principal_factors(self, model_id: int) -> bool:
        """Whether checkpoint m's principal factors exist and read (corrupt ones are reported and deleted)."""
        path = self.principal_factors_path(model_id)
        return readable_or_removed(path, lambda: self.principal_factors(model_id))

    def save_principal_factors(self, model_id: int, factors: Dict[str, torch.Tensor]) -> None:
        """The factored projector's principal factors of checkpoint m ({"<name>/<side>": d × k})."""
        os.makedirs(self.checkpoint_dir(model_id), exist_ok=True)
        save_safetensors(self.principal_factors_path(model_id), factors)

    def principal_factors(self, model_id: int) -> Dict[str, torch.Tensor]:
        path = self.principal_factors_path(model_id)
        if not os.path.isfile(path):
            raise IncompleteStoreError(
                f"{path} is missing: the featurization of checkpoint {model_id} did not finish."
            )
        return load_safetensors(path)

    # ----------------------------------------------------------------- kernel
    def has_kernel(self, model_id: int) -> bool:
        return os.path.isfile(os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME))

    def has_valid_kernel(self, model_id: int) -> bool:
        """Whether K_m exists and reads (a corrupt one is reported and deleted, to be redone)."""
        path = os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME)
        return readable_or_removed(path, lambda: self.load_kernel(model_id))

    def save_kernel(
        self, model_id: int, xtx: Matrix, kernel: Matrix, lambda_reg: float, phi_scale: torch.Tensor
    ) -> None:
        """K_m's file (``hf_trak.store.kernel_file``): XᵀX_m and K_m (k × k, or lists of their diagonal blocks) as
        k × k matrices, or as their diagonal blocks where ``keeps_kernel_blocks``."""
        lambda_reg = torch.tensor(lambda_reg, dtype=torch.float64)
        tensors = {"xtx": xtx, "kernel": kernel, "lambda_reg": lambda_reg, "phi_scale": phi_scale}
        blocks = self.config.kernel_blocks if self.keeps_kernel_blocks else ()
        save_kernel_file(os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME), tensors, blocks)

    @property
    def keeps_kernel_blocks(self) -> bool:
        """Whether K_m's file keeps XᵀX_m and K_m as their diagonal blocks: a block-diagonal K, version 7 on."""
        return bool(self.config.kernel_blocks) and keeps_kernel_blocks(self.config.store_version)

    def load_kernel(self, model_id: int, names: Optional[Sequence[str]] = None, as_blocks: bool = False) -> dict:
        """The tensors of K_m's file (only ``names`` of them, if given: a query needs the k-vector phi_scale,
        not the two k × k matrices); ``xtx`` and ``kernel`` as k × k matrices however the file keeps them, or, with
        ``as_blocks`` where ``keeps_kernel_blocks``, as the lists of their diagonal blocks."""
        path = os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME)
        if not os.path.isfile(path):
            raise IncompleteStoreError(
                f"{path} is missing: the featurization of checkpoint {model_id} did not finish."
            )
        return load_kernel_file(path, names, self.kernel_layout, as_blocks)

    @property
    def kernel_layout(self) -> List[List[int]]:
        """The [offset, size] blocks ``gram_and_kernel``'s matrices come as (``[]``: whole k × k matrices)."""
        return self.config.kernel_blocks if self.keeps_kernel_blocks else []

    def gram_and_kernel(self, model_id: int) -> Tuple[Matrix, Matrix]:
        """(XᵀX_m, K_m) in float64 for a normalized ensemble's queries (``hf_trak.run.scoring``): as the lists of their
        diagonal blocks where the file keeps them so (``kernel_layout``), else k × k; with ``keep_kernels``, kept in
        memory after the first call while K_m's file is unchanged (same modification time and size)."""
        path = os.path.join(self.checkpoint_dir(model_id), KERNEL_NAME)
        stat = os.stat(path) if os.path.isfile(path) else None
        version = (stat.st_mtime_ns, stat.st_size) if stat else None
        cached = self._grams_and_kernels.get(model_id)  # filled only with keep_kernels
        if cached is None or cached[0] != version:
            saved = self.load_kernel(model_id, ["xtx", "kernel"], as_blocks=True)
            cached = (version, *(converted(saved[name], dtype=torch.float64) for name in ("xtx", "kernel")))
            if self.keep_kernels:
                self._grams_and_kernels[model_id] = cached
        return cached[1], cached[2]

    def is_complete(self) -> bool:
        """Every checkpoint's fingerprint and kernel, and (version 3 on) its Φ shards, are written."""
        checkpoints = range(self.config.num_checkpoints)
        return (
            all(self.config.checkpoint_fingerprints)
            and all(self.has_kernel(m) for m in checkpoints)
            and (not self.config.principal_share or all(self.has_principal_factors(m) for m in checkpoints))
            and (
                not stores_preconditioned(self.config.store_version)
                or all(self.has_preconditioned(m) for m in checkpoints)
            )
        )

    def record_checkpoint(self, model_id: int, fingerprint: str, base_fingerprint: Optional[str] = None) -> None:
        """Record the weights' fingerprint of checkpoint ``model_id`` (and the base model's) in the config."""
        fingerprints = list(self.config.checkpoint_fingerprints)
        fingerprints[model_id] = fingerprint
        changes = {"checkpoint_fingerprints": fingerprints}
        if base_fingerprint is not None:
            changes["base_fingerprint"] = base_fingerprint
        self.config = dataclasses.replace(self.config, **changes)
        write_text(os.path.join(self.root, CONFIG_NAME), self.config.to_json_string())

    # ------------------------------------------------------------ provenance
    def save_row_hashes(self, row_hashes: np.ndarray) -> None:
        """The featurized split's row hashes (``hf_trak.data.inputs``), in row order."""
        write_arrow(
            os.path.join(self.root, ROW_HASHES_NAME),
            {"index": pa.array(np.arange(len(row_hashes), dtype=np.int64)), "row_hash": pa.array(row_hashes)},
        )

    def row_hashes(self) -> Optional[np.ndarray]:
        """The featurized split's row hashes, or None for a store written before they were recorded."""
        path = os.path.join(self.root, ROW_HASHES_NAME)
        if not os.path.isfile(path):
            return None
        try:
            return read_table(path).column("row_hash").to_numpy()
        except (pa.ArrowException, KeyError) as error:
            raise CorruptStoreError(f"{path} is corrupt ({error}): run featurize again to rewrite it.") from error

    def record_excluded_rows(self, rows: Sequence[int]) -> None:
        """Record the rows excluded for non-finite inputs or gradients (their features are 0, Q is NaN)."""
        self.config = dataclasses.replace(self.config, excluded_rows=sorted(set(rows)))
        write_text(os.path.join(self.root, CONFIG_NAME), self.config.to_json_string())

    # ----------------------------------------------------------------- scores
    def save_scores(self, name: str, scores: np.ndarray, overwrite: bool = False) -> str:
        """``hf_trak.store.saved_scores.save_scores`` in this store."""
        return saved_scores.save_scores(self.root, name, scores, overwrite)

    def score_names(self) -> List[str]:
        return saved_scores.score_names(self.root)

    def load_scores(self, name: str) -> np.ndarray:
        return saved_scores.load_scores(self.root, name)
