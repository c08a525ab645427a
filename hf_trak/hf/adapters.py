"""PEFT adapters (LoRA and the other ``peft`` tuners): models, checkpoints and provenance.

A ``PeftModel`` wraps a transformers model; its parameters are named
``base_model.model.<base name>`` and an adapter's tensors ``...lora_A.<adapter>.weight``,
``...classifier.modules_to_save.<adapter>.weight``. What ``save_pretrained`` (and so the
Trainer's ``checkpoint-N``) writes is the adapter state alone, under peft's saved names
(``...lora_A.weight``, ``...classifier.weight``). ``adapter_key_map`` pairs the two naming
schemes by asking peft for the saved state of the live model (``get_peft_model_state_dict``)
and matching its tensors to the model's own, so no naming rule is written twice here.
An adapter checkpoint is then the model's own state with the adapter tensors replaced.

``peft`` is an optional dependency (``pip install hf_trak[peft]``): it is imported only
when a PEFT model or an adapter folder is given.
"""

import enum
import json
import os
from typing import Dict, List, Mapping, Optional

from torch import Tensor, nn

from hf_trak.errors import InvalidArgumentError, MissingDependencyError

ADAPTER_CONFIG_NAME = "adapter_config.json"

# PeftConfig fields that say nothing about the adapter's layout or its features.
_UNRECORDED_CONFIG_FIELDS = (
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "init_lora_weights",
    "peft_version",
    "revision",
)


def require_peft():
    """The ``peft`` module, or an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError as error:
        raise MissingDependencyError(
            "This is a PEFT adapter model or folder, which needs the peft package: pip install 'hf_trak[peft]'."
        ) from error
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (checked without importing peft)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft") for cls in type(model).__mro__)


def is_adapter_folder(path) -> bool:
    """Whether ``path`` is a folder written by ``PeftModel.save_pretrained`` (a Trainer checkpoint of one too)."""
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG_NAME))


def head_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise): its class names the head."""
    return model.get_base_model() if is_peft_model(model) else model


def adapter_key_map(model: nn.Module) -> Dict[str, str]:
    """``{saved name: model state-dict name}`` of the tensors an adapter checkpoint of ``model`` holds."""
    peft = require_peft()
    state = model.state_dict()
    by_storage = {(tensor.data_ptr(), tuple(tensor.shape)): name for name, tensor in state.items()}
    saved = peft.get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    key_map = {}
    for saved_name, tensor in saved.items():
        name = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if name is None:
            raise InvalidArgumentError(
                f"The adapter tensor {saved_name} is not one of {type(model).__name__}'s own tensors."
            )
        key_map[saved_name] = name
    return key_map


def adapter_parameter_names(model: nn.Module) -> List[str]:
    """The adapter's parameters (adapter layers and ``modules_to_save``), in ``named_parameters`` order."""
    adapter = set(adapter_key_map(model).values())
    return [name for name, _ in model.named_parameters() if name in adapter]


def with_adapter_if_partial(state_dict: Mapping[str, Tensor], model: nn.Module, source: str) -> Mapping[str, Tensor]:
    """A PEFT model's adapter-only state dict (peft's saved names only) completed with the model's own tensors;
    any other state dict as given."""
    if not is_peft_model(model) or not state_dict:
        return state_dict
    key_map = adapter_key_map(model)
    if not all(name in key_map for name in state_dict):
        return state_dict
    return with_adapter(model, state_dict, source, key_map)


def with_adapter(
    model: nn.Module, adapter_state: Mapping[str, Tensor], source: str, key_map: Optional[Dict[str, str]] = None
) -> Dict[str, Tensor]:
    """``model``'s state with the adapter tensors of ``adapter_state`` (saved names) put in their places."""
    key_map = key_map or adapter_key_map(model)
    state = dict(model.state_dict())
    unknown = sorted(set(adapter_state) - set(key_map))
    missing = sorted(set(key_map) - set(adapter_state))
    reshaped = sorted(
        f"{name} {tuple(tensor.shape)} vs {tuple(state[key_map[name]].shape)}"
        for name, tensor in adapter_state.items()
        if name in key_map and tensor.shape != state[key_map[name]].shape
    )
    if unknown or missing or reshaped:
        shown = ", ".join((unknown or missing or reshaped)[:3])
        raise InvalidArgumentError(
            f"The adapter in {source} does not fit {type(model).__name__}'s adapter layout ({len(unknown)} unknown "
            f"tensor(s), {len(missing)} missing, {len(reshaped)} of another shape: {shown}): it was trained with "
            "another adapter configuration (r, target_modules, modules_to_save) or on another base model."
        )
    for saved_name, tensor in adapter_state.items():
        state[key_map[saved_name]] = tensor
    return state


def read_adapter_folder(path: str, model: nn.Module) -> Dict[str, Tensor]:
    """The state of the PEFT ``model`` with the adapter saved in folder ``path``."""
    if not is_peft_model(model):
        raise InvalidArgumentError(
            f"{path} holds a PEFT adapter, but the model is a {type(model).__name__}: pass the PeftModel "
            "(peft.get_peft_model or PeftModel.from_pretrained), or the adapter folder as the model."
        )
    peft = require_peft()
    return with_adapter(model, peft.utils.load_peft_weights(path, device="cpu"), path)


def adapter_base_model(path: str, base_model: Optional[str] = None) -> str:
    """``base_model``, else the base model the adapter folder's config names."""
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as file:
        base_name = base_model or json.load(file).get("base_model_name_or_path")
    if not base_name:
        raise InvalidArgumentError(
            f"The adapter config in {path} names no base model: pass the base model (--base-model)."
        )
    return base_name


def adapter_provenance(model: nn.Module) -> Optional[dict]:
    """JSON-able record of a PEFT model's base and active adapter config (None for other models).

    ``base_model`` is where the base came from (information only: the checkpoint fingerprints
    identify the weights); ``config`` holds the adapter's layout fields, compared when scoring.
    """
    if not is_peft_model(model):
        return None
    config = model.peft_config[model.active_adapter].to_dict()
    layout = {name: _json_safe(value) for name, value in config.items() if name not in _UNRECORDED_CONFIG_FIELDS}
    base = head_model(model)
    name = getattr(getattr(base, "config", None), "_name_or_path", "") or config.get("base_model_name_or_path") or ""
    return {"base_model": str(name), "base_model_class": type(base).__name__, "config": layout}


def _json_safe(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, list, tuple)):
        items = [_json_safe(item) for item in value]
        if all(isinstance(item, (str, int, float)) for item in items):
            return sorted(set(items), key=repr)  # peft's name lists are sets (and can repeat on reload)
        return items
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
