"""A checkpoint's kernel file (``kernel.safetensors``): λ_m, the column scale s_m, and XᵀX_m and K_m.

XᵀX_m and K_m are k × k float64 matrices (``xtx``, ``kernel``), or, for a block-diagonal (per-module) K from store
version 7 on, their diagonal blocks [offset, size] flattened row by row one after another (``xtx_blocks``,
``kernel_blocks``: Σ_b k_b² values each instead of k², which at k = 4096 is 128 MiB). Either way they are read back
as k × k matrices.
"""

from typing import Dict, Optional, Sequence

import torch

from hf_trak.errors import CorruptStoreError
from hf_trak.store.arrow_files import load_safetensors, save_safetensors

KERNEL_NAME = "kernel.safetensors"
PACKED = {"xtx": "xtx_blocks", "kernel": "kernel_blocks"}  # the names of the matrices kept as their blocks


def packed_length(blocks: Sequence[Sequence[int]]) -> int:
    """Σ_b k_b²: the values of one matrix kept as its diagonal blocks [offset, size]."""
    return sum(size * size for _, size in blocks)


def save_kernel_file(path: str, tensors: Dict[str, torch.Tensor], blocks: Sequence[Sequence[int]] = ()) -> None:
    """Write ``tensors`` ({"xtx", "kernel", "lambda_reg", "phi_scale"}); with ``blocks``, the two matrices as their
    diagonal blocks."""
    if blocks:
        tensors = {PACKED.get(name, name): _packed(t, blocks) if name in PACKED else t for name, t in tensors.items()}
    save_safetensors(path, tensors)


def load_kernel_file(
    path: str, names: Optional[Sequence[str]] = None, blocks: Sequence[Sequence[int]] = ()
) -> Dict[str, torch.Tensor]:
    """The file's tensors (only ``names`` of them, if given), ``xtx`` and ``kernel`` as k × k matrices; with
    ``blocks``, unpacked from their diagonal blocks (``CorruptStoreError`` where their sizes are not the blocks')."""
    if not blocks:
        return load_safetensors(path, names)
    saved = load_safetensors(path, None if names is None else [PACKED.get(name, name) for name in names])
    matrices = {}
    for name, packed in PACKED.items():
        if packed in saved:
            if saved[packed].shape != (packed_length(blocks),):
                raise CorruptStoreError(
                    f"{path} holds {packed} of shape {tuple(saved[packed].shape)}, not the config's kernel blocks: "
                    "run featurize again with the same arguments to redo it."
                )
            matrices[name] = _unpacked(saved.pop(packed), blocks)
    return {**saved, **matrices}


def _packed(matrix: torch.Tensor, blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """The diagonal blocks [offset, size] of a k × k matrix, each flattened row by row, one after another."""
    return torch.cat([matrix[a : a + size, a : a + size].reshape(-1) for a, size in blocks])


def _unpacked(packed: torch.Tensor, blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """The block-diagonal k × k matrix that ``_packed`` made ``packed`` from (0 off the blocks, which tile 0..k in
    order)."""
    pieces = torch.split(packed, [size * size for _, size in blocks])
    return torch.block_diag(*[piece.reshape(size, size) for piece, (_, size) in zip(pieces, blocks)])
