"""What a checkpoint's principal factors are made from: each principal side's sample over the sample rows, across
processes.

A side's factor needs the leading eigenvectors of its per-token second moment F = VᵀV (d × d) over the sampled
tokens V (n × d). Where the whole sample holds fewer tokens than d, they come from the n × n Gram matrix VVᵀ
(``SideSample.leading``): the tokens are gathered to the main process in batch order, so that every number of
processes gives the one-process tokens. Elsewhere F is summed batch by batch in float64 and over the processes
(one all-reduce), as it always was.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

from hf_trak.method.block_sizes import SideSample


@dataclass
class SideMoments:
    """What a checkpoint's principal factors are made from (``FactoredGradientProjector.principal_factors``): each
    side's leading eigenvectors where they were found ({"<name>/<side>": d × m}), and the second moment F (d × d)
    of the sides whose factor needs more eigenvectors than that. Made on the main process only."""

    moments: Dict[str, torch.Tensor]
    leading: Dict[str, torch.Tensor]

    def take(self, name: str, sample: SideSample, count: int) -> None:
        """Side ``name``'s ``count`` leading eigenvectors from ``sample``'s tokens where it holds fewer than d of
        them (``SideSample.leading``), else its F."""
        found = sample.leading(count)
        if found is not None:
            self.leading[name] = found
        else:
            self.moments[name] = sample.dense()


class BatchMoments:
    """One side's sample on one process, batch by batch: each batch's ``SideSample`` while all of them hold fewer
    tokens than d, then F = Σ_batches F_batch (float64, in batch order: the same sum whether or not the tokens were
    kept first)."""

    def __init__(self):
        self.batches: List[SideSample] = []
        self.moment: Optional[torch.Tensor] = None

    @property
    def token_count(self) -> int:
        return sum(len(batch.tokens) for batch in self.batches)

    def add(self, sample: SideSample) -> None:
        tokens = sample.tokens
        if self.moment is None and tokens is not None and self.token_count + len(tokens) < tokens.shape[1]:
            self.batches.append(sample)
            return
        self.moment = self.dense() + sample.dense() if self.moment is not None or self.batches else sample.dense()
        self.batches = []

    def dense(self) -> Optional[torch.Tensor]:
        """F, summed in batch order (None for a side no token reached)."""
        moment = self.moment
        for batch in self.batches:
            moment = batch.dense() if moment is None else moment + batch.dense()
        return moment

    def tokens(self) -> torch.Tensor:
        return torch.cat([batch.tokens for batch in self.batches])


def combined(samples: Dict[str, BatchMoments], dims: Dict[str, int], counts: Dict[str, int], state: PartialState,
             device) -> Optional[SideMoments]:  # fmt: skip
    """The processes' samples of each side ``dims`` names (d), combined on the main process into ``SideMoments``
    (None on the others): a side's ``counts[name]`` leading eigenvectors from its tokens where every process kept
    tokens and they are fewer than d in all (gathered in process order: contiguous shares of the batches), else its
    F summed over the processes (zeros where a process saw no token)."""
    names = sorted(dims)
    kept = torch.tensor([samples[n].token_count if n in samples else 0 for n in names], device=device)
    dense = torch.tensor([int(n in samples and samples[n].moment is not None) for n in names], device=device)
    if state.num_processes > 1:
        kept, dense = reduce(kept, reduction="sum"), reduce(dense, reduction="sum")
    by_tokens = [n for n, total, moment in zip(names, kept.tolist(), dense.tolist()) if not moment and total < dims[n]]
    tokens = {n: samples[n].tokens().cpu() for n in by_tokens if n in samples and samples[n].batches}
    shares = gather_object([tokens]) if state.num_processes > 1 else [tokens]
    moments = {}
    for name in names:
        if name in by_tokens:
            continue
        moment = samples[name].dense() if name in samples else None
        moments[name] = moment if moment is not None else torch.zeros(dims[name], dims[name], dtype=torch.float64)
        if state.num_processes > 1:
            moments[name] = reduce(moments[name].to(device), reduction="sum")
    if not state.is_main_process:
        return None
    found = SideMoments(moments, {})
    for name in by_tokens:
        parts = [share[name] for share in shares if name in share]
        if parts:
            sample = SideSample()
            sample.add(torch.cat(parts))
            found.take(name, sample, counts[name])
    return found
