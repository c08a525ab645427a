"""Linear datamodeling score (LDS), the standard check that attributions are meaningful.

Train models on S random subsets of the training set (masks M, S × n), evaluate the model
output function f on each target with each (outputs Y, S × m). An attribution τ (n × m)
predicts f on target j for subset s as Σ_i M_si τ_ij; LDS_j is the Spearman correlation,
over subsets, of predicted and actual outputs, and LDS is its mean over targets
(Park et al., 2023, Section 2). Random scores give LDS ≈ 0; a perfect linear datamodel
gives 1.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidArgumentError
from hf_trak.hf.checkpoints import Checkpoint
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.model_outputs import AutoModelOutput, eval_mode


@dataclass
class LDSResult:
    """``mean``: LDS averaged over targets; ``per_target``: Spearman ρ of each target (m,)."""

    mean: float
    per_target: np.ndarray


def make_subsets(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks (num_subsets × num_train), each selecting ``round(fraction · n)`` examples."""
    rng = np.random.default_rng(seed)
    size = int(round(fraction * num_train))
    masks = np.zeros((num_subsets, num_train), dtype=bool)
    for mask in masks:
        mask[rng.choice(num_train, size=size, replace=False)] = True
    return masks


def lds(scores: np.ndarray, subset_masks: np.ndarray, subset_outputs: np.ndarray) -> LDSResult:
    """LDS of ``scores`` (n × m) given ``subset_masks`` (S × n) and ``subset_outputs`` (S × m)."""
    scores, masks, outputs = np.asarray(scores, np.float64), np.asarray(subset_masks), np.asarray(subset_outputs)
    if masks.shape[1] != scores.shape[0] or outputs.shape != (masks.shape[0], scores.shape[1]):
        raise InvalidArgumentError(
            f"Shapes do not agree: scores {scores.shape} (n × m), subset_masks {masks.shape} (S × n), "
            f"subset_outputs {outputs.shape} (S × m)."
        )
    predicted = masks.astype(np.float64) @ scores
    ranked_predicted = rankdata(predicted, axis=0)
    ranked_outputs = rankdata(outputs, axis=0)
    ranked_predicted -= ranked_predicted.mean(0)
    ranked_outputs -= ranked_outputs.mean(0)
    denominator = np.sqrt((ranked_predicted**2).sum(0) * (ranked_outputs**2).sum(0))
    per_target = np.where(
        denominator > 0, (ranked_predicted * ranked_outputs).sum(0) / np.where(denominator > 0, denominator, 1), 0.0
    )
    return LDSResult(float(per_target.mean()), per_target)


def model_outputs(
    model: nn.Module,
    dataset,
    task=None,
    checkpoint: Optional[Checkpoint] = None,
    batch_size: int = 64,
    device=None,
    contrast=None,
    data_collator=None,
) -> np.ndarray:
    """f(z_j; θ) of each example of ``dataset`` (m,), at ``checkpoint`` (default: the model's own weights).

    Tasks with a contrast set (CLIP) draw it from ``contrast``, the train split (the rows TRAK's f draws it from:
    ``TRAKer``'s train sampler), or from ``dataset`` itself when it is not given. ``data_collator`` batches the
    rows of both (default: stacked, ragged columns padded).
    """
    task = AutoModelOutput.resolve(model, task)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    source = ExampleSource.for_model(dataset, model, task, data_collator)

    def sampler(num_examples: int, seed: int) -> dict:  # read only by a task with a contrast set
        drawn_from = source if contrast is None else ExampleSource.for_model(contrast, model, task, data_collator)
        return drawn_from.sample(num_examples, seed)

    view = FeatureMap(model, task, None, device).at(model if checkpoint is None else checkpoint, 0, sampler)
    with eval_mode(model):
        return torch.cat([view.outputs(batch).cpu() for batch in source.batches(batch_size)]).double().numpy()
