"""A faiss index over a store's features: top-k queries without reading the store each time.

TRAK's score of train row i for a target with features t_m at checkpoint m is

    τ_i = Q̄_i · (1/M) Σ_m Φ_m[i] · t_m = Q̄_i · (1/M) Σ_m X_m[i] · (K_m t_m),

an inner product ⟨v_i, u⟩ of one (M·k) vector per train row and one per target, in either of
two spaces:

    exact ("Flat"):   v_i = (Q̄_i/M)[Φ_1[i]/s_1, …, Φ_M[i]/s_M]   u = [t_1 ⊙ s_1, …, t_M ⊙ s_M]
    approximate:      v_i = (Q̄_i/M)[X_1[i], …, X_M[i]]           u = [K_1 t_1, …, K_M t_M]

(Φ_m = X_m K_m is stored divided by its column scale s_m; Q̄ = 1 with ``train_weight="none"``; with
``ensemble="normalized"`` each t_m is first divided by σ_m, the RMS of its scores at checkpoint m,
``hf_trak.run.scoring.ensemble_weighted``).
The exact index scans the stored Φ as scoring does (``hf_trak.run.scoring.top_k``: same top-k).
An approximate index (any other faiss factory string: ``"IVF1024,Flat"``, ``"HNSW32"``)
partitions the features X instead, which cluster by class and content, where Φ = XK does
not: K whitens exactly the directions the rows share (a one-off comparison on the demo
store's first checkpoint, 100 test digits, an IVF index searching one list in 8: recall@10
0.32 over Φ, 0.77 over X; ``benchmarks/explore.py`` and ``benchmarks/query.py`` print the
figures of the X index).
The vectors (n × M·k float32) live in memory in ``datasets``' ``FaissIndex`` (the index
behind ``Dataset.add_faiss_index``) with the inner-product metric. Opponents are the top-k of
−u. Rows excluded for non-finite values (Q̄ NaN) are held as zeros and only returned, with
score ∓inf, after every other row (as ``scoring.top_k`` ranks them).

Needs ``faiss`` (``pip install hf_trak[app]``, or faiss-cpu / faiss-gpu).
"""

import logging
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from hf_trak.errors import InvalidArgumentError, MissingDependencyError
from hf_trak.run.scoring import TopK, ensemble_weighted, phi_scale, preconditioned_shards, train_weights
from hf_trak.store.arrow_files import as_tensor
from hf_trak.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

EXACT = "Flat"


def require_faiss():
    try:
        import faiss
    except ImportError as error:
        raise MissingDependencyError(
            "The feature index needs faiss: pip install 'hf_trak[app]' (or faiss-cpu), or query without an index."
        ) from error
    return faiss


def _feature_shards(store: FeatureStore, model_id: int, device) -> Iterator[Tuple[int, Tensor, np.ndarray]]:
    """``(start, X_m[rows], Q_m[rows])`` shard by shard, as ``preconditioned_shards`` gives Φ."""
    for start, features, out_to_loss in store.shards(model_id):
        yield start, as_tensor(features), out_to_loss


class _StoreVectors(Sequence):
    """The v_i of a store, row ranges at a time, as ``FaissIndex.add_vectors`` reads them (``vectors[i:j]``):
    from the stored Φ (``preconditioned``) or the features X."""

    def __init__(self, store: FeatureStore, preconditioned: bool):
        self.store, self.read = store, preconditioned_shards if preconditioned else _feature_shards
        self.num_checkpoints = store.config.num_checkpoints
        self.excluded = np.zeros(store.config.num_train_examples, dtype=bool)
        self._restart()

    def _restart(self) -> None:
        cpu = torch.device("cpu")
        self._shards = [self.read(self.store, m, cpu) for m in range(self.num_checkpoints)]
        self._block: Optional[np.ndarray] = None  # the rows read last: [start, start + len)
        self._start = 0

    def __len__(self) -> int:
        return self.store.config.num_train_examples

    def _next_shard(self) -> None:
        parts = [next(shards) for shards in self._shards]
        start = parts[0][0]
        q = train_weights(self.store, [out_to_loss for _, _, out_to_loss in parts])
        self.excluded[start : start + len(q)] = np.isnan(q)
        weight = np.nan_to_num(q, nan=0.0).astype(np.float32)[:, None] / self.num_checkpoints
        self._block = np.concatenate([vectors.float().numpy() * weight for _, vectors, _ in parts], axis=1)
        self._start = start

    def __getitem__(self, rows):
        """Rows ``rows`` (a slice read in order, or one row) as float32 (rows, M·k)."""
        if isinstance(rows, (int, np.integer)):
            return self[rows : rows + 1][0]
        start, stop, _ = rows.indices(len(self))
        if self._block is None or start < self._start:
            self._restart()
            self._next_shard()
        pieces = []
        while start < stop:
            end = self._start + len(self._block)
            if start >= end:
                self._next_shard()
                continue
            pieces.append(self._block[start - self._start : min(stop, end) - self._start])
            start = min(stop, end)
        return np.concatenate(pieces) if pieces else np.empty((0, self._width()), np.float32)

    def _width(self) -> int:
        return self.num_checkpoints * self.store.config.feature_dim


