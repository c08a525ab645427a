"""Which train split a feature store was made from, and the check that a split given later is it.

At featurize time the store records the row hashes h_0..h_{n-1} of the train split
(``hf_trak.data.inputs``) in ``train_rows.arrow``, and in its config one sha256 per shard of
the hashes of its rows (``train_hashes``): the split's rows, in order. Whatever pairs
stored features with a split (scoring with the train split at hand, top-k, reports,
``attribute``) checks it before any forward pass: another row count, order, filter or
tokenization is refused with the first differing row named. A subset is accepted only when
asked for (``train_subset=True``) and then each of its rows must be a stored row.
"""

import hashlib
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np

from hf_trak.errors import StoreMismatchError

logger = logging.getLogger(__name__)

SUBSET_FIX = "or pass train_subset=True (hf-trak: --train-subset) to pair the features with a subset of those rows"


def shard_hashes(row_hashes: np.ndarray, ranges: Sequence[Tuple[int, int]]) -> List[str]:
    """sha256 of the row hashes of each shard [start, stop)."""
    return [hashlib.sha256(np.ascontiguousarray(row_hashes[a:b]).tobytes()).hexdigest() for a, b in ranges]


def first_difference(stored: np.ndarray, given: np.ndarray) -> Optional[int]:
    """The first row where two hash sequences differ (the shorter one's end if one is a prefix)."""
    common = min(len(stored), len(given))
    differ = np.flatnonzero(stored[:common] != given[:common])
    if len(differ):
        return int(differ[0])
    return None if len(stored) == len(given) else common


def split_rows(store, row_hashes: np.ndarray, subset: bool = False) -> Optional[np.ndarray]:
    """Check that ``row_hashes`` (a train split's) are the stored split's; returns None if they are
    the whole split in order, else (``subset``) the stored row of each given row."""
    config, root = store.config, store.root
    stored = store.row_hashes()
    if stored is None:  # a store written before row hashes were recorded: only the size can be checked
        logger.warning("%s records no row hashes (hf_trak < 0.2): only the train split's size is checked.", root)
        if len(row_hashes) != config.num_train_examples:
            raise StoreMismatchError(
                f"The train split has {len(row_hashes)} rows but the features in {root} were made from "
                f"{config.num_train_examples}: pass the split that was featurized."
            )
        return None
    difference = first_difference(stored, row_hashes)
    if difference is None:
        return None
    if not subset:
        if len(row_hashes) != len(stored):
            what = f"has {len(row_hashes)} rows but the features in {root} were made from {len(stored)}"
        else:
            count = int((stored != row_hashes).sum())
            what = (
                f"differs from the one the features in {root} were made from: row {difference} is not the "
                f"featurized row {difference} ({count} of {len(stored)} rows differ: shuffled, filtered, "
                "re-tokenized or another dataset?)"
            )
        raise StoreMismatchError(
            f"The train split {what}. Pass the split that was featurized, same rows in the same order, {SUBSET_FIX}."
        )
    positions = {}
    for row, value in enumerate(stored.tolist()):
        positions.setdefault(value, []).append(row)
    found = np.empty(len(row_hashes), dtype=np.int64)
    for index, value in enumerate(row_hashes.tolist()):
        rows = positions.get(value)
        if not rows:
            raise StoreMismatchError(
                f"Row {index} of the train subset is not a row of the split the features in {root} were made "
                "from: pass rows of that split (e.g. split.select(indices))."
            )
        found[index] = rows.pop(0) if len(rows) > 1 else rows[0]
    return found
