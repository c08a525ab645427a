"""scikit-learn's digits (real data shipped on disk) as a raw image split, for the demo, examples and tests."""

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image


def digit_images(start: int, stop: int) -> Dataset:
    """Rows ``[start, stop)`` of scikit-learn's digits as a raw split: ``image`` (8×8 grayscale PIL), ``label``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The digits come from scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    pixels = (digits.images[start:stop] * 255 / 16).round().astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict({"image": list(pixels), "label": digits.target[start:stop]}, features)