class FeatureIndex:
    """Inner-product top-k over a store's train rows (see the module docstring).

    Args:
        store: a complete feature store.
        string_factory: faiss index factory string; ``"Flat"`` (default) is exact.
        nprobe: lists searched per query by IVF indexes (more: higher recall, slower).
        train_size: rows an index that needs training (IVF) is trained on (default: all, at most 50k).
    """

    def __init__(
        self,
        store: FeatureStore,
        string_factory: str = EXACT,
        nprobe: int = 32,
        train_size: Optional[int] = None,
    ):
        faiss = require_faiss()
        from datasets.search import FaissIndex

        self.store, self.string_factory = store, string_factory
        store.keep_kernels = True  # every query needs them with ensemble="normalized" (hf_trak.run.scoring)
        n = store.config.num_train_examples
        vectors = _StoreVectors(store, preconditioned=string_factory == EXACT)
        try:
            self.index = FaissIndex(string_factory=string_factory, metric_type=faiss.METRIC_INNER_PRODUCT)
            needs_training = string_factory != EXACT
            train_size = min(n, train_size or 50_000) if needs_training else None
            self.index.add_vectors(vectors, batch_size=store.config.shard_size, train_size=train_size)
        except RuntimeError as error:  # faiss reports a bad factory string or too few training rows so
            raise InvalidArgumentError(
                f"Cannot build the faiss index {string_factory!r} over {n} rows: {' '.join(str(error).split())[:300]}"
            ) from error
        self.nprobe = nprobe
        self.excluded_rows = np.flatnonzero(vectors.excluded)
        checkpoints = range(store.config.num_checkpoints)
        if self.is_exact:
            self.scales = [phi_scale(store, m) for m in checkpoints]
        else:
            self.kernels = [store.load_kernel(m, ["kernel"])["kernel"].float() for m in checkpoints]

    @property
    def is_exact(self) -> bool:
        return self.string_factory == EXACT

    @property
    def description(self) -> str:
        """What the index is, for a page: exact, or the approximate factory string."""
        return "exact faiss index" if self.is_exact else f"approximate faiss index {self.string_factory}"

    @property
    def nprobe(self) -> Optional[int]:
        """Lists an IVF index searches per query (None for other indexes); settable."""
        return getattr(self.index.faiss_index, "nprobe", None)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if hasattr(self.index.faiss_index, "nprobe"):
            self.index.faiss_index.nprobe = value

    def queries(self, targets: List[Tensor]) -> np.ndarray:
        """u of each target: (T, M·k) float32 from [T_m for each checkpoint] (each T × k)."""
        targets = ensemble_weighted(self.store, targets)
        if self.is_exact:
            return torch.cat([t.float() * s for t, s in zip(targets, self.scales)], dim=1).numpy()
        return torch.cat([t.float() @ kernel for t, kernel in zip(targets, self.kernels)], dim=1).numpy()

    def search(self, targets: List[Tensor], k: int, largest: bool = True) -> TopK:
        """The k train rows with the largest (or smallest) score of each target, as ``scoring.top_k`` gives them."""
        return self.search_queries(self.queries(targets), k, largest)

    def search_queries(self, queries: np.ndarray, k: int, largest: bool = True) -> TopK:
        """``search`` for the targets whose ``queries`` (u) are given: form them once to search both ways."""
        n = self.store.config.num_train_examples
        k = min(k, n)
        fetch = min(n, k + len(self.excluded_rows))
        found = self.index.search_batch(queries if largest else -queries, fetch)
        indices = np.asarray(found.total_indices, dtype=np.int64).reshape(len(queries), fetch)
        values = np.asarray(found.total_scores, dtype=np.float32).reshape(len(queries), fetch)
        if not largest:
            values = -values
        excluded = np.isin(indices, self.excluded_rows) | (indices < 0)  # faiss gives -1 when it finds fewer
        out_indices = np.empty((len(queries), k), np.int64)
        out_values = np.empty((len(queries), k), np.float32)
        for j in range(len(queries)):
            kept = ~excluded[j]
            rows, scores = indices[j][kept][:k], values[j][kept][:k]
            missing = k - len(rows)
            if missing:  # excluded rows (NaN scores) rank last, as in scoring.top_k; then -1: not found
                fill = np.concatenate([self.excluded_rows, np.full(k, -1)])[:missing]
                rows = np.concatenate([rows, fill])
                scores = np.concatenate([scores, np.full(missing, -math.inf if largest else math.inf, np.float32)])
            out_indices[j], out_values[j] = rows, scores
        return TopK(out_indices, out_values)
