"""Once every shard of a checkpoint's features is written: its kernel K_m, then Φ_m = X_m K_m.

XᵀX_m = Σ_shards X_sᵀX_s (float64) is summed over processes (one all-reduce: no features travel) and
the main process writes λ_m and K_m (``hf_trak.method.kernel``): one global kernel, or one per projected
matrix from XᵀX's blocks, the per-token Gram matrices or EK-FAC's bases (``kernel_from``). Each process
then writes Φ_m for its share of the shards (formed in float64, stored in the features' dtype), so that
scoring reads Φ and never forms it. Where K_m is block-diagonal and the store keeps its blocks
(``FeatureStore.keeps_kernel_blocks``), XᵀX_m and K_m are made, reduced, written and applied as their Σ_b k_b²
diagonal blocks throughout, never as k × k matrices (at k = 4096, 128 MiB each).
"""

import logging

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from hf_trak.method.kernel import (
    add_gram,
    block_diagonal,
    column_scale,
    diagonal_blocks,
    eigen_block_inverse,
    gram_block_inverse,
    kronecker_gram,
    mixed_gram,
    preconditioned,
    regularized_inverse,
    resolve_lambda,
    shrunk_gram,
)
from hf_trak.store.arrow_files import as_tensor
from hf_trak.store.config import TRAKConfig
from hf_trak.store.feature_store import PRECONDITIONED, FeatureStore
from hf_trak.store.kernel_file import packed_blocks, unpacked_blocks

logger = logging.getLogger(__name__)


def finalize_checkpoint(store: FeatureStore, model_id: int, device, state: PartialState) -> None:
    """Once every shard of checkpoint m is written: K_m (``_write_kernel``), then Φ_m (``_write_preconditioned``)."""
    _write_kernel(store, model_id, store.config.feature_dim, device, state)
    _write_preconditioned(store, model_id, device, state)


def _write_kernel(store: FeatureStore, model_id: int, dim: int, device, state: PartialState) -> None:
    """XᵀX_m over every shard (each process sums its share; one all-reduce of its blocks), then λ_m and K_m: global,
    or per module from XᵀX's blocks, the per-token Gram matrices, or EK-FAC's bases (``kernel_from``)."""
    if state.is_main_process:
        store.has_valid_kernel(model_id)  # a corrupt K_m is reported and deleted, to be redone
    state.wait_for_everyone()
    if store.has_kernel(model_id):
        return
    config = store.config
    statistics = _summed_statistics(store, model_id, device) if config.kernel_from != "examples" else {}
    bases = _kronecker_bases(statistics) if config.kernel_from == "ekfac" else {}
    blocks = config.kernel_blocks if store.keeps_kernel_blocks else ()
    layout = blocks or [(0, dim)]  # XᵀX whole: one block
    xtx = [torch.zeros(size, size, dtype=torch.float64, device=device) for _, size in layout]
    moments = {b: torch.zeros(len(q_rows), len(q_cols), dtype=torch.float64, device=device)
               for b, (q_rows, q_cols) in bases.items()}  # fmt: skip
    with state.split_between_processes(store.shard_ranges()) as mine:
        for start, stop in mine:
            features = as_tensor(store.shard(model_id, start, stop)[0]).to(device)
            add_gram(xtx, features, blocks)
            for b, (q_rows, q_cols) in bases.items():  # Λ_b = Σ_i (Q_rᵀ X_i Q_c)², X_i the block as k_r × k_c
                offset, size = config.kernel_blocks[b]
                block = features[:, offset : offset + size].double().reshape(-1, len(q_rows), len(q_cols))
                moments[b] += (q_rows.T @ block @ q_cols).square().sum(0)
    if state.num_processes > 1:  # one all-reduce of the blocks, flattened one after another (as in the file)
        xtx = unpacked_blocks(reduce(packed_blocks(xtx, layout), reduction="sum"), layout)
        moments = {b: reduce(moment, reduction="sum") for b, moment in moments.items()}
    xtx = xtx if blocks else xtx[0]
    if state.is_main_process:
        if config.kernel == "per_module":
            inverses, lambda_reg = _per_module_kernel(config, xtx, statistics, bases, moments)
            kernel = inverses if blocks else block_diagonal(inverses, config.kernel_blocks)
        else:
            lambda_reg = resolve_lambda(xtx, config.lambda_reg, config.lambda_scale)
            kernel = regularized_inverse(xtx, lambda_reg)
        scale = column_scale(xtx, kernel, config.num_train_examples, config.kernel_blocks)
        store.save_kernel(model_id, xtx, kernel, lambda_reg, scale)  # written from the CPU (save_safetensors)
        logger.info("Checkpoint %d: k=%d, lambda=%.3g", model_id, dim, lambda_reg)
    state.wait_for_everyone()


