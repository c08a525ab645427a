"""The digits LDS harness: a small MLP trained on 500 digits and on random halves, to measure attribution."""

import functools
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from hf_trak.evaluate import lds, make_subsets, model_outputs
from hf_trak.testing.datasets import digits
from hf_trak.traker import TRAKer

NUM_TRAIN, NUM_TARGETS = 500, 100


class DigitsMLP(nn.Module):
    """64 → 32 → 10 classifier of 8×8 digits: ``forward(pixel_values) -> logits``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, pixel_values):
        return self.net(pixel_values)


def digits_splits():
    """(the 500 training digits, the 100 held-out targets) as model inputs."""
    return digits(NUM_TRAIN), digits(NUM_TARGETS, offset=NUM_TRAIN)


def train_mlp(train: Dataset, mask: np.ndarray, seed: int, steps: int = 300) -> DigitsMLP:
    """Full-batch Adam with weight decay on the examples selected by ``mask``."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    rows = train.with_format("torch")[np.flatnonzero(mask)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(rows["pixel_values"]), rows["labels"]).backward()
        optimizer.step()
    return model.eval()


@dataclass
class DigitsLDS:
    """A small classifier (``DigitsMLP``, task ``image_classification``) trained on 500 training digits
    (``checkpoints``: full-data models of several seeds) and on half subsets (``subset_masks``), with the
    margins of the subset models on 100 held-out digits (``subset_outputs``)."""

    train: Dataset
    test: Dataset
    checkpoints: list
    subset_masks: np.ndarray
    subset_outputs: np.ndarray

    def lds_of(self, num_checkpoints: int = None, **traker_kwargs) -> float:
        """LDS of hf_trak's scores with ``traker_kwargs`` (``TRAKArguments`` fields; over the seeds' TRAK,
        ``estimator="trak"``, unless another estimator is named) at the first checkpoints."""
        traker_kwargs.setdefault("estimator", "trak")
        checkpoints = self.checkpoints[:num_checkpoints]
        traker = TRAKer(DigitsMLP(), task="image_classification", save_dir=None, **traker_kwargs)
        traker.featurize(self.train, checkpoints, batch_size=100)
        return lds(traker.score(self.test, batch_size=100), self.subset_masks, self.subset_outputs).mean


@functools.lru_cache(maxsize=1)
def digits_lds(num_subsets: int = 64, num_checkpoints: int = 5) -> DigitsLDS:
    train, test = digits_splits()
    subset_masks = make_subsets(NUM_TRAIN, num_subsets, fraction=0.5, seed=0)
    outputs = [
        model_outputs(train_mlp(train, mask, seed=0), test, task="image_classification") for mask in subset_masks
    ]
    full = np.ones(NUM_TRAIN, dtype=bool)
    checkpoints = [train_mlp(train, full, seed=seed).state_dict() for seed in range(num_checkpoints)]
    return DigitsLDS(train, test, checkpoints, subset_masks, np.stack(outputs))
