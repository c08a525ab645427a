"""What an ``Explorer`` answers: train rows with their scores (``Neighbor``) and one target's query (``Query``)."""

import dataclasses
from typing import Any, Dict, List, Optional


@dataclasses.dataclass
class Neighbor:
    """A train row in a target's top-k: its row index, TRAK score and raw columns."""

    row: int
    score: float
    example: Dict[str, Any]


@dataclasses.dataclass
class Query:
    """What ``Explorer.query`` found for one target.

    ``label``: the label attributed (classifiers; None otherwise). ``agreement``: per
    checkpoint, the share of the ensemble's top-k proponents in that checkpoint's own top-k
    (empty for one checkpoint).
    """

    target: Dict[str, Any]
    prediction: str
    label: Optional[int]
    proponents: List[Neighbor]
    opponents: List[Neighbor]
    agreement: List[float]
