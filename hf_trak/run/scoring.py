"""Scoring: TRAK scores of targets against a feature store, as a full matrix or a running top-k.

1. ``target_features``: T_m, the targets' features at each checkpoint m (loaded once per
   call), kept on the CPU: M × T × k float32.
2. ``shard_scores``: for each train shard, Φ_m = X_m K_m as featurize stored it (read
   memory-mapped; formed here, in float64, for stores before version 3), then the score
   blocks τ[rows, block] = mean_m(Φ_m T_m[block]ᵀ) ⊙ Q̄[rows] (Q̄ = 1 with
   ``train_weight="none"``; with ``ensemble="normalized"`` each T_m's rows divided by σ_mj,
   ``ensemble_weighted``) for blocks of
   ``target_block_size`` targets. Cost: one read of Φ and n·k·T flops (n·k² more for old
   stores); memory: a shard's Φ and one (shard × block) block.
3. ``scores`` writes the blocks into an (n × T) array; ``top_k`` merges them into the k
   largest (or smallest) per target without the full matrix.
4. ``self_scores``: τ(z_i, z_i), each train example's score on itself, from the stored X and Φ
   alone (no target pass): one read of the store and 2·n·k flops per checkpoint.

With several processes each scores a contiguous share of the targets and the main process
gathers the shares (``hf_trak.run.processes.gather_to_main``).
"""

import math
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from torch import Tensor
from tqdm.auto import tqdm

from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidInputError
from hf_trak.hf.checkpoints import Checkpoint
from hf_trak.hf.sharding import passes_short
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.kernel import merge_top_k, preconditioned, score_block, target_rms
from hf_trak.store.arrow_files import as_tensor
from hf_trak.store.feature_store import PRECONDITIONED, FeatureStore


class TopK(NamedTuple):
    """``indices[j]``/``scores[j]``: the k train examples with the highest (or lowest) score for target j."""

    indices: np.ndarray
    scores: np.ndarray


def target_features(
    feature_map: FeatureMap,
    checkpoints: Sequence[Checkpoint],
    source: ExampleSource,
    rows: range,
    batch_size: int,
    sample_train_batch: Optional[Callable[[int, int], dict]] = None,
    show_progress: bool = True,
    on_nonfinite: str = "error",
    state: Optional[PartialState] = None,
) -> List[Tensor]:
    """[T_m for each checkpoint]: features of targets ``rows`` of ``source``, each (len(rows), k) float32, CPU.

    A target whose features are not finite is refused (``on_nonfinite="error"``) or kept: its scores are NaN.
    ``state``: the processes, each featurizing its share of the targets, which a sharded model keeps in lockstep
    (``hf_trak.hf.sharding``)."""
    features = []
    with tqdm(
        total=len(rows) * len(checkpoints), desc="Featurizing targets", disable=None if show_progress else True
    ) as bar:
        for model_id, checkpoint in enumerate(checkpoints):
            view = feature_map.at(checkpoint, model_id, sample_train_batch)
            blocks = [torch.empty(0, feature_map.dim)]
            planned = source.batch_count(batch_size, rows.start, rows.stop)
            short = passes_short(state, planned) if feature_map.sharded and state is not None else 0
            for batch in source.batches(batch_size, rows.start, rows.stop):
                offset = rows.start + sum(len(block) for block in blocks)
                blocks.append(view.features(batch)[0].cpu())
                bad = torch.nonzero(~torch.isfinite(blocks[-1]).all(dim=1)).reshape(-1)
                if len(bad) and on_nonfinite == "error":
                    raise InvalidInputError(
                        f"Target row {offset + int(bad[0])} has non-finite gradients at checkpoint {model_id} "
                        "(NaN/inf): check that row, or pass on_nonfinite='exclude' to give it NaN scores."
                    )
                bar.update(len(blocks[-1]))
            for _ in range(short):  # a sharded model: as many passes as the other processes
                view.features(source.batch([0]))
            features.append(torch.cat(blocks))
    return features


