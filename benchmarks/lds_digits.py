"""LDS on scikit-learn's digits: the attribution-quality harness of the tests and sweeps.

A small classifier (``DigitsMLP``, inputs ``pixel_values``, output logits, task
``image_classification``) is trained on subsets of 500 training digits; ``subset_outputs``
is the margin of each subset model on 100 held-out digits. ``lds_of(traker_kwargs)``
featurizes the full-data checkpoints with hf_trak and returns the LDS of its scores.

    python benchmarks/lds_digits.py   # LDS of hf_trak settings vs. random scores
"""

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from torch import nn

from hf_trak import TRAKer, kernel
from hf_trak.evaluate import lds, make_subsets, model_outputs

NUM_TRAIN, NUM_TARGETS = 500, 100


class DigitsMLP(nn.Module):
    """64 → 32 → 10 classifier of 8×8 digits: ``forward(pixel_values) -> logits``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, pixel_values):
        return self.net(pixel_values)


def digits_splits():
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    train = Dataset.from_dict({"pixel_values": images[:NUM_TRAIN], "labels": data.target[:NUM_TRAIN]})
    test = Dataset.from_dict(
        {
            "pixel_values": images[NUM_TRAIN : NUM_TRAIN + NUM_TARGETS],
            "labels": data.target[NUM_TRAIN : NUM_TRAIN + NUM_TARGETS],
        }
    )
    return train, test


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
    train: Dataset
    test: Dataset
    checkpoints: list
    subset_masks: np.ndarray
    subset_outputs: np.ndarray

    def lds_of(self, num_checkpoints: int = None, **traker_kwargs) -> float:
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


def main():
    logging.basicConfig(level=logging.WARNING)
    setup = digits_lds()
    random_lds = lds(
        np.random.default_rng(0).normal(size=(NUM_TRAIN, NUM_TARGETS)), setup.subset_masks, setup.subset_outputs
    ).mean
    print(f"random scores: LDS {random_lds:+.3f}")
    default_scale = kernel.LAMBDA_SCALE
    for proj_dim in (256, 1024):
        print(
            f"proj_dim {proj_dim:5d}  {'lambda = 0 (traker default)':36s} LDS "
            f"{setup.lds_of(proj_dim=proj_dim, lambda_reg=0.0, dtype=torch.float32):+.3f}"
        )
        for scale in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
            kernel.LAMBDA_SCALE = scale  # the sweep's x-axis: lambda = scale * tr(XtX)/k
            value = setup.lds_of(proj_dim=proj_dim, dtype=torch.float32)
            label = f"lambda = {scale:g} * tr(XtX)/k" + (" (default)" if scale == default_scale else "")
            print(f"proj_dim {proj_dim:5d}  {label:36s} LDS {value:+.3f}")
        kernel.LAMBDA_SCALE = default_scale
    for m in (1, 3, 5):
        value = setup.lds_of(num_checkpoints=m, proj_dim=1024)
        print(f"proj_dim 1024, default lambda, {m} checkpoint(s): LDS {value:+.3f}")


if __name__ == "__main__":
    main()
