"""Random projections of per-example gradients: g (p,) -> Pᵀg (k,).

P (p × k) has i.i.d. ±1 (``"rademacher"``) or N(0, 1) (``"normal"``) entries, unscaled as
in traker, so E[⟨Pᵀa, Pᵀb⟩] = k⟨a, b⟩. P is never formed whole: it is the stack of blocks
P[name, s] (rows of parameter ``name``'s segment s, at most ``segment_numel`` rows),
each drawn from its own seed sha256(seed, checkpoint, name, s) by a CPU generator and
then moved to the device. Hence:

* the same seed gives the same P on every device and process, for any batch size;
* projecting parameter chunks separately and summing equals projecting all at once;
* blocks are generated once and cached (up to ``max_cache_bytes``), not per batch.
"""

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from hf_trak.arguments import PROJECTORS
from hf_trak.errors import InvalidArgumentError


def seeded_generator(*keys) -> torch.Generator:
    """A CPU generator seeded by sha256 of ``keys`` joined with "/": the same stream on any device and run."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class AbstractProjector(ABC):
    """Maps per-example gradients ``{name: (B, numel)}`` to ``(B, proj_dim)`` float32."""

    proj_dim: int

    def __init__(self, param_numels: Mapping[str, int], device: torch.device):
        self.param_numels = dict(param_numels)
        self.device = torch.device(device)

    @abstractmethod
    def project(self, grads: Mapping[str, Tensor], model_id: int) -> Tensor:
        """Σ over the given parameters of their part of Pᵀg (a subset of parameters gives a partial sum)."""


class IdentityProjector(AbstractProjector):
    """P = I: features are the raw gradients, concatenated in parameter order (for exactness checks)."""

    def __init__(self, param_numels: Mapping[str, int], device: torch.device):
        super().__init__(param_numels, device)
        self.offsets, offset = {}, 0
        for name, numel in self.param_numels.items():
            self.offsets[name] = offset
            offset += numel
        self.proj_dim = offset

    def project(self, grads: Mapping[str, Tensor], model_id: int) -> Tensor:
        batch_size = next(iter(grads.values())).shape[0]
        out = torch.zeros(batch_size, self.proj_dim, device=self.device)
        for name, grad in grads.items():
            start = self.offsets[name]
            out[:, start : start + grad.shape[1]] = grad
        return out


class RandomProjector(AbstractProjector):
    """Dense Rademacher or Gaussian projection generated in seeded blocks.

    Args:
        param_numels: ordered ``{parameter name: number of elements}`` (the p coordinates).
        proj_dim: k.
        kind: ``"rademacher"`` or ``"normal"``.
        seed: projector seed; checkpoint ``model_id`` gets an independent P.
        device: where projections run.
        max_cache_bytes: budget for cached blocks; past it, blocks are regenerated per call.
    """

    def __init__(
        self,
        param_numels: Mapping[str, int],
        proj_dim: int,
        kind: str,
        seed: int,
        device: torch.device,
        max_cache_bytes: int = 4 * 2**30,
    ):
        super().__init__(param_numels, device)
        if kind not in ("rademacher", "normal"):
            raise InvalidArgumentError(f"A random projector is rademacher or normal, not {kind!r}.")
        self.proj_dim, self.kind, self.seed = proj_dim, kind, seed
        self.segment_numel = max(1, 2**26 // proj_dim)  # one block: 2**26 float32 entries (256 MiB)
        self.max_cache_bytes = max_cache_bytes
        self._cache: Dict[tuple, Tensor] = {}
        self._cached_bytes = 0

    def _generate(self, rows: int, generator: torch.Generator) -> Tensor:
        if self.kind == "normal":
            return torch.randn(rows, self.proj_dim, generator=generator)
        # Rademacher: 8 independent signs from each random byte.
        count = rows * self.proj_dim
        random_bytes = torch.randint(0, 256, (math.ceil(count / 8),), dtype=torch.uint8, generator=generator)
        bits = (random_bytes[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        return bits.reshape(-1)[:count].view(rows, self.proj_dim).to(torch.float32).mul_(2.0).sub_(1.0)

    def block(self, model_id: int, name: str, segment: int) -> Tensor:
        """Rows ``[segment * segment_numel, ...)`` of parameter ``name``'s part of P, on the device."""
        key = (model_id, name, segment)
        cached: Optional[Tensor] = self._cache.get(key)
        if cached is not None:
            return cached
        rows = min(self.segment_numel, self.param_numels[name] - segment * self.segment_numel)
        block = self._generate(rows, seeded_generator(self.seed, model_id, name, segment)).to(self.device)
        size = block.numel() * block.element_size()
        if self._cached_bytes + size <= self.max_cache_bytes:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def project(self, grads: Mapping[str, Tensor], model_id: int) -> Tensor:
        batch_size = next(iter(grads.values())).shape[0]
        out = torch.zeros(batch_size, self.proj_dim, device=self.device)
        for name, grad in grads.items():
            grad = grad.to(torch.float32)
            for segment in range(math.ceil(grad.shape[1] / self.segment_numel)):
                start = segment * self.segment_numel
                out.addmm_(grad[:, start : start + self.segment_numel], self.block(model_id, name, segment))
        return out


def make_projector(
    kind: str,
    param_numels: Mapping[str, int],
    proj_dim: Optional[int],
    seed: int,
    device: torch.device,
    max_cache_bytes: int = 4 * 2**30,
) -> AbstractProjector:
    """The projector named ``kind`` over the parameters ``param_numels``."""
    if kind == "identity":
        return IdentityProjector(param_numels, device)
    if kind not in ("rademacher", "normal"):  # "auto" is resolved and "factored" made by hf_trak.method.factored
        raise InvalidArgumentError(f"Unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}.")
    if proj_dim is None or int(proj_dim) <= 0:
        raise InvalidArgumentError(
            f"proj_dim must be a positive integer for the {kind!r} projector, got {proj_dim!r}."
        )
    return RandomProjector(param_numels, int(proj_dim), kind, seed, device, max_cache_bytes)