def shard_scores(
    store: FeatureStore,
    targets: List[Tensor],
    device: torch.device,
    target_block_size: int,
    show_progress: bool = True,
) -> Iterator[Tuple[int, int, Tensor]]:
    """``(train_start, target_offset, scores)`` blocks covering the (n × T) scores; each block is
    (shard rows × ≤ target_block_size) float32 on ``device``."""
    num_checkpoints, num_targets = len(targets), len(targets[0])
    if num_targets == 0:
        return
    targets = [t * phi_scale(store, m) for m, t in enumerate(ensemble_weighted(store, targets))]  # Φ/s · (T ⊙ s)ᵀ
    shards = zip(*(preconditioned_shards(store, m, device) for m in range(num_checkpoints)))  # lazily
    progress = dict(
        total=len(store.shard_ranges()), desc="Scoring train shards", disable=None if show_progress else True
    )
    for shard in tqdm(shards, **progress):
        start = shard[0][0]
        phis = [phi for _, phi, _ in shard]
        q = torch.from_numpy(train_weights(store, [out_to_loss for _, _, out_to_loss in shard]))
        for offset in range(0, num_targets, target_block_size):
            block = [t[offset : offset + target_block_size] for t in targets]
            yield start, offset, score_block(phis, block, q)


def train_weights(store: FeatureStore, out_to_loss: Sequence[np.ndarray], on: str = "output") -> np.ndarray:
    """Q̄[rows], the train-side weight of the scores: mean_m Q_m[rows] over the checkpoints, or 1 with
    ``train_weight="none"``; NaN for rows excluded for non-finite values either way. ``on="loss"``: the weight of
    a score on the row's own loss, Q̄ (the loss's derivative to f) whatever ``train_weight`` is."""
    q = np.mean(out_to_loss, axis=0)
    return np.where(np.isnan(q), q, np.ones_like(q)) if store.config.train_weight == "none" and on != "loss" else q


RMS_BLOCK = 4096  # targets per σ computation (two k × block float64 products)


def ensemble_weighted(store: FeatureStore, targets: List[Tensor]) -> List[Tensor]:
    """[T_m] as the mean over checkpoints weighs them: unchanged (``ensemble="mean"``) or each target divided by
    σ_mj, the RMS of its scores at checkpoint m (``"normalized"``, ``hf_trak.method.kernel.target_rms``, from the
    store's XᵀX_m and K_m, one checkpoint at a time: a read of 2·k² float64 values, or 2·Σ_b k_b² where the store
    keeps their diagonal blocks, unless it keeps them in memory, ``FeatureStore.keep_kernels``, and as many flops
    per target)."""
    if store.config.ensemble != "normalized":
        return targets
    num_rows = store.config.num_train_examples - len(store.config.excluded_rows)
    weighted = []
    for model_id, t in enumerate(targets):
        xtx, kernel = store.gram_and_kernel(model_id)
        blocks = [t[i : i + RMS_BLOCK] for i in range(0, len(t), RMS_BLOCK)]
        rms = [target_rms(xtx, kernel, block, num_rows, store.kernel_layout).cpu()[:, None] for block in blocks]
        weighted.append(torch.cat([(b.double() / r).float() for b, r in zip(blocks, rms)]) if blocks else t)
    return weighted


def phi_scale(store: FeatureStore, model_id: int) -> Tensor:
    """s_m, the column scale Φ_m is stored with (1 where Φ is formed per call, in stores before version 3)."""
    if not store.has_preconditioned(model_id):
        return torch.ones(())
    return store.load_kernel(model_id, ["phi_scale"]).get("phi_scale", torch.ones(())).float()


def preconditioned_shards(store: FeatureStore, model_id: int, device) -> Iterator[Tuple[int, Tensor, np.ndarray]]:
    """``(start, Φ_m[rows]/s_m on device (stored dtype), Q_m[rows])`` shard by shard: the stored Φ (read
    memory-mapped; its checksum is checked when featurize resumes, ``FeatureStore.verify``), or for stores before
    version 3 Φ = X K formed from the features."""
    if store.has_preconditioned(model_id):
        for start, stop in store.shard_ranges():
            phi, out_to_loss = store.shard(model_id, start, stop, PRECONDITIONED, verify=False)
            yield start, as_tensor(phi).to(device=device), out_to_loss
        return
    kernel = store.load_kernel(model_id)["kernel"].to(device, torch.float64)
    for start, features, out_to_loss in store.shards(model_id):
        yield start, preconditioned(as_tensor(features), kernel, blocks=store.config.kernel_blocks), out_to_loss


