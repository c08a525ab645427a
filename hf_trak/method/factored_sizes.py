"""How the factored projector divides k among the projected matrices (``FactoredGradientProjector``).

Matrix l (r × c) gets a share b_l ∝ rc of the dimensions (at least one; p: all differentiated
elements), split as k_r ≈ √(b_l r/c), k_c ≈ b_l / k_r; what flooring leaves is added so that the total
is ``proj_dim`` (``filled_sizes``). For kernels built from per-token gradients the split is
k_r ≈ k_c ≈ √b_l (``square``): a token's gradient u vᵀ is rank one, so its projected inner products are
products of two JL estimates, ⟨P_rᵀu, P_rᵀu'⟩⟨P_cᵀv, P_cᵀv'⟩, with relative variance ≈ 1/k_r + 1/k_c,
least for equal sides at a given k_r·k_c. The first store formats used ``legacy_sizes``.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from hf_trak.errors import InvalidArgumentError


@dataclass
class Target:
    """One projected matrix: a weight (rows × cols) or a bias (d_out × 1), and its place in the features."""

    name: str
    rows: int
    cols: int
    k_rows: int = 0
    k_cols: int = 0
    offset: int = 0

    @property
    def size(self) -> int:
        return self.k_rows * self.k_cols

    def side(self, side: str) -> Tuple[int, int]:
        """(d, k) of one side, "rows" or "cols": its dimension and its projected dimension."""
        return (self.rows, self.k_rows) if side == "rows" else (self.cols, self.k_cols)


def legacy_sizes(targets: Sequence[Target], proj_dim: int, fallback_numel: int) -> int:
    """Sizes of the first store formats (``hf_trak.store.versions``; total at most proj_dim, often below):
    b_l = max(1, proj_dim·rc/p). Sets each target's k_rows, k_cols; returns the fallback block's size."""
    total_numel = sum(t.rows * t.cols for t in targets) + fallback_numel
    for target in targets:
        budget = max(1.0, proj_dim * target.rows * target.cols / total_numel)
        k_rows = int(math.sqrt(budget * target.rows / target.cols))
        target.k_rows = max(1, min(target.rows, k_rows, int(budget)))
        target.k_cols = max(1, min(target.cols, int(budget // target.k_rows)))
    return max(1, int(proj_dim * fallback_numel / total_numel))


def filled_sizes(targets: Sequence[Target], proj_dim: int, fallback_numel: Optional[int], square: bool) -> int:
    """Sizes summing to ``proj_dim``: each matrix (and the dense fallback block) gets at least one
    dimension and otherwise a share b_l ∝ r·c of the rest (water-filling), k_r ≈ √(b_l r/c) (``square``:
    √b_l), k_c = ⌊b_l/k_r⌋; what flooring leaves goes to the fallback block, else one row or column at a
    time to the matrices that can take it (``square``: the shorter side first). ``fallback_numel``: the dense
    fallback block's parameter count (None: no such block). Sets each target's k_rows, k_cols; returns the
    fallback block's size."""
    fallback = fallback_numel is not None
    sizes = [t.rows * t.cols for t in targets] + ([fallback_numel] if fallback else [])
    minimum = len(sizes)
    if proj_dim < minimum:
        raise InvalidArgumentError(
            f"proj_dim={proj_dim} is too small for {minimum} factored blocks (one dimension each): "
            f"use proj_dim >= {minimum}."
        )
    budgets, floor = [0.0] * len(sizes), set()
    while True:  # blocks whose proportional share is below 1 get exactly 1
        free = [i for i in range(len(sizes)) if i not in floor]
        rest = proj_dim - len(floor)
        total = sum(sizes[i] for i in free)
        small = [i for i in free if rest * sizes[i] / total < 1]
        if not small:
            break
        floor.update(small)
    for i in range(len(sizes)):
        budgets[i] = 1.0 if i in floor else rest * sizes[i] / total
    for target, budget in zip(targets, budgets):
        k_rows = int(math.sqrt(budget if square else budget * target.rows / target.cols))
        target.k_rows = max(1, min(target.rows, k_rows, int(budget)))
        target.k_cols = max(1, min(target.cols, int(budget // target.k_rows)))
    fallback_dim = max(1, int(budgets[-1])) if fallback else 0
    left = proj_dim - sum(t.size for t in targets) - fallback_dim
    if fallback:
        return fallback_dim + left
    by_size = sorted(targets, key=lambda t: -t.rows * t.cols)
    progress = True
    while left > 0 and progress:
        progress = False
        for target in by_size:
            if square and target.k_rows < min(target.k_cols, target.rows) and target.k_cols <= left:
                target.k_rows += 1
                left -= target.k_cols
                progress = True
            elif target.k_cols < target.cols and target.k_rows <= left:
                target.k_cols += 1
                left -= target.k_rows
                progress = True
            elif target.k_rows < target.rows and target.k_cols <= left:
                target.k_rows += 1
                left -= target.k_cols
                progress = True
            if left == 0:
                break
    return fallback_dim
