"""Model checkpoints as ``(weights, buffers)`` dicts for ``torch.func.functional_call``.

A checkpoint is a state dict, a model, a ``.safetensors``/``.bin`` state-dict file, or a
folder written by ``save_pretrained`` or the Trainer (``checkpoint-N``). Folders are read
with the model class's own ``from_pretrained``, so transformers' sharding, tied weights
and renaming of saved keys apply. For a PEFT model, an adapter folder, file or state dict
(adapter tensors only, under peft's saved names) is the model's state with that adapter
(``hf_trak.hf.adapters``). Tensors are read, never written, and the model given
to ``TRAKer`` is never modified, so checkpoints may alias the live model's tensors.
"""

import contextlib
import hashlib
import os
from typing import Mapping, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.utils import logging as transformers_logging

from hf_trak.errors import InvalidArgumentError, NotFoundError
from hf_trak.hf import adapters
from hf_trak.hf.sharding import is_sharded

Checkpoint = Union[Mapping[str, Tensor], nn.Module, str, os.PathLike]


@contextlib.contextmanager
def _without_loading_bars():
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def read_state_dict(checkpoint: Checkpoint, model: nn.Module) -> Mapping[str, Tensor]:
    """The tensors of a checkpoint of ``model``'s architecture, by state-dict name."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, Mapping):
        return adapters.with_adapter_if_partial(checkpoint, model, "the state dict")
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        state_dict = (
            load_file(path)
            if path.endswith(".safetensors")
            else torch.load(path, map_location="cpu", weights_only=True)
        )
        return adapters.with_adapter_if_partial(state_dict, model, path)
    if os.path.isdir(path) and adapters.is_adapter_folder(path):
        return adapters.read_adapter_folder(path, model)
    if os.path.isdir(path) and hasattr(type(model), "from_pretrained"):
        with _without_loading_bars():  # checkpoints are read often; TRAK's own bars show progress
            return type(model).from_pretrained(path).state_dict()
    raise NotFoundError(
        f"Checkpoint {path!r} is neither a weights file nor a save_pretrained folder of {type(model).__name__}."
    )


def load_checkpoint(checkpoint: Checkpoint, model: nn.Module, device: torch.device) -> Tuple[dict, dict]:
    """``(weights, buffers)`` of ``model``'s parameter and buffer names, from ``checkpoint``.

    Parameter names are those of ``model.named_parameters()`` (tied weights once);
    buffers missing from the checkpoint (non-persistent ones) keep the model's values.
    """
    if is_sharded(model):
        raise InvalidArgumentError(
            f"{type(model).__name__} is sharded across processes (FSDP), and this call loads its checkpoint whole on "
            "one process: load the model unsharded (from_pretrained) for it."
        )
    state_dict = read_state_dict(checkpoint, model)
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in state_dict]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidArgumentError(
            f"The checkpoint has no tensor for {len(missing)} parameter(s) of {type(model).__name__} ({shown}): "
            "it was saved from a different model."
        )
    parameters = dict(model.named_parameters())
    weights = {}
    for name in names:
        tensor = state_dict[name]
        if tensor.shape != parameters[name].shape:
            raise InvalidArgumentError(
                f"Checkpoint tensor {name} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(parameters[name].shape)}: it was saved from a different model."
            )
        weights[name] = tensor.detach().to(device=device, dtype=parameters[name].dtype)
    buffers = {name: state_dict.get(name, buffer).detach().to(device=device) for name, buffer in model.named_buffers()}
    return weights, buffers


def checkpoint_fingerprint(weights: Mapping[str, Tensor]) -> str:
    """sha256 of the parameter names, shapes, dtypes and values: identifies a checkpoint's weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach()
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP's DTensor: all gather
        tensor = tensor.cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")  # the bytes, not a copy
    return digest.hexdigest()


def checkpoint_source(checkpoint: Checkpoint) -> str:
    """Where a checkpoint's weights can be found again: its path, or "state_dict" / "model"."""
    if isinstance(checkpoint, nn.Module):
        return "model"
    if isinstance(checkpoint, Mapping):
        return "state_dict"
    return os.path.abspath(os.fspath(checkpoint))
