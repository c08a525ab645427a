"""A checkpoint's kernel file (``kernel.safetensors``): λ_m, the column scale s_m, and XᵀX_m and K_m.

XᵀX_m and K_m are k × k float64 matrices (``xtx``, ``kernel``), or, for a block-diagonal (per-module) K from store
version 7 on, their diagonal blocks [offset, size] flattened row by row one after another (``xtx_blocks``,
``kernel_blocks``: Σ_b k_b² values each instead of k², which at k = 4096 is 128 MiB). Either way they are read back
as k × k matrices, or, from such a file, as the list of their blocks (``as_blocks``), which is all that featurize's
own use of K needs (``hf_trak.run.kernels``).
"""

from typing import Dict, List, Optional, Sequence, Union

import torch

from hf_trak.errors import CorruptStoreError, InvalidArgumentError
from hf_trak.store.arrow_files import load_safetensors, save_safetensors

KERNEL_NAME = "kernel.safetensors"
PACKED = {"xtx": "xtx_blocks", "kernel": "kernel_blocks"}  # the names of the matrices kept as their blocks
Matrix = Union[torch.Tensor, List[torch.Tensor]]  # k × k, or its diagonal blocks in order


def packed_length(blocks: Sequence[Sequence[int]]) -> int:
    """Σ_b k_b²: the values of one matrix kept as its diagonal blocks [offset, size]."""
    return sum(size * size for _, size in blocks)


def save_kernel_file(path: str, tensors: Dict[str, Matrix], blocks: Sequence[Sequence[int]] = ()) -> None:
    """Write ``tensors`` ({"xtx", "kernel", "lambda_reg", "phi_scale"}); with ``blocks``, the two matrices (k × k, or
    lists of their diagonal blocks) as their diagonal blocks."""
    if blocks:
        tensors = {PACKED.get(name, name): packed_blocks(t, blocks) if name in PACKED else t
                   for name, t in tensors.items()}  # fmt: skip
    save_safetensors(path, tensors)


def load_kernel_file(
    path: str, names: Optional[Sequence[str]] = None, blocks: Sequence[Sequence[int]] = (), as_blocks: bool = False
) -> Dict[str, Matrix]:
    """The file's tensors (only ``names`` of them, if given), ``xtx`` and ``kernel`` as k × k matrices; with
    ``blocks``, unpacked from their diagonal blocks (``CorruptStoreError`` where their sizes are not the blocks'),
    or with ``as_blocks`` the list of those blocks (k_b × k_b)."""
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
            pieces = unpacked_blocks(saved.pop(packed), blocks)
            matrices[name] = pieces if as_blocks else torch.block_diag(*pieces)
    return {**saved, **matrices}


def diagonal_blocks(matrix: Matrix, blocks: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """The diagonal blocks [offset, size] of a k × k matrix (views; the whole matrix where ``blocks`` is empty), or
    ``matrix`` itself where it is kept as its blocks already (their sizes must be those of ``blocks``)."""
    if isinstance(matrix, list):
        layout = blocks or [(0, len(matrix[0]))]  # one block: the whole matrix
        if [tuple(block.shape) for block in matrix] != [(size, size) for _, size in layout]:
            raise InvalidArgumentError(
                f"Diagonal blocks of shapes {[tuple(block.shape) for block in matrix]} do not match the layout "
                f"{[list(block) for block in blocks]}: pass the store's kernel_layout with its blocks."
            )
        return matrix
    return [matrix[a : a + size, a : a + size] for a, size in (blocks or [(0, matrix.shape[0])])]


def converted(matrix: Matrix, **to) -> Matrix:
    """A k × k matrix, or the list of its diagonal blocks, ``.to(**to)`` (a dtype, a device)."""
    return [block.to(**to) for block in matrix] if isinstance(matrix, list) else matrix.to(**to)


def packed_blocks(matrix: Matrix, blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """The diagonal blocks [offset, size] of a k × k matrix (or the list of them), each flattened row by row, one
    after another."""
    return torch.cat([piece.reshape(-1) for piece in diagonal_blocks(matrix, blocks)])


def unpacked_blocks(packed: torch.Tensor, blocks: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """The diagonal blocks (k_b × k_b) that ``packed_blocks`` flattened into ``packed``; ``torch.block_diag`` of them
    is the k × k matrix (0 off the blocks, which tile 0..k in order)."""
    pieces = torch.split(packed, [size * size for _, size in blocks])
    return [piece.reshape(size, size) for piece, (_, size) in zip(pieces, blocks)]
