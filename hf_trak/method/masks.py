"""4D additive attention masks, so HF models can run under ``torch.func.vmap``.

A 2D ``attention_mask`` (B, L) of 0/1 sends HF models through mask utilities with
data-dependent control flow (``mask.all()``), which ``vmap`` refuses. A 4D float mask
(B, 1, L, L) with 0 where attention is allowed and the dtype's minimum elsewhere is used
as given. Whether it must also be causal depends on the model (GPT-2 and CLIP's text
tower are, BERT is not), so it is decided once per model by comparing the model's
outputs under the 2D mask with both 4D candidates, outside ``vmap``.
"""

import logging
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from hf_trak.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

BIDIRECTIONAL, CAUSAL = "bidirectional", "causal"


def to_4d_attention_mask(mask: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """(B, L) 0/1 mask -> (B, 1, L, L) additive mask: 0 where query i may attend key j."""
    length = mask.shape[-1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, length)
    if kind == CAUSAL:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _output_tensors(output) -> list:
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, Mapping) else output
    return [value for value in values if isinstance(value, Tensor)]


def _tolerance(reference: Tensor) -> float:
    """The absolute tolerance of a comparison: 1e-5 of the largest finite value (the outputs' own scale, so that
    near-zero outputs of a random-init head still tell the two masks apart)."""
    finite = reference[torch.isfinite(reference)]
    return 1e-5 * float(finite.abs().max()) if finite.numel() else 0.0


def _probe_rows(batch: Mapping[str, Tensor]) -> dict:
    """The batch's example with the fewest padded positions and the one with the most (one if they are the same
    row): what tells the two masks apart, at the cost of two examples' forward passes instead of the batch's."""
    mask = batch["attention_mask"]
    padded = (mask == 0).sum(dim=1)
    rows = sorted({int(padded.argmin()), int(padded.argmax())})
    index = torch.tensor(rows, device=mask.device)
    return {
        name: value.index_select(0, index) if isinstance(value, Tensor) and value.dim() and len(value) == len(mask)
        else value
        for name, value in batch.items()
    }  # fmt: skip


class AttentionMaskAdapter:
    """Replaces 2D attention masks by the equivalent 4D mask of the model.

    ``forward(batch)`` runs the model on a batch; at the first batch with a 2D mask, every
    tensor of its output under the 2D mask is compared with both 4D candidates (on its least
    and its most padded example, padded positions included) to decide between bidirectional and causal.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.kind: Optional[str] = None

    def __call__(self, batch: Mapping[str, Tensor], forward: Callable[[Mapping[str, Tensor]], object]) -> dict:
        batch = dict(batch)
        mask = batch.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return batch
        if self.kind is None:
            self.kind = self._infer_kind(batch, forward)
        batch["attention_mask"] = to_4d_attention_mask(mask, self.kind, self.dtype)
        return batch

    def _infer_kind(self, batch: Mapping[str, Tensor], forward) -> str:
        batch = _probe_rows(batch)
        with torch.no_grad():
            reference = _output_tensors(forward(batch))
            tolerances = [_tolerance(r) for r in reference]
            for kind in (BIDIRECTIONAL, CAUSAL):
                mask = to_4d_attention_mask(batch["attention_mask"], kind, self.dtype)
                candidate = _output_tensors(forward(dict(batch, attention_mask=mask)))
                if len(candidate) == len(reference) and all(
                    c.shape == r.shape and torch.allclose(c, r, rtol=1e-4, atol=atol, equal_nan=True)
                    for c, r, atol in zip(candidate, reference, tolerances)
                ):
                    logger.info("Using %s 4D attention masks for per-example gradients.", kind)
                    return kind
        raise InvalidArgumentError(
            "The model gives different outputs with its 2D attention_mask and with both bidirectional and causal "
            "4D masks, so its per-example gradients cannot be vmapped. Pass a 4D additive attention_mask "
            "(B, 1, L, L) in your dataset or collator."
        )
