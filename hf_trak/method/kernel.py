"""TRAK kernel inversion and scores, as in traker.

For checkpoint m, with train features X_m (n × k), Q_m (n,) and target features T_m (b × k):

    XtX_m = Σ_i x_i x_iᵀ                        accumulated in float64
    λ_m   = lambda_reg, or lambda_scale · tr(XtX_m) / k when lambda_reg is None
    K_m   = (XtX_m + λ_m I)⁻¹ / mean|(XtX_m + λ_m I)⁻¹|     inverted and kept in float64
    τ     = mean_m(X_m K_m T_mᵀ) ⊙ mean_m(Q_m)[:, None]     scores (n × b)

X_m is stored (so featurization can resume and processes can write in parallel), and
Φ = X_m K_m is formed shard by shard once featurizing ends, in float64, and stored
column-scaled in the features' dtype (``column_scale``); scoring computes Φ Tᵀ in float32.

Precision. K has eigenvalues 1/(s_j + λ): up to 1/λ in the directions where XtX has
little or no mass (all of the null space when k > n), while x_i lives in XtX's row
space, so x_iᵀK cancels components of size |x|/λ down to |x|/s. Any float32 rounding
in that chain is amplified by κ = (s_max + λ)/λ, about 10³–10⁴ at the default λ with
k > n (the parity tests in ``tests/test_scores.py`` measure κ up to 9.5e3). Measured
there, as max error / max |score| against float64 scoring of the same stored features:
XtX summed in float32 costs up to 5e-5, K rounded to float32 up to 1.3e-5, X·K in
float32 up to 1.5e-4, and X·(K Tᵀ) in float32 up to 1.3e-4 (with K Tᵀ exact). Hence
XtX, K and Φ = X K in float64 (k × k and shard × k: small next to featurizing); Φ is
well scaled, so Φ Tᵀ in float32 costs ≤ 4e-7. Forming Φ costs n·k² once, at featurize;
a scoring pass costs n·k·T for the scores of T targets.

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

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from hf_trak.store.kernel_file import Matrix, diagonal_blocks  # K and XᵀX whole (k × k) or as their blocks


def resolve_lambda(xtx: Tensor, lambda_reg: Optional[float], lambda_scale: float) -> float:
    """λ as given, or lambda_scale · tr(XtX)/k (``TRAKArguments.lambda_scale``, 0.1 by default)."""
    if lambda_reg is not None:
        return float(lambda_reg)
    return lambda_scale * float(torch.diagonal(xtx).double().sum()) / xtx.shape[0]


def add_gram(xtx: Matrix, features: Tensor, blocks: Sequence[Sequence[int]] = ()) -> None:
    """xtx += XᵀX for a block of features X (rows × k), in float64, in place (``xtx``: k × k float64, or its
    diagonal blocks). ``blocks``: only the diagonal blocks [offset, size], all a block-diagonal K needs:
    rows · Σ_b k_b² flops, not rows · k²."""
    features = features.double()
    for gram, (a, size) in zip(diagonal_blocks(xtx, blocks), blocks or [(0, features.shape[1])]):
        gram += features[:, a : a + size].T @ features[:, a : a + size]


def _inverse(gram: Tensor, lambda_reg: float) -> Tensor:
    """(G + λI)⁻¹ in float64."""
    identity = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.inv(gram.double() + lambda_reg * identity)


def regularized_inverse(xtx: Tensor, lambda_reg: float) -> Tensor:
    """K = (XtX + λI)⁻¹ / mean|(XtX + λI)⁻¹|, float64 (see the module's note on precision)."""
    inverse = _inverse(xtx, lambda_reg)
    return inverse / inverse.abs().mean()


def gram_block_inverse(gram: Tensor, lambda_reg: Optional[float], lambda_scale: float) -> Tuple[Tensor, float]:
    """(G + λ_b I)⁻¹ (float64) and λ_b = lambda_reg, or lambda_scale · tr(G)/k_b (1 for an all-zero block)."""
    lambda_b = resolve_lambda(gram, lambda_reg, lambda_scale)
    lambda_b = lambda_b if lambda_b > 0 else 1.0  # a parameter without gradient
    return _inverse(gram, lambda_b), lambda_b


def mixed_gram(examples: Tensor, tokens: Tensor) -> Tensor:
    """(XᵀX_bb + G_b·tr(XᵀX_bb)/tr(G_b))/2 (float64), ``kernel_from="mixed"``: the examples' Gram matrix of a block,
    whose rank is at most n, averaged with a per-token one G_b (many more terms, but not the loss's: a classifier's
    loss is per example), scaled to the same trace; G_b is K-FAC's A ⊗ B by default (``kernel_shrinkage=1``). On
    the LDS suite (projector seeds 0-4, K=1 / K=5) against kernels from the examples: image 0.158 / 0.253 against
    0.143 / 0.240, text 0.249 / 0.319 against 0.259 / 0.321, text_minilm 0.356 / 0.419 against 0.255 / 0.378; on
    the causal LMs it loses to the per-token kernels (lm 0.522 / 0.603 against 0.586 / 0.653)."""
    trace = float(torch.diagonal(tokens).sum())
    ratio = float(torch.diagonal(examples).sum()) / trace if trace > 0 else 0.0
    return (examples.double() + tokens.double() * ratio) / 2


def kronecker_gram(rows: Tensor, cols: Tensor) -> Tensor:
    """A ⊗ B (float64): K-FAC's approximation of a weight block's per-token Gram matrix (k_r·k_c square, row-major
    like the features) from its projected per-token Kronecker factors A (k_r × k_r) and B (k_c × k_c)."""
    return torch.kron(rows.double(), cols.double())


def shrunk_gram(gram: Tensor, rows: Tensor, cols: Tensor, shrinkage: float) -> Tensor:
    """(1 − α)·G + α·(A ⊗ B)·tr(G)/(tr A · tr B) for one weight block's per-token Gram matrix G (k_r·k_c square,
    row-major like the features) and its projected per-token Kronecker factors A = Σ (P_rᵀu_t)(P_rᵀu_t)ᵀ and
    B = Σ (P_cᵀv_t)(P_cᵀv_t)ᵀ (K-FAC's approximation of G), α = ``shrinkage``, in float64.

    G estimates k_b² entries from the tokens; A ⊗ B has k_r² + k_c² and is what K-FAC inverts. On the LDS
    suite's causal LM (``benchmarks/lds.py``, projector seed 0, with principal factors), α = 0.3 raised the LDS
    from 0.550 to 0.564 at K=1 and from 0.633 to 0.640 at K=5; α = 1 (K-FAC alone in projected space) lost
    0.015 at K=5 in a one-off check."""
    gram = gram.double()
    if not shrinkage:
        return gram
    kronecker = kronecker_gram(rows, cols)
    trace = float(torch.diagonal(rows).double().sum() * torch.diagonal(cols).double().sum())
    if trace <= 0:
        return gram
    return (1 - shrinkage) * gram + shrinkage * kronecker * (float(torch.diagonal(gram).sum()) / trace)


def eigen_block_inverse(
    rows_basis: Tensor, cols_basis: Tensor, eigenvalues: Tensor, lambda_reg: Optional[float], lambda_scale: float
) -> Tuple[Tensor, float]:
    """EK-FAC's inverse in projected space for one weight block (k_r·k_c features, row-major):
    Q diag(1/(Λ + λ_b)) Qᵀ with Q = Q_r ⊗ Q_c the eigenbases of the Kronecker factors and Λ (k_r × k_c) the
    examples' second moments in that basis (Σ_i (Q_rᵀ X_i Q_c)²); λ_b = lambda_reg, or lambda_scale · mean(Λ)
    (= lambda_scale · tr(XᵀX_bb)/k_b, as for the other kernels)."""
    basis = torch.kron(rows_basis.double(), cols_basis.double())
    eigenvalues = eigenvalues.double().reshape(-1)
    lambda_b = float(lambda_reg) if lambda_reg is not None else lambda_scale * float(eigenvalues.mean())
    lambda_b = lambda_b if lambda_b > 0 else 1.0
    return (basis / (eigenvalues + lambda_b)) @ basis.T, lambda_b


def block_diagonal(inverses: Sequence[Tensor], blocks: Sequence[Sequence[int]]) -> Tensor:
    """The k × k matrix with ``inverses[b]`` on block b = (offset, size) of the diagonal, 0 elsewhere."""
    dim = sum(size for _, size in blocks)
    kernel = torch.zeros(dim, dim, dtype=torch.float64, device=inverses[0].device)
    for inverse, (offset, size) in zip(inverses, blocks):
        kernel[offset : offset + size, offset : offset + size] = inverse
    return kernel


def column_scale(xtx: Matrix, kernel: Matrix, num_rows: int, blocks: Sequence[Sequence[int]] = ()) -> Tensor:
    """s_j = RMS over rows of column j of Φ = XK, from ΦᵀΦ = K XᵀX K (no pass over X); 1 where Φ_j = 0.

    Φ is stored as Φ/s so that every column uses the storage dtype's precision: kernels of
    very different scales (per-module blocks) otherwise leave most of Φ below float16's
    smallest normal number (6·10⁻⁵). Scoring multiplies the targets by s instead. ``blocks``: the
    [offset, size] of a block-diagonal K's blocks (per-module kernels; or K and XᵀX kept as those blocks), whose
    diagonal of K XᵀX K is diag(K_b XᵀX_bb K_b) block by block: Σ_b k_b³ flops instead of k³."""
    pairs = zip(diagonal_blocks(kernel, blocks), diagonal_blocks(xtx, blocks))
    squares = torch.cat([((k.double() @ g.double()) * k.double()).sum(1) for k, g in pairs]).clamp(min=0)
    # diag(K XᵀX K), K symmetric
    scale = (squares / max(num_rows, 1)).sqrt()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def target_rms(
    xtx: Matrix, kernel: Matrix, targets: Tensor, num_rows: int, blocks: Sequence[Sequence[int]] = ()
) -> Tensor:
    """σ_j = RMS over the train rows of one checkpoint's scores of target j, ‖X K t_j‖/√n = √(t_jᵀ K XᵀX K t_j / n),
    from XᵀX and K (no pass over X): (T,) float64 for targets (T × k); 1 where σ_j = 0. ``blocks``: the [offset, size]
    of a block-diagonal K's blocks (K and XᵀX may be kept as them), whose σ_j² is Σ_b t_jbᵀ K_b XᵀX_bb K_b t_jb / n:
    Σ_b k_b² memory and flops per target instead of k². A store that keeps a block-diagonal K as its blocks keeps
    XᵀX's diagonal blocks only (``FeatureStore.save_kernel``): σ_j² is then Σ_b ‖X_b K_b t_jb‖²/n, the RMS the scores
    would have if their parts from different blocks were uncorrelated over the rows (on the LDS suite, seeds 0-4,
    K=5, within ±0.003 of the exact σ on every task).

    ``ensemble="normalized"`` divides checkpoint m's scores of target j by σ_mj before the mean over checkpoints,
    so that each checkpoint has one vote per target, whatever the size of the target's gradient there (TRAK's
    mean lets the checkpoints where it is largest decide). On the LDS suite (``benchmarks/lds.py``, K=5,
    projector seeds 0-3) it raised image 0.223 → 0.235 and text 0.305 → 0.312 and left lm at 0.637."""
    kernels = diagonal_blocks(kernel, blocks)
    device = kernels[0].device
    targets = targets.to(device, torch.float64)
    squares = torch.zeros(targets.shape[0], dtype=torch.float64, device=device)
    for k_b, g_b, (a, size) in zip(kernels, diagonal_blocks(xtx, blocks), blocks or [(0, targets.shape[1])]):
        kernel_targets = k_b.double() @ targets[:, a : a + size].T  # k_b × T
        squares += (kernel_targets * (g_b.to(device, torch.float64) @ kernel_targets)).sum(0)
    rms = (squares.clamp(min=0) / max(num_rows, 1)).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def preconditioned(
    features: Tensor, kernel: Matrix, scale: Optional[Tensor] = None, blocks: Sequence[Sequence[int]] = ()
) -> Tensor:
    """Φ = X K (divided column-wise by ``scale``, if given) for a block of train features (rows × k), formed in
    float64 (see the module's note), float32. ``blocks``: a block-diagonal K's [offset, size] blocks (K may be kept
    as them), multiplied one at a time (rows · Σ_b k_b² flops instead of rows · k²)."""
    phi = times_kernel(features, kernel, blocks)
    return (phi if scale is None else phi / scale).float()


def times_kernel(features: Tensor, kernel: Matrix, blocks: Sequence[Sequence[int]] = ()) -> Tensor:
    """X K in float64 for features X (… × k) and a block-diagonal K given whole or as its ``blocks``' diagonal
    blocks, one block at a time (Σ_b k_b² values of K read, none assembled)."""
    kernels = diagonal_blocks(kernel, blocks)
    x = features.to(device=kernels[0].device, dtype=torch.float64)
    layout = blocks or [(0, x.shape[-1])]
    return torch.cat([x[..., a : a + size] @ k.double() for k, (a, size) in zip(kernels, layout)], dim=-1)


# On the CPU, score_block converts Φ to float32 a chunk of rows at a time so that each chunk is
# multiplied while in cache: 2 MiB of rows for a few targets (benchmarks/query.py, n = 200k, k = 2048:
# one target then costs about one read of the store, 2.2x that with whole-shard conversion), 8 MiB
# for blocks of at least SMALL_BLOCK targets (a GEMM, more efficient on larger chunks).
ROW_CHUNK_BYTES, GEMM_ROW_CHUNK_BYTES, SMALL_BLOCK = 2**21, 2**23, 64


def score_block(phis: Sequence[Tensor], target_features: Sequence[Tensor], out_to_loss: Tensor) -> Tensor:
    """mean_m(Φ_m[rows] T_mᵀ) ⊙ Q[rows] for one block of train rows and targets: (rows × b) float32.

    ``phis[m]`` is Φ_m[rows] (stored, in any float dtype, or from ``preconditioned``),
    ``target_features[m]`` T_m (b × k) and ``out_to_loss`` mean_m(Q_m)[rows].
    """
    rows, k = phis[0].shape
    device = phis[0].device
    chunk_bytes = ROW_CHUNK_BYTES if target_features[0].shape[0] < SMALL_BLOCK else GEMM_ROW_CHUNK_BYTES
    chunk = rows if device.type != "cpu" else max(1, chunk_bytes // (4 * k))
    total = torch.zeros(rows, target_features[0].shape[0], device=device)
    for phi, targets in zip(phis, target_features):
        targets = targets.to(device=device, dtype=torch.float32).T.contiguous()
        for start in range(0, rows, chunk):
            total[start : start + chunk].addmm_(phi[start : start + chunk].float(), targets)
    return total.div_(len(phis)).mul_(out_to_loss.to(device)[:, None])


def merge_top_k(
    best: Optional[Tuple[Tensor, Tensor]], scores: Tensor, row_offset: int, k: int, largest: bool
) -> Tuple[Tensor, Tensor]:
    """Running top-k over train rows: merge ``scores`` (rows × b) into ``best`` = (values, indices), each (k' × b).

    NaN scores (rows excluded for non-finite values) rank last either way."""
    if scores.isnan().any():
        scores = scores.nan_to_num(nan=-math.inf if largest else math.inf, posinf=math.inf, neginf=-math.inf)
    values, position = scores.topk(min(k, scores.shape[0]), dim=0, largest=largest)  # the block's own top-k
    indices = position + row_offset
    if best is None:
        return values, indices
    values, indices = torch.cat([best[0], values]), torch.cat([best[1], indices])
    values, position = values.topk(min(k, values.shape[0]), dim=0, largest=largest)
    return values, indices.gather(0, position)
