"""Checking attribution on the user's own task: the linear datamodeling score (LDS) of its scores.

``check_lds`` trains the user's model again on ``num_subsets`` random subsets of ``fraction`` of its train
split (``Retrainer``: the run's own training arguments), evaluates f on held-out targets, and correlates
the outputs with what the scores predict (``hf_trak.evaluate.lds``). It reports the mean over targets with a
bootstrap interval (targets resampled) next to the LDS of random scores on the same retrained models: the
scores mean something on this task when the two intervals are far apart. Cost: ``num_subsets`` trainings of
``fraction`` of the data (or of ``max_steps`` each).
"""

import dataclasses
from typing import Tuple

import numpy as np
from tqdm.auto import tqdm

from hf_trak.check.retraining import Retrainer
from hf_trak.errors import InvalidArgumentError, check_positive_int
from hf_trak.evaluate import lds, make_subsets


@dataclasses.dataclass
class LDSCheck:
    """LDS of the scores (``lds``, mean over targets, ``interval``: 95% bootstrap interval) and of random scores of
    the same shape (``random_lds``, ``random_interval``), over ``num_subsets`` models trained on ``fraction`` of
    the train split; ``per_target``: each target's Spearman ρ."""

    lds: float
    interval: Tuple[float, float]
    random_lds: float
    random_interval: Tuple[float, float]
    per_target: np.ndarray
    num_subsets: int
    fraction: float

    def __str__(self) -> str:
        return (
            f"LDS {self.lds:.3f} (95% interval {self.interval[0]:.3f} to {self.interval[1]:.3f}) over "
            f"{self.num_subsets} models trained on {self.fraction:.0%} of the train split; random scores: "
            f"{self.random_lds:.3f} ({self.random_interval[0]:.3f} to {self.random_interval[1]:.3f})"
        )


def bootstrap_interval(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """The 2.5% and 97.5% quantiles of the mean of ``values`` resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(num_resamples, len(values)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def check_lds(
    scores: np.ndarray, retrainer: Retrainer, num_subsets: int = 32, fraction: float = 0.5, seed: int = 0
) -> LDSCheck:
    """The LDS of ``scores`` (n × T: the train split of ``retrainer`` against its targets) on the user's task.

    Subset s is trained with seed ``seed + s`` and kept as ``subset-<s>`` in ``retrainer.folder``: a stopped check
    resumes, and more subsets extend one already made."""
    check_positive_int("num_subsets", num_subsets)
    if not 0 < fraction < 1:
        raise InvalidArgumentError(
            f"fraction is the share of the train split each model sees, in (0, 1), not {fraction}."
        )
    masks = make_subsets(scores.shape[0], num_subsets, fraction, seed=seed)
    outputs = np.stack(
        [
            retrainer.outputs(f"subset-{number:04d}", np.flatnonzero(mask), seed + number)
            for number, mask in enumerate(tqdm(masks, desc="Checking attribution: retraining", unit="model"))
        ]
    )
    measured = lds(scores, masks, outputs)
    random = lds(np.random.default_rng([seed, 1]).normal(size=scores.shape), masks, outputs)  # not the masks' stream
    return LDSCheck(
        lds=measured.mean,
        interval=bootstrap_interval(measured.per_target, seed=seed),
        random_lds=random.mean,
        random_interval=bootstrap_interval(random.per_target, seed=seed),
        per_target=measured.per_target,
        num_subsets=num_subsets,
        fraction=fraction,
    )
