"""Principal factors of the factored projector: the leading eigenvectors of a side's per-token second moment.

A side of dimension d ≤ ``MAX_PRINCIPAL_SIDE`` with k < d gets P = [V_a, (I − V_a V_aᵀ) R]: V_a the
a = round(s·k) leading eigenvectors of its per-token second moment F = Σ_{i,t} u_t u_tᵀ (K-FAC's factor,
over a sample of the train split), and the rest of the space projected by a Rademacher R (d × (k − a),
entries ±1/√(k − a)). (I − V_a V_aᵀ) R has the second moments of V_rest R' (V_rest the other eigenvectors,
R' a (d − a) × (k − a) Rademacher), so E[P Pᵀ] = V_a V_aᵀ + (I − V_a V_aᵀ) = I still: an unbiased
projection that keeps the directions where the tokens' gradients have most energy exactly (LoGra's PCA
initialization, with a random rest).
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

MAX_PRINCIPAL_SIDE = 4096  # larger sides (a vocabulary's one-hot side) keep a random factor: F would be d × d


def leading_eigenpairs(
    matrix: Tensor, count: int, generator: torch.Generator, iterations: int = 8, eigh_share: float = 1.0
) -> Tuple[Tensor, Tensor]:
    """(values (count,), vectors (d × count, orthonormal)): the ``count`` leading eigenpairs of a symmetric PSD
    matrix (d × d), largest first, by subspace iteration on count + 8 seeded Gaussian vectors and a Rayleigh–Ritz
    step (Halko et al.): d²·(count + 8) flops per iteration, instead of eigh's d³ (a side of a large layer has d
    in the thousands and count in the tens). Where count + 8 ≥ ``eigh_share``·d: eigh (on 2 CPU threads it is the
    faster from about d/2 on)."""
    dim = matrix.shape[0]
    if count == 0:
        return matrix.new_zeros(0), matrix.new_zeros(dim, 0)
    width = min(dim, count + 8)
    if width >= eigh_share * dim:
        values, vectors = torch.linalg.eigh(matrix)
        return values.flip(0)[:count], vectors.flip(1)[:, :count]
    basis = torch.linalg.qr(torch.randn(dim, width, generator=generator, dtype=matrix.dtype))[0]
    for _ in range(iterations):
        basis = torch.linalg.qr(matrix @ basis)[0]
    values, vectors = torch.linalg.eigh(basis.T @ matrix @ basis)
    return values.flip(0)[:count], basis @ vectors.flip(1)[:, :count]


def principal_count(k: int, dim: int, share: float) -> int:
    """a, the leading eigenvectors in a side's principal factor: min(k, round(share·k)) where k < d, 0 where the
    side is kept whole (k ≥ d)."""
    return min(k, round(share * k)) if k < dim else 0


def principal_factor(
    moment: Optional[Tensor],
    dim: int,
    k: int,
    share: float,
    generator: torch.Generator,
    leading: Optional[Tensor] = None,
) -> Tensor:
    """P = [V_a, (I − V_a V_aᵀ) R] (d × k, float32) from a side's second moment F (d × d; None: a side no token
    reached, any basis): a = min(k, round(share·k)) leading eigenvectors (the first a columns of ``leading``, F's
    leading eigenvectors found before, where it has that many), R a d × (k − a) Rademacher (±1/√(k − a)) drawn
    from ``generator`` after them."""
    count = principal_count(k, dim, share)
    if leading is not None and leading.shape[1] >= count:
        factor = leading[:, :count].double().cpu()
    else:
        moment = torch.zeros(dim, dim) if moment is None else moment
        factor = leading_eigenpairs(moment.double().cpu(), count, generator)[1]
    if count < k:
        signs = torch.randint(0, 2, (dim, k - count), generator=generator, dtype=torch.int8)
        rest = (signs.double() * 2 - 1) / math.sqrt(k - count)
        factor = torch.cat([factor, rest - factor @ (factor.T @ rest)], dim=1)
    return factor.float().contiguous()
