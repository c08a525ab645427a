"""The factored projector's sizes by spectrum (``block_sizes="spectrum"``): k divided among the matrices by how much
of each one's gradients the sizes keep, not by the matrices' sizes.

Matrix b's per-example gradient is Σ_t u_t v_tᵀ (``hf_trak.method.factored``). With F_r = Σ u uᵀ and F_c = Σ v vᵀ the
per-token second moments of its two sides (K-FAC's factors, over a sample of the train rows at the first
checkpoint), sides of k_r and k_c dimensions along their leading eigenvectors keep about E_r(k_r)·E_c(k_c) of the
matrix's gradient energy, where E(k) is the share of a side's trace in its k largest eigenvalues (``kept_energy``;
an embedding's one-hot side: its k most frequent ids; a side larger than ``MAX_PRINCIPAL_SIDE``: k/d, what a random
projection keeps in expectation). From k_r = k_c = 1, ``spectrum_shapes`` adds, one step at a time, the row or
column whose gain in that product per feature dimension it costs is largest over all matrices (every matrix
counts alike: each has its own kernel), until the matrices' share of k is spent. A matrix whose gradients live in
few directions gets few dimensions, and one whose spectrum is flat gets many, whatever their sizes.
"""

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from hf_trak.method.factored_sizes import Target
from hf_trak.method.principal import leading_eigenvectors

FULL_SPECTRUM_SIDE = 256  # larger sides: the leading eigenvalues only
LEADING_EIGENVALUES = 64  # of a larger side: more than a side's k in practice (k_r·k_c is one matrix's share of k)
SUBSPACE_ITERATIONS = 3  # for them: shares of the trace need less precision than eigenvectors


def kept_energy(moment: Tensor) -> np.ndarray:
    """E: E[k − 1] is the share of the trace of a side's second moment (d × d; or its diagonal, (d,), for one-hot
    ids) in its k largest eigenvalues (increasing to 1; all 1 for a side no token reached). A side larger than
    ``FULL_SPECTRUM_SIDE`` gets its ``LEADING_EIGENVALUES`` largest by subspace iteration (d² per vector instead of
    d³ for all), and the rest of its trace spread evenly over the other directions."""
    values = moment.float().cpu()
    dim = values.shape[0]
    trace = float(values.sum() if values.dim() == 1 else torch.diagonal(values).sum())
    if trace <= 0:
        return np.ones(dim)
    if values.dim() == 1 or dim <= FULL_SPECTRUM_SIDE:
        values = values if values.dim() == 1 else torch.linalg.eigvalsh(values)
        values = values.clamp(min=0).sort(descending=True).values
        return np.minimum((values.double().cumsum(0) / trace).numpy(), 1.0)
    vectors = leading_eigenvectors(values, LEADING_EIGENVALUES, torch.Generator().manual_seed(0), SUBSPACE_ITERATIONS)
    leading = ((values @ vectors) * vectors).sum(0).clamp(min=0).sort(descending=True).values
    kept = np.minimum((leading.double().cumsum(0) / trace).numpy(), 1.0)
    rest = kept[-1] + (1 - kept[-1]) * np.arange(1, dim - len(kept) + 1) / (dim - len(kept))
    return np.concatenate([kept, rest])


def spectrum_shapes(
    targets: Sequence[Target], energy: Mapping[Tuple[str, str], np.ndarray], budget: int
) -> Dict[str, Tuple[int, int]]:
    """{name: (k_r, k_c)} of ``targets`` with Σ k_r·k_c ≤ ``budget``, by greedy steps of largest gain in
    E_r(k_r)·E_c(k_c) per dimension (see the module's docstring); ``energy[(name, "rows" or "cols")]`` is E, a side
    without one keeps k/d."""

    def kept(target: Target, side: str, k: int) -> float:
        curve = energy.get((target.name, side))
        if curve is None:
            return k / (target.rows if side == "rows" else target.cols)
        return 1.0 if k >= len(curve) else float(curve[k - 1])

    shapes = {target.name: [1, 1] for target in targets}
    used = len(targets)
    while True:
        best = None  # (gain per dimension, -position, side index, cost)
        for position, target in enumerate(targets):
            k_rows, k_cols = shapes[target.name]
            rows, cols = kept(target, "rows", k_rows), kept(target, "cols", k_cols)
            if k_rows < target.rows and used + k_cols <= budget:
                step = ((kept(target, "rows", k_rows + 1) - rows) * cols / k_cols, -position, 0, k_cols)
                best = step if best is None or step > best else best
            if k_cols < target.cols and used + k_rows <= budget:
                step = (rows * (kept(target, "cols", k_cols + 1) - cols) / k_rows, -position, 1, k_rows)
                best = step if best is None or step > best else best
        if best is None:
            return {name: (k_rows, k_cols) for name, (k_rows, k_cols) in shapes.items()}
        _, negative_position, side, cost = best
        shapes[targets[-negative_position].name][side] += 1
        used += cost
