"""The store's files: Arrow IPC tables read memory-mapped into numpy, written atomically with a checksum, and
safetensors files read with a named error when they are corrupt."""

import logging
import os
import warnings
import zlib
from typing import Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_trak.errors import CorruptStoreError
from hf_trak.store.files import atomic_write

logger = logging.getLogger(__name__)


def read_table(path: str) -> pa.Table:
    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only (memory-mapped) numpy array; it is never written to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def fixed_size_list_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """(rows, k) numpy view of a fixed-size-list column (zero-copy for a single chunk)."""
    chunks = [chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), -1) for chunk in column.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def checksum(arrays: Sequence[np.ndarray]) -> int:
    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return crc


def write_arrow(path: str, columns: Dict[str, pa.Array], metadata: Optional[dict] = None) -> None:
    """Write one record batch of ``columns`` as an Arrow IPC file, atomically."""
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)

    def write(tmp):
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)


def readable_or_removed(path: str, read) -> bool:
    """Whether ``path`` exists and ``read()`` succeeds; a corrupt file is reported and deleted, to be redone."""
    if not os.path.isfile(path):
        return False
    try:
        read()
        return True
    except CorruptStoreError as error:
        logger.warning("%s Redoing it.", error)
        os.remove(path)
        return False


def load_safetensors(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (only ``names`` of them, if given); ``CorruptStoreError`` if it does not
    read."""
    try:
        if names is None:
            return load_file(path)
        with safe_open(path, framework="pt") as file:
            return {name: file.get_tensor(name) for name in names if name in file.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError on a truncated file
        raise CorruptStoreError(
            f"{path} is corrupt ({error}): run featurize again with the same arguments to redo it."
        ) from error


def fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A fixed-size-list column of the rows of ``matrix`` (rows, k)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


def save_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (contiguous, on the CPU) as a safetensors file at ``path``, atomically."""
    tensors = {name: tensor.contiguous().cpu() for name, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
