"""The factored projector's sizes by spectrum (``block_sizes="spectrum"``): k divided among the matrices by how much
of each one's gradients the sizes keep, not by the matrices' sizes.

Matrix b's per-example gradient is Σ_t u_t v_tᵀ (``hf_trak.method.factored``). With F_r = Σ u uᵀ and F_c = Σ v vᵀ the
per-token second moments of its two sides (K-FAC's factors, over a sample of the train rows at the first
checkpoint), sides of k_r and k_c dimensions along their leading eigenvectors keep about E_r(k_r)·E_c(k_c) of the
matrix's gradient energy, where E(k) is the share of a side's trace in its k largest eigenvalues (``side_spectrum``;
an embedding's one-hot side: its k most frequent ids; a side larger than ``MAX_PRINCIPAL_SIDE``: k/d, what a random
projection keeps in expectation). From k_r = k_c = 1, ``spectrum_shapes`` adds, one step at a time, the row or
column whose gain in that product per feature dimension it costs is largest over all matrices (every matrix
counts alike: each has its own kernel), until the matrices' share of k is spent. A matrix whose gradients live in
few directions gets few dimensions, and one whose spectrum is flat gets many, whatever their sizes, but no side more
than ``MAX_SIDE_DIMS``: a large side's E past its measured eigenvalues is an extrapolation (flat), and projecting
its tokens costs d·k per token (random-init GPT-2 small and BERT-small otherwise give a 768- or 2048-wide side
1 × 768 or 1 × 1909 of k = 4096: on BERT-small over 256 rows that one matrix took about 7 s of a 26 s featurize,
its projection and Kronecker factor 4 s and its principal factor 3 s).
"""

import heapq
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from hf_trak.method.factored_sizes import Target
from hf_trak.method.principal import leading_eigenpairs

FULL_SPECTRUM_SIDE = 256  # larger sides: the leading eigenvalues only
LEADING_EIGENVALUES = 64  # of a larger side: more than a side's k in practice (k_r·k_c is one matrix's share of k)
SUBSPACE_ITERATIONS = 3  # for them: shares of the trace need less precision than eigenvectors
MAX_SIDE_DIMS = 4 * LEADING_EIGENVALUES  # a side's k at most: past its measured eigenvalues E is extrapolated


def side_spectrum(moment: Tensor) -> Tuple[np.ndarray, Optional[Tensor]]:
    """(E, V): E[k − 1] is the share of the trace of a side's second moment (d × d; or its diagonal, (d,), for
    one-hot ids) in its k largest eigenvalues (increasing to 1; all 1 for a side no token reached); V the
    leading eigenvectors found on the way (d × m, float32; None for a diagonal or a side no token reached), which
    the principal factors of the same moment reuse. A side larger than ``FULL_SPECTRUM_SIDE`` gets its
    ``LEADING_EIGENVALUES`` largest by subspace iteration (d² per vector instead of d³ for all), and the rest of
    its trace spread evenly over the other directions."""
    energy, vectors, _ = _spectrum(moment.float().cpu())
    return energy, vectors


class SideSample:
    """A side's second moment F = Σ_t u_t u_tᵀ over a sample of tokens, held as cheaply as they allow: their vectors
    V (n × d, F = VᵀV) while n < d, then F (d × d, float64); for one-hot ids, their counts (F's diagonal). With
    few tokens (a small split's sample) the spectrum then costs n²·d, not d²·n and d² per eigenvector."""

    def __init__(self):
        self.tokens: Optional[Tensor] = None
        self.moment: Optional[Tensor] = None

    def add(self, tokens: Tensor) -> None:
        """Add a batch's tokens: V (n × d) or an embedding's id counts (d,) (``side_tokens``)."""
        if tokens.dim() == 1 and self.tokens is None and (self.moment is None or self.moment.dim() == 1):
            self.moment = tokens.double() if self.moment is None else self.moment + tokens.double()
        elif tokens.dim() == 2 and self.moment is None:
            self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])
            if self.tokens.shape[0] >= self.tokens.shape[1]:
                self.moment, self.tokens = self.dense(), None
        else:  # F from now on: as many tokens as d, or ids and vectors on one side (a tied embedding and head)
            added = torch.diag(tokens.double()) if tokens.dim() == 1 else (tokens.T @ tokens).double()
            self.moment, self.tokens = self.dense() + added, None

    def dense(self) -> Tensor:
        """F (d × d, float64)."""
        if self.tokens is not None:
            return (self.tokens.T @ self.tokens).double()
        return torch.diag(self.moment) if self.moment.dim() == 1 else self.moment

    def spectrum(self) -> Tuple[np.ndarray, Optional[Tensor]]:
        """(E, V) of F, as ``side_spectrum``. From n < d tokens: G = VVᵀ (n × n) has F's nonzero eigenvalues, and
        F's eigenvector for G's (λ, w) is Vᵀw/√λ (re-orthonormalized); E is 1 from k = n on (F's rank ≤ n)."""
        if self.tokens is None:
            return side_spectrum(self.moment)
        tokens = self.tokens.float().cpu()
        energy, found, values = _spectrum(tokens @ tokens.T)
        energy = np.concatenate([energy, np.ones(tokens.shape[1] - len(energy))])
        if found is None:
            return energy, None
        return energy, _moment_vectors(tokens, values, found, 1e-5)  # 1e-5: float32 round-off

    def leading(self, count: int) -> Optional[Tensor]:
        """F's ``count`` leading eigenvectors (d × count, float64, orthonormal) from n < d tokens: those of
        G = VVᵀ (n × n, float64; ``leading_eigenpairs``, seeded, eigh where count ≥ n/2) mapped to F's as in
        ``spectrum``: n²·d flops and G's eigenpairs instead of d²·count per iteration on F. None where the sample
        is F itself or F has fewer than ``count`` directions (its rank is at most n): F's eigenvectors then come
        from F (``dense``)."""
        if self.tokens is None or count > self.tokens.shape[0]:
            return None
        tokens = self.tokens.double().cpu()
        gram, generator = tokens @ tokens.T, torch.Generator().manual_seed(0)
        values, found = leading_eigenpairs(gram, count, generator, eigh_share=0.5)
        if values.numel() and values[-1] <= values[0] * 1e-10:  # 1e-10: float64 round-off
            return None
        return _moment_vectors(tokens, values, found, 0.0)


