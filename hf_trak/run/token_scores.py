"""Token-level scores: which positions of a training example carry its score on a target, and which positions of
the target it reaches.

With x_{m,i,u} the part of train example i's features at checkpoint m that flows through its position u (or
through the layers that see no positions, u = pooled) and t_{m,j,s} that of target j at position s
(``CheckpointView.token_features``), the score splits exactly over both:

    τ_ij = Q̄_i · (1/M) Σ_m Σ_u Σ_s x_{m,i,u}ᵀ K_m t_{m,j,s} / σ_mj = Σ_u Σ_s S_ij[u, s]

(Q̄_i = 1 with ``train_weight="none"``, σ_mj = 1 unless ``ensemble="normalized"``). A train example's token
scores are S's row sums, the target's its column sums; each list sums to τ_ij as formed here, in float64 from
fresh features (``score`` reads the stored Φ, rounded to the store's dtype). Cost, per checkpoint: one forward
and backward for the target and for each listed train example (the top-k proponents of one target, not the
split), and R·(T+1)·k² flops for R examples of T positions.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidArgumentError
from hf_trak.hf.checkpoints import Checkpoint
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.kernel import target_rms, times_kernel
from hf_trak.run.memory import batch_size_for
from hf_trak.run.scoring import train_weights
from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.kernel_file import converted


@dataclasses.dataclass
class TokenScores:
    """One train example's score on one target, split by position.

    ``train_tokens[u]``: the share of the example's position u (its attended positions, in order; ``train_ids``
    are their token ids), ``train_pooled`` that of the layers without positions (0 for a causal LM);
    ``target_tokens``, ``target_ids`` and ``target_pooled`` the same for the target. Each side sums to
    ``score``."""

    train_index: int
    score: float
    train_tokens: np.ndarray
    train_pooled: float
    train_ids: np.ndarray
    target_tokens: np.ndarray
    target_pooled: float
    target_ids: np.ndarray


def _attended(batch: dict, row: int, length: int) -> np.ndarray:
    """The positions of ``row`` that its attention mask keeps (all ``length`` without one)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return np.arange(length)
    return np.flatnonzero(mask[row, :length].cpu().numpy())


def _ids(batch: dict, row: int, positions: np.ndarray) -> np.ndarray:
    ids = batch.get("input_ids")
    return np.asarray([], dtype=np.int64) if ids is None else ids[row].cpu().numpy()[positions]


def token_scores(
    feature_map: FeatureMap,
    store: FeatureStore,
    checkpoints: Sequence[Checkpoint],
    train_source: ExampleSource,
    positions: Sequence[int],
    stored_rows: Sequence[int],
    target_batch: dict,
    batch_size: Optional[int],
    sample_train_batch: Optional[Callable[[int, int], dict]] = None,
    on: str = "output",
) -> List[TokenScores]:
    """``TokenScores`` of the one target in ``target_batch`` for the train examples at ``positions`` of
    ``train_source`` (stored as rows ``stored_rows``), ``batch_size`` at a time (None: ``hf_trak.run.memory``'s
    for the target's length); ``on``: the train rows' weight, as ``hf_trak.run.scoring.train_weights`` takes it."""
    if on not in ("output", "loss"):
        raise InvalidArgumentError(f"on is 'output' or 'loss', not {on!r}.")
    config, num_checkpoints = store.config, len(checkpoints)
    ids = target_batch.get("input_ids")
    batch_size = batch_size or batch_size_for(feature_map, ids.shape[-1] if ids is not None else 1)
    num_rows = config.num_train_examples - len(config.excluded_rows)
    chunks = [list(positions[start : start + batch_size]) for start in range(0, len(positions), batch_size)]
    batches = [train_source.batch(chunk) for chunk in chunks]  # collated once, read at every checkpoint
    totals: List[Optional[torch.Tensor]] = [None] * len(positions)
    for model_id, checkpoint in enumerate(checkpoints):
        view = feature_map.at(checkpoint, model_id, sample_train_batch)
        target = view.token_features(target_batch)[0].double()  # (T_j + 1) × k
        xtx, kernel = store.gram_and_kernel(model_id)  # k × k, or their diagonal blocks (store.kernel_layout)
        layout, device = store.kernel_layout, target.device
        if config.ensemble == "normalized":
            target = target / target_rms(xtx, kernel, target.sum(0, keepdim=True), num_rows, layout).to(device)
        kernel = converted(kernel, device=device)
        index = 0
        for batch in batches:
            shares = times_kernel(view.token_features(batch), kernel, layout) @ target.T  # B × (T_i + 1) × (T_j + 1)
            for offset in range(len(shares)):
                totals[index] = shares[offset] if totals[index] is None else totals[index] + shares[offset]
                index += 1
    weights = train_weights(store, [store_q(store, m, stored_rows) for m in range(num_checkpoints)], on)
    results = []
    for index, (position, (batch, offset)) in enumerate(zip(positions, _rows_of(batches))):
        matrix = (totals[index] / num_checkpoints * float(weights[index])).cpu().numpy()
        train_positions = _attended(batch, offset, matrix.shape[0] - 1)
        target_positions = _attended(target_batch, 0, matrix.shape[1] - 1)
        by_train, by_target = matrix.sum(1), matrix.sum(0)
        results.append(
            TokenScores(
                train_index=int(position),
                score=float(matrix.sum()),
                train_tokens=by_train[train_positions],
                train_pooled=float(by_train[-1]),
                train_ids=_ids(batch, offset, train_positions),
                target_tokens=by_target[target_positions],
                target_pooled=float(by_target[-1]),
                target_ids=_ids(target_batch, 0, target_positions),
            )
        )
    return results


def _rows_of(batches: List[dict]):
    """``(batch, row within it)`` of every example of ``batches``, in order."""
    for batch in batches:
        for offset in range(len(next(iter(batch.values())))):
            yield batch, offset


def store_q(store: FeatureStore, model_id: int, rows: Sequence[int]) -> np.ndarray:
    """Q_m of stored ``rows``, read from the shards that hold them."""
    rows = np.asarray(rows, dtype=np.int64)
    values = np.empty(len(rows), dtype=np.float64)
    for start, stop in store.shard_ranges():
        inside = (rows >= start) & (rows < stop)
        if inside.any():
            values[inside] = store.shard(model_id, start, stop, verify=False)[1][rows[inside] - start]
    return values
