"""Writing files without losing or overwriting anything.

Every file hf_trak writes goes to a hidden temporary name next to its destination and is
renamed once complete (``atomic_write``; a folder: ``atomic_folder``), with the
permissions the umask gives new files. Outputs a command will write are checked before
it computes anything (``check_output``): one that exists is refused unless overwriting
was asked for, and a folder that cannot be written to is named.
"""

import errno
import os
import shutil
from typing import Callable

import numpy as np

from hf_trak.errors import DiskFullError, NotFoundError, OutputExistsError, OutputNotWritableError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def _temporary_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the device is full (``ENOSPC``, as an ``OSError`` or in a writer's own message)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp_path)``, then rename it to ``path``: readers never see a partial file, and a failed
    write leaves ``path`` as it was. A full device is a ``DiskFullError`` naming the file. Returns ``path``."""
    tmp = _temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # some writers (safetensors) create their files 0600
        os.replace(tmp, path)
    except Exception as error:
        if not is_disk_full(error):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise DiskFullError(
            f"No space left on the device writing {path} ({free / 2**20:.1f} MiB free there)."
        ) from error
    finally:
        if os.path.isfile(tmp):
            os.remove(tmp)
    return path


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)

    return atomic_write(path, write)


def save_npy(path: str, array: np.ndarray) -> str:
    """``np.save`` to ``path`` (``.npy`` appended if missing, as numpy does), atomically; returns the path."""
    path = path if path.endswith(".npy") else path + ".npy"

    def write(tmp):
        with open(tmp, "wb") as file:
            np.save(file, array)

    return atomic_write(path, write)


def atomic_folder(path: str, write: Callable[[str], None], overwrite: bool = False) -> str:
    """``write(tmp_folder)``, then rename it to ``path`` (an existing ``path`` is replaced only with
    ``overwrite``, once the new folder is complete). Returns ``path``."""
    tmp = _temporary_path(path)
    try:
        write(tmp)
        if os.path.exists(path):
            if not overwrite:
                raise OutputExistsError(f"{path} exists: pass overwrite to replace it.")
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return path


def check_output(path: str, overwrite: bool = False, option: str = "--output") -> None:
    """Refuse, before any work, an output that exists (unless ``overwrite``) or cannot be written."""
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists: choose another {option}, or pass --overwrite to replace it.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NotFoundError(f"Cannot write {option} {path}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OutputNotWritableError(
            f"Cannot write {option} {path}: {parent} is not writable. Choose another {option}."
        )
