"""The processes a ``TRAKer`` runs in: one, or those of an ``accelerate.Accelerator``.

Work is split by index: process r of W takes items r, r + W, r + 2W, ... of a list that every
process computed alike. Only k × k matrices are reduced across processes; features and
scores travel through the feature store's files.
"""

import contextlib
import os
from typing import List, Optional, Sequence, TypeVar

import torch

Item = TypeVar("Item")


class Processes:
    """Rank, size, barrier and sum over an optional ``Accelerator`` (a single process without one)."""

    def __init__(self, accelerator=None):
        if accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            accelerator = Accelerator()
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Optional[torch.device]:
        return self.accelerator.device if self.accelerator is not None else None

    def barrier(self) -> None:
        if self.size > 1:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_process_first(self):
        """Run the block on the main process, then on the others (e.g. to write a ``datasets`` cache once)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over processes of ``tensor`` (on every process)."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.size > 1 else tensor

    def share(self, items: Sequence[Item]) -> List[Item]:
        """This process's items: ``items[rank::size]``."""
        return list(items[self.rank :: self.size])

    def contiguous_share(self, count: int) -> range:
        """This process's contiguous block of ``range(count)``; blocks differ in size by at most one."""
        start = self.rank * count // self.size
        return range(start, (self.rank + 1) * count // self.size)