def _moment_vectors(tokens: Tensor, values: Tensor, found: Tensor, tolerance: float) -> Tensor:
    """F = VᵀV's eigenvectors Vᵀw/√λ (re-orthonormalized) for G = VVᵀ's eigenpairs (λ, w) with λ > λ_1·``tolerance``
    (the directions F has): F Vᵀw = Vᵀ(VVᵀ)w = λ Vᵀw and ‖Vᵀw‖² = wᵀGw = λ."""
    kept = values > values[0] * tolerance
    return torch.linalg.qr(tokens.T @ found[:, kept] / values[kept].sqrt())[0]


def _spectrum(values: Tensor) -> Tuple[np.ndarray, Optional[Tensor], Optional[Tensor]]:
    """(E, leading eigenvectors, their eigenvalues) of a d × d moment or a (d,) diagonal (``side_spectrum``)."""
    dim = values.shape[0]
    trace = float(values.sum() if values.dim() == 1 else torch.diagonal(values).sum())
    if trace <= 0:
        return np.ones(dim), None, None
    if values.dim() == 1:
        leading, vectors = values.sort(descending=True).values, None
    else:
        count = dim if dim <= FULL_SPECTRUM_SIDE else LEADING_EIGENVALUES
        generator = torch.Generator().manual_seed(0)
        leading, vectors = leading_eigenpairs(values, count, generator, SUBSPACE_ITERATIONS)
    kept = np.minimum((leading.clamp(min=0).double().cumsum(0) / trace).numpy(), 1.0)
    if len(kept) < dim:
        rest = kept[-1] + (1 - kept[-1]) * np.arange(1, dim - len(kept) + 1) / (dim - len(kept))
        kept = np.concatenate([kept, rest])
    return kept, vectors, leading


def spectrum_shapes(
    targets: Sequence[Target], energy: Mapping[Tuple[str, str], np.ndarray], budget: int
) -> Dict[str, Tuple[int, int]]:
    """{name: (k_r, k_c)} of ``targets`` with Σ k_r·k_c ≤ ``budget``, by greedy steps of largest gain in
    E_r(k_r)·E_c(k_c) per dimension (see the module's docstring), each side at most min(d, ``MAX_SIDE_DIMS``);
    ``energy[(name, "rows" or "cols")]`` is E, a side without one keeps k/d."""

    def kept(target: Target, side: str, k: int) -> float:
        curve = energy.get((target.name, side))
        if curve is None:
            return k / target.side(side)[0]
        return 1.0 if k >= len(curve) else float(curve[k - 1])

    shapes = [[1, 1] for _ in targets]
    grown = [0] * len(targets)  # steps taken by each target: its heap entries from before are stale
    used = len(targets)
    heap = []  # (−gain per dimension, position, −side, steps then, cost): ties go as in a scan for the largest

    def push(position: int) -> None:
        target, (k_rows, k_cols) = targets[position], shapes[position]
        rows, cols = kept(target, "rows", k_rows), kept(target, "cols", k_cols)
        if k_rows < min(target.rows, MAX_SIDE_DIMS):
            gain = (kept(target, "rows", k_rows + 1) - rows) * cols / k_cols
            heapq.heappush(heap, (-gain, position, 0, grown[position], k_cols))
        if k_cols < min(target.cols, MAX_SIDE_DIMS):
            gain = rows * (kept(target, "cols", k_cols + 1) - cols) / k_rows
            heapq.heappush(heap, (-gain, position, -1, grown[position], k_rows))

    for position in range(len(targets)):
        push(position)
    while heap:
        _, position, side, steps, cost = heapq.heappop(heap)
        if steps != grown[position] or used + cost > budget:
            continue  # stale, or too large now (the budget left only shrinks)
        shapes[position][-side] += 1
        grown[position] += 1
        used += cost
        push(position)
    return {target.name: (k_rows, k_cols) for target, (k_rows, k_cols) in zip(targets, shapes)}
