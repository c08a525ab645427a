"""Small splits made here or shipped by packages (no downloads): digits, token sequences, LM and CLIP rows."""

import numpy as np
import torch
from datasets import Dataset

from hf_trak.demo.digits import load_digits
from hf_trak.testing.models import VOCAB


def digits(n: int, offset: int = 0) -> Dataset:
    """``n`` digits from row ``offset`` as model inputs: ``pixel_values`` (1 × 8 × 8, in [0, 1]) and ``labels``."""
    return load_digits(offset, offset + n, pixel_values=True)


def digit_images(n: int, offset: int = 0) -> Dataset:
    """``n`` digits from row ``offset`` as a raw split: ``image`` (8×8 grayscale PIL) and ``label``."""
    return load_digits(offset, offset + n)


def token_sequences(n: int, seed: int = 0, num_labels: int = 3, min_len: int = 3, max_len: int = 9) -> Dataset:
    """Ragged token sequences with an ``attention_mask`` of ones, a class label and a raw text column."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    ids = [rng.integers(3, VOCAB, size=length).tolist() for length in lengths]
    return Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": rng.integers(0, num_labels, size=n).tolist(),
            "text": [" ".join(map(str, x)) for x in ids],
        }
    )


def lm_sequences(n: int, seed: int = 0) -> Dataset:
    """Causal-LM examples: ``labels`` = ``input_ids`` with the first two tokens masked (-100)."""
    data = token_sequences(n, seed=seed).remove_columns(["labels", "text"])
    return data.map(lambda row: {"labels": [-100, -100] + row["input_ids"][2:]})


def clip_pairs(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    data = token_sequences(n, seed=seed).remove_columns(["labels", "text"])
    images = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    return data.add_column("pixel_values", images.tolist())


def clip_collator(rows: list) -> dict:
    """A user's ``Trainer`` collator for ``clip_pairs``: captions padded with 0, and ``return_loss=True``
    (CLIPModel computes its loss only when asked)."""
    width = max(len(row["input_ids"]) for row in rows)
    padded = {name: torch.tensor([list(row[name]) + [0] * (width - len(row[name])) for row in rows])
              for name in ("input_ids", "attention_mask")}  # fmt: skip
    return {**padded, "pixel_values": torch.tensor([row["pixel_values"] for row in rows]), "return_loss": True}
