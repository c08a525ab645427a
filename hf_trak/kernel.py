"""TRAK kernel inversion and scores, as in traker.

For checkpoint m, with train features X_m (n × k), Q_m (n,) and target features T_m (b × k):

    XtX_m = Σ_i x_i x_iᵀ                        accumulated in float32
    λ_m   = lambda_reg, or LAMBDA_SCALE · tr(XtX_m) / k when lambda_reg is None
    K_m   = (XtX_m + λ_m I)⁻¹ / mean|(XtX_m + λ_m I)⁻¹|     inverted in float64
    τ     = mean_m(X_m K_m T_mᵀ) ⊙ mean_m(Q_m)[:, None]     scores (n × b)

X_m is stored (so featurization can resume and processes can write in parallel) and
Φ = X_m K_m is formed block by block when scoring. The order matters: when k > n, K Tᵀ
has components of size 1/λ in the null space of XtX that X (K Tᵀ) cancels in float32,
while X K stays well scaled. Forming Φ costs n·k² per scoring pass, next to n·k·b for
the scores, so targets are scored in blocks of b ≥ k by default.

The rescaling of K by its mean absolute value is traker's (it keeps Φ in fp16 range);
it multiplies all scores of a checkpoint by one constant.

Why a data-derived λ: multiclass margin gradients of small models are rank deficient
(and with k > n so is XtX), so traker's λ = 0 inverts directions with no signal and the
scores are close to random. λ proportional to the mean eigenvalue tr(XtX)/k is invariant
to the scale of the gradients. ``benchmarks/lds_digits.py`` sweeps the scale on digits
(500 train, 100 targets, 5 checkpoints): at k = 1024 LDS is 0.04 for λ = 0, 0.58 for
0.01·tr/k, 0.72 for 0.1·tr/k, 0.77 for 1·tr/k; at k = 256 it is 0.58, 0.68, 0.73, 0.66.
0.1 is the best compromise across k.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

LAMBDA_SCALE = 0.1


def resolve_lambda(xtx: Tensor, lambda_reg: Optional[float]) -> float:
    """λ as given, or LAMBDA_SCALE · tr(XtX)/k."""
    if lambda_reg is not None:
        return float(lambda_reg)
    return LAMBDA_SCALE * float(torch.diagonal(xtx).double().sum()) / xtx.shape[0]


def regularized_inverse(xtx: Tensor, lambda_reg: float) -> Tensor:
    """K = (XtX + λI)⁻¹ / mean|(XtX + λI)⁻¹|, float32, computed in float64."""
    regularized = xtx.double() + lambda_reg * torch.eye(xtx.shape[0], dtype=torch.float64, device=xtx.device)
    inverse = torch.linalg.inv(regularized)
    return (inverse / inverse.abs().mean()).float()


def score_block(
    train_features: Sequence[Tensor], kernels: Sequence[Tensor], target_features: Sequence[Tensor], out_to_loss: Tensor
) -> Tensor:
    """mean_m((X_m[rows] K_m) T_mᵀ) ⊙ Q[rows] for one block of train rows: (rows × b) float32.

    ``train_features[m]`` is X_m[rows] (any float dtype), ``kernels[m]`` K_m (k × k),
    ``target_features[m]`` T_m (b × k), ``out_to_loss`` mean_m(Q_m)[rows].
    """
    total = None
    for features, kernel, targets in zip(train_features, kernels, target_features):
        block = (features.to(device=kernel.device, dtype=torch.float32) @ kernel) @ targets.T
        total = block if total is None else total.add_(block)
    return total.div_(len(train_features)).mul_(out_to_loss.to(total.device)[:, None])


def merge_top_k(
    best: Optional[Tuple[Tensor, Tensor]], scores: Tensor, row_offset: int, k: int, largest: bool
) -> Tuple[Tensor, Tensor]:
    """Running top-k over train rows: merge ``scores`` (rows × b) into ``best`` = (values, indices), each (k' × b)."""
    indices = torch.arange(row_offset, row_offset + scores.shape[0], device=scores.device)[:, None].expand_as(scores)
    if best is not None:
        scores = torch.cat([best[0], scores])
        indices = torch.cat([best[1], indices])
    values, position = scores.topk(min(k, scores.shape[0]), dim=0, largest=largest)
    return values, indices.gather(0, position)