def _per_module_kernel(config: TRAKConfig, xtx, statistics: dict, bases: dict, moments: dict):
    """([K_b], mean λ_b): each block's inverse from EK-FAC's basis and moments, the per-token Gram matrix (shrunk
    toward its K-FAC approximation by ``kernel_shrinkage``: ``hf_trak.method.kernel.shrunk_gram``; with
    ``kernel_from="mixed"`` averaged with XᵀX_bb, ``mixed_gram``), or XᵀX_bb (``xtx``: k × k or its blocks)."""
    inverses, lambdas = [], []
    scale = config.feature_dim / config.num_params  # the statistics are of P_mᵀg, the features of P_mᵀg/√p · √k
    for b, examples in enumerate(diagonal_blocks(xtx, config.kernel_blocks)):
        if b in bases:
            inverse, lambda_b = eigen_block_inverse(*bases[b], moments[b], config.lambda_reg, config.lambda_scale)
        else:
            block = _token_gram(statistics, b, config.kernel_shrinkage) * scale if statistics else examples
            if config.kernel_from == "mixed":
                block = mixed_gram(examples, block)
            inverse, lambda_b = gram_block_inverse(block, config.lambda_reg, config.lambda_scale)
        inverses.append(inverse)
        lambdas.append(lambda_b)
    return inverses, float(sum(lambdas) / len(lambdas))


def statistics_kind(config: TRAKConfig) -> str:
    """The per-token statistics ``config``'s kernel is built from (``FactoredGradientProjector.start_statistics``):
    "ekfac" (each weight's Kronecker factors) for EK-FAC and for mixed kernels whose per-token part is K-FAC's
    approximation alone (``kernel_shrinkage=1``: T·(k_r² + k_c²) flops per block, not T·k_b²), "tokens" (also
    each weight's per-token Gram matrix) otherwise."""
    kronecker_only = config.kernel_from == "mixed" and config.kernel_shrinkage == 1
    return "ekfac" if config.kernel_from == "ekfac" or kronecker_only else "tokens"


def _token_gram(statistics: dict, b: int, shrinkage: float):
    """Block b's per-token Gram matrix G_b, shrunk toward its K-FAC approximation A ⊗ B by ``shrinkage``
    (``shrunk_gram``), or A ⊗ B alone where G_b was not gathered (``statistics_kind``; a mixed kernel then matches
    its trace to XᵀX_bb's)."""
    name = f"block_{b}"
    if not shrinkage or f"{name}_rows" not in statistics:
        return statistics[name]
    rows, cols = statistics[f"{name}_rows"], statistics[f"{name}_cols"]
    if name not in statistics:
        return kronecker_gram(rows, cols)
    return shrunk_gram(statistics[name], rows, cols, shrinkage)


def _summed_statistics(store: FeatureStore, model_id: int, device) -> dict:
    """Each kernel statistic (``FactoredGradientProjector.statistics``) summed over the shards."""
    total = {}
    for start, stop in store.shard_ranges():
        for name, tensor in store.statistics(model_id, start, stop).items():
            total[name] = total[name] + tensor.to(device) if name in total else tensor.to(device)
    return total


def _kronecker_bases(statistics: dict) -> dict:
    """{block: (Q_r, Q_c)}: eigenvectors of each weight block's Kronecker factors."""
    bases = {}
    for name in statistics:
        if name.endswith("_rows"):
            block = name[: -len("_rows")]
            bases[int(block.split("_")[1])] = tuple(
                torch.linalg.eigh(statistics[f"{block}_{side}"].double())[1] for side in ("rows", "cols")
            )
    return bases


def _write_preconditioned(store: FeatureStore, model_id: int, device, state: PartialState) -> None:
    """Φ_m/s_m = X_m K_m/s_m of every shard (formed in float64, ``hf_trak.method.kernel.preconditioned``; stored in the
    features' dtype with Q; s_m: ``column_scale``), each process a share: scoring T targets then costs one read
    of Φ and n·k·T."""
    if state.is_main_process:
        for start, stop in store.shard_ranges():
            store.has_valid_shard(model_id, start, stop, PRECONDITIONED)  # a corrupt Φ shard is redone
    state.wait_for_everyone()
    missing = [(a, b) for a, b in store.shard_ranges() if not store.has_shard(model_id, a, b, PRECONDITIONED)]
    state.wait_for_everyone()
    if not missing:
        return
    saved, blocks = store.load_kernel(model_id, ["kernel", "phi_scale"], as_blocks=True), store.config.kernel_blocks
    kernel = [block.to(device, torch.float64) for block in diagonal_blocks(saved["kernel"], blocks)]
    scale = saved["phi_scale"].to(device, torch.float64)
    dtype = getattr(torch, store.config.dtype)
    with state.split_between_processes(missing) as mine:
        for start, stop in mine:
            features, out_to_loss = store.shard(model_id, start, stop)
            phi = preconditioned(as_tensor(features), kernel, scale, blocks)
            phi = phi.to(dtype).cpu().numpy()
            store.write_shard(model_id, start, phi, out_to_loss, PRECONDITIONED)
    state.wait_for_everyone()
