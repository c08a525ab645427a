"""A split checked before any forward pass, in one pass over its rows, and the hash of each row.

Each row must have

* ``labels`` that are integers the head accepts (``task.label_space``): classes in
  [0, num_labels) for a classifier, token ids in [0, vocab_size) or −100 for a causal LM;
* finite floating-point inputs (``on_nonfinite="exclude"`` lists the rows instead of refusing);
* no more tokens than the model has positions (``max_position_embeddings``).

Otherwise ``InvalidInputError`` names the column, the row and the value, and the fix.

The row hash h_i (uint64, blake2b) covers the row's model inputs and labels: column names
in order, shapes and values, integers read as int64 and floats as float64, so the format a
split is read in (numpy, torch, lists, a DataLoader) does not change it. The hashes of a
split identify its rows in order (``hf_trak.store.provenance``).
"""

import hashlib
import logging
from typing import List, NamedTuple, Optional

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidInputError
from hf_trak.method.model_outputs import AbstractModelOutput, LabelSpace

logger = logging.getLogger(__name__)

POSITION_LIMITS = ("max_position_embeddings", "n_positions")


class SplitScan(NamedTuple):
    """What one pass over a split found: each row's hash, and the rows with non-finite inputs."""

    row_hashes: np.ndarray  # (n,) uint64
    nonfinite_rows: List[int]
    longest: int = 0  # the most tokens (input_ids) of a row, 0 without input_ids


def row_hash(row: dict) -> int:
    """h_i: a 64-bit hash of the row's values, independent of the format they were read in."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(row):
        value = _canonical(row[name])
        digest.update(f"{name}:{value.shape}:{value.dtype.str}:".encode())
        digest.update(value.tobytes())
    return int.from_bytes(digest.digest(), "little")


def _canonical(value) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind in "biu":
        return np.ascontiguousarray(value, dtype=np.int64)
    if value.dtype.kind in "fc":
        return np.ascontiguousarray(value, dtype=np.float64 if value.dtype.kind == "f" else np.complex128)
    return np.frombuffer(repr(value.tolist()).encode(), dtype=np.uint8)


def max_positions(model: nn.Module) -> Optional[tuple]:
    """``(the most tokens a sequence may have, the config attribute that says so)``, or None."""
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "text_config", None)):
        for name in POSITION_LIMITS:
            value = getattr(holder, name, None)
            if isinstance(value, int) and value > 0:
                return value, name
    return None


def scan_split(
    source: ExampleSource,
    task: AbstractModelOutput,
    model: nn.Module,
    split: str = "train",
    on_nonfinite: str = "error",
    show_progress: bool = True,
) -> SplitScan:
    """Check every row of ``source`` (see the module docstring) and hash it; ``split`` names it in errors."""
    labels = task.label_space(model)
    positions = max_positions(model)
    hashes = np.empty(len(source), dtype=np.uint64)
    nonfinite, float_labels, longest = [], None, 0
    rows = tqdm(source.rows(), total=len(source), desc=f"Checking the {split} split", unit="row",
                disable=None if show_progress else True)  # fmt: skip
    for index, row in enumerate(rows):
        if labels is not None and "labels" in row:
            _check_labels(row["labels"], labels, index, split)
            if float_labels is None and row["labels"].dtype.kind == "f":
                float_labels = (index, row["labels"].reshape(-1)[:1].tolist(), row["labels"].dtype)
        if "input_ids" in row:
            longest = max(longest, int(row["input_ids"].shape[-1]) if row["input_ids"].ndim else 1)
            if positions is not None:
                _check_length(row["input_ids"], positions, index, split)
        bad = [name for name, value in row.items() if value.dtype.kind in "fc" and not np.isfinite(value).all()]
        if bad and on_nonfinite == "error":
            raise InvalidInputError(
                f"Column {bad[0]!r}, row {index} of the {split} split holds NaN or inf: fix or drop that row, or "
                "pass on_nonfinite='exclude' (hf-trak: --on-nonfinite exclude) to give it NaN scores."
            )
        if bad:
            nonfinite.append(index)
        hashes[index] = row_hash(row)
    if float_labels is not None:
        index, value, dtype = float_labels
        raise InvalidInputError(
            f"Column 'labels', row {index} of the {split} split: {value[0] if value else value!r} is not an integer "
            f"label (the column holds {dtype}): labels must be integers ({labels.noun}s); cast the column, e.g. "
            "dataset.cast_column('labels', Value('int64'))."
        )
    if nonfinite:
        logger.warning("%d row(s) of the %s split hold NaN or inf and are excluded: %s", len(nonfinite), split,
                       nonfinite[:20])  # fmt: skip
    return SplitScan(hashes, nonfinite, longest)


def _check_labels(value: np.ndarray, space: LabelSpace, index: int, split: str) -> None:
    """Refuse labels that are not integers (floats holding integers are refused by ``scan_split``
    at the end, so that a fractional value anywhere is named first) or out of ``space``."""
    flat = value.reshape(-1)
    if value.dtype.kind not in "iuf":
        raise InvalidInputError(
            f"Column 'labels', row {index} of the {split} split: {value.tolist()!r} is not an integer label (the "
            f"column holds {value.dtype}): labels must be integers ({space.noun}s)."
        )
    if value.dtype.kind == "f":
        fractional = flat[~(np.isfinite(flat) & (flat == np.round(flat)))]
        if fractional.size:
            raise InvalidInputError(
                f"Column 'labels', row {index} of the {split} split: {fractional[0].item()!r} is not an integer "
                f"label (the column holds {value.dtype}): labels must be integers ({space.noun}s)."
            )
    bad = (flat < 0) | (flat >= space.size)
    if space.ignore_index is not None:
        bad &= flat != space.ignore_index
    if bad.any():
        ignored = f", or {space.ignore_index} to ignore a position" if space.ignore_index is not None else ""
        raise InvalidInputError(
            f"Column 'labels', row {index} of the {split} split: {flat[bad][0].item()} is not a {space.noun} "
            f"({space.size_name}={space.size}: labels are 0..{space.size - 1}{ignored}). Fix the labels, or use "
            f"the model they were made for."
        )


def _check_length(input_ids: np.ndarray, positions: tuple, index: int, split: str) -> None:
    limit, name = positions
    length = input_ids.shape[-1] if input_ids.ndim else 1
    if length > limit:
        raise InvalidInputError(
            f"Row {index} of the {split} split has {length} tokens, more than the model's maximum of {limit} "
            f"({name}): truncate when tokenizing, tokenizer(..., truncation=True, max_length={limit}) "
            f"(hf_trak.attribute: max_length={limit}; hf-trak: --max-length {limit})."
        )
