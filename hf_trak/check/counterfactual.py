"""A counterfactual check: does removing a target's top proponents change the model more than removing others?

For each chosen target j, ``check_counterfactual`` trains the user's model again without the k training
examples of highest score for j, and without k random examples, and compares f(z_j) with that of the model
trained on everything with the same seed: Δ_top = f_without_top − f_all and Δ_random = f_without_random −
f_all, each a mean over ``num_seeds`` seeds. A proponent is an example whose training raised f on the target, so
removing the proponents should lower f (Δ_top < 0) far more than removing random rows does.
Cost: (number of targets + 2) × num_seeds trainings (the random rows of a seed are shared by the targets).
"""

import dataclasses
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from hf_trak.check.retraining import Retrainer
from hf_trak.errors import InvalidArgumentError, check_positive_int


@dataclasses.dataclass
class CounterfactualCheck:
    """Per chosen target (``targets``): f on the full data (``full``), its change without the top-``k``
    proponents (``removed_top``) and without ``k`` random rows (``removed_random``), means over ``num_seeds``."""

    targets: np.ndarray
    k: int
    num_seeds: int
    full: np.ndarray
    removed_top: np.ndarray
    removed_random: np.ndarray

    def rows(self):
        """(target, f on all the data, Δ without the top k, Δ without k random) per target."""
        return list(zip(self.targets.tolist(), self.full, self.removed_top, self.removed_random))

    def __str__(self) -> str:
        lines = [f"Removing each target's top-{self.k} proponents against {self.k} random rows (mean of "
                 f"{self.num_seeds} seeds): change of f"]  # fmt: skip
        for target, full, top, random in self.rows():
            lines.append(f"  target {target}: f {full:+.3f}; without the proponents {top:+.3f}; without random rows "
                         f"{random:+.3f}")  # fmt: skip
        return "\n".join(lines)


def check_counterfactual(
    scores: np.ndarray, retrainer: Retrainer, targets: Sequence[int], k: int = 10, num_seeds: int = 3, seed: int = 0
) -> CounterfactualCheck:
    """The counterfactual check of ``targets`` (rows of ``retrainer``'s targets) with ``scores`` (n × T)."""
    check_positive_int("k", k)
    check_positive_int("num_seeds", num_seeds)
    targets = np.asarray(list(targets), dtype=np.int64)
    n, num_targets = scores.shape
    if not len(targets) or targets.min() < 0 or targets.max() >= num_targets:
        raise InvalidArgumentError(
            f"targets are rows of the target split, 0 to {num_targets - 1}: got {targets.tolist()}."
        )
    if k >= n:
        raise InvalidArgumentError(f"k = {k} would remove the whole train split of {n} rows: choose a smaller k.")
    everything = np.arange(n)
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=0, kind="stable")[:k]  # k × T
    full, without_top, without_random = [], [], []
    runs = tqdm(total=num_seeds * (len(targets) + 2), desc="Counterfactual check: retraining", unit="model")
    with runs:
        for number in range(num_seeds):
            run_seed = seed + number
            full.append(retrainer.outputs(f"all-seed{run_seed}", everything, run_seed))
            runs.update()
            random_rows = np.random.default_rng(run_seed).choice(n, size=k, replace=False)
            kept = np.setdiff1d(everything, random_rows)
            without_random.append(retrainer.outputs(f"random{k}-seed{run_seed}", kept, run_seed)[targets])
            runs.update()
            outputs = []
            for target in targets:
                kept = np.setdiff1d(everything, top[:, target])
                outputs.append(retrainer.outputs(f"top{k}-target{target}-seed{run_seed}", kept, run_seed)[target])
                runs.update()
            without_top.append(outputs)
    full = np.mean(full, axis=0)[targets]
    return CounterfactualCheck(
        targets=targets,
        k=k,
        num_seeds=num_seeds,
        full=full,
        removed_top=np.mean(without_top, axis=0) - full,
        removed_random=np.mean(without_random, axis=0) - full,
    )