def self_scores(store: FeatureStore, device, show_progress: bool = True) -> Dict[str, np.ndarray]:
    """Self-influence of every train row i, from one read of the store (shard by shard, as ``shard_scores`` reads
    Φ): {"output": ..., "loss": ...}, each (n,) float32, NaN for excluded rows. ``"output"``: τ(z_i, z_i) =
    mean_m(Φ_m[i] · x_mi / σ_mi) · Q̄_i, the diagonal of the train split scored as its own targets (σ_mi = 1
    unless ``ensemble="normalized"``, Q̄_i = 1 with ``train_weight="none"``). ``"loss"``: the influence on the
    row's own loss, the same mean times Q̄_i whatever ``train_weight`` is (``train_weights``)."""
    n, num_checkpoints, normalized = store.config.num_train_examples, store.config.num_checkpoints, None
    num_rows = n - len(store.config.excluded_rows)
    total, out_to_loss = np.zeros(n, dtype=np.float64), []
    progress = dict(total=num_checkpoints, desc="Self-influence", disable=None if show_progress else True)
    for model_id in tqdm(range(num_checkpoints), **progress):
        scale = phi_scale(store, model_id).to(device)
        if store.config.ensemble == "normalized":
            normalized = store.gram_and_kernel(model_id)
        rows, weights = zip(preconditioned_shards(store, model_id, device), store.shards(model_id)), []
        for (start, phi, _), (_, features, q) in rows:
            weights.append(q)
            x = as_tensor(features).to(device=device, dtype=torch.float32)
            if normalized is not None:
                rms = target_rms(*normalized, x, num_rows, store.kernel_layout).to(device)
                x = (x.double() / rms[:, None]).float()
            total[start : start + len(x)] += (phi.float() * (x * scale)).sum(1).double().cpu().numpy()
        out_to_loss.append(np.concatenate(weights))
    mean = total / num_checkpoints
    return {on: (mean * train_weights(store, out_to_loss, on)).astype(np.float32) for on in ("output", "loss")}


def scores(store: FeatureStore, targets: List[Tensor], device, target_block_size: int, out=None, show_progress=True):
    """The (n × T) float32 scores of ``targets`` (written into ``out`` if given)."""
    shape = (store.config.num_train_examples, len(targets[0]))
    out = np.empty(shape, dtype=np.float32) if out is None else out
    for start, offset, block in shard_scores(store, targets, device, target_block_size, show_progress):
        out[start : start + block.shape[0], offset : offset + block.shape[1]] = block.cpu().numpy()
    return out


def top_k(
    store: FeatureStore,
    targets: List[Tensor],
    device,
    target_block_size: int,
    k: int,
    largest: bool,
    show_progress: bool = True,
    train_rows: Optional[np.ndarray] = None,
) -> TopK:
    """The ``k`` train rows with the largest (or smallest) score of each target, merged shard by shard.

    ``train_rows``: only these stored rows compete, and indices are positions in ``train_rows``."""
    n = store.config.num_train_examples
    k = min(k, n if train_rows is None else len(train_rows))
    allowed = None
    if train_rows is not None:
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[torch.from_numpy(np.asarray(train_rows))] = True
    best = {}
    for start, offset, block in shard_scores(store, targets, device, target_block_size, show_progress):
        if allowed is not None:
            outside = ~allowed[start : start + block.shape[0]].to(block.device)
            block[outside] = -math.inf if largest else math.inf
        best[offset] = merge_top_k(best.get(offset), block, start, k, largest)
    indices = [best[offset][1].T.cpu().numpy() for offset in sorted(best)] or [np.empty((0, k), np.int64)]
    values = [best[offset][0].T.cpu().numpy() for offset in sorted(best)] or [np.empty((0, k), np.float32)]
    indices = np.concatenate(indices)
    if train_rows is not None:  # stored row -> its position in train_rows
        position = np.full(n, -1, dtype=np.int64)
        position[np.asarray(train_rows)[::-1]] = np.arange(len(train_rows))[::-1]
        indices = position[indices]
    return TopK(indices, np.concatenate(values))
