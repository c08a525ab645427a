"""scikit-learn's 8×8 digits (real data shipped on disk): the demo's, the examples' and the tests' one loader."""

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image

from hf_trak.errors import MissingDependencyError


def load_digits(start: int, stop: int, pixel_values: bool = False) -> Dataset:
    """Rows ``[start, stop)`` of scikit-learn's digits: a raw split, ``image`` (8×8 grayscale PIL) and ``label``
    (a ``ClassLabel``), or with ``pixel_values=True`` model inputs, ``pixel_values`` (1 × 8 × 8 float32 in
    [0, 1]) and ``labels``."""
    try:
        from sklearn import datasets
    except ImportError as error:
        raise MissingDependencyError("The digits come from scikit-learn: pip install scikit-learn") from error
    digits = datasets.load_digits()
    if pixel_values:
        images = (digits.images[start:stop] / 16.0).astype(np.float32)[:, None]
        return Dataset.from_dict({"pixel_values": images, "labels": digits.target[start:stop]})
    pixels = (digits.images[start:stop] * 255 / 16).round().astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict({"image": list(pixels), "label": digits.target[start:stop]}, features)
