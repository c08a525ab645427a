"""Models, checkpoints and processors from what users pass: objects, folders, Hub ids, Trainer output_dirs.

``resolve_model`` gives ``(model, checkpoints)`` for ``hf_trak.attribute`` and the CLI: a model
object is its own single checkpoint; a ``save_pretrained`` folder or Hub id loads the class its
config names; a Trainer ``output_dir`` gives its ``checkpoint-N`` folders in step order; a PEFT
adapter folder loads on its base model (``hf_trak.hf.adapters``).
"""

import logging
import os
import re
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedModel

from hf_trak.errors import InvalidArgumentError, NotFoundError
from hf_trak.hf.adapters import adapter_base_model, is_adapter_folder, require_peft
from hf_trak.hf.checkpoints import Checkpoint

if TYPE_CHECKING:
    from hf_trak.store.config import TRAKConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
ModelOrCheckpoints = Union[nn.Module, str, os.PathLike, Sequence[Checkpoint]]


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``org/name``): it starts with
    ``.``, ``~`` or ``/``, holds a backslash or more than one ``/``, or its parent folder exists."""
    if name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def local_or_hub(name_or_path: Union[str, os.PathLike], what: str = "model") -> str:
    """``name_or_path`` (``~`` expanded), refusing at once a local path that does not exist (instead of
    trying it as a Hub id, with retries)."""
    name = os.path.expanduser(os.fspath(name_or_path))
    if not os.path.exists(name) and looks_like_local_path(os.fspath(name_or_path)):
        raise NotFoundError(f"The {what} {os.fspath(name_or_path)!r} does not exist (no such file or folder).")
    return name


def load_model(name_or_path: str, base_model: Optional[str] = None, **kwargs) -> PreTrainedModel:
    """The model of a ``save_pretrained`` folder or Hub repo, with the head its config names.

    A PEFT adapter folder gives its ``PeftModel``, on ``base_model`` or the base its config names.
    """
    import transformers

    name_or_path = local_or_hub(name_or_path)
    if base_model is not None:
        base_model = local_or_hub(base_model, "base model")

    if is_adapter_folder(name_or_path):
        return load_adapter_model(name_or_path, base_model)
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise InvalidArgumentError(
            f"{name_or_path} names no model class in its config (architectures={architectures}): load the model "
            "yourself (e.g. AutoModelForSequenceClassification.from_pretrained) and pass it instead."
        )
    return model_class.from_pretrained(name_or_path, **kwargs).eval()


def load_adapter_model(path: str, base_model: Optional[str] = None) -> nn.Module:
    """The PEFT model of an adapter folder: its base (``base_model``, else the one its config names) with
    the adapter loaded trainable, so that the adapter is what TRAK differentiates by default."""
    peft = require_peft()
    base = load_model(adapter_base_model(path, base_model))
    return peft.PeftModel.from_pretrained(base, path, is_trainable=True).eval()


def trainer_checkpoints(output_dir: str) -> List[str]:
    """The ``checkpoint-N`` folders of a Trainer ``output_dir``, by step (none for a model folder)."""
    if not os.path.isdir(output_dir) or os.path.exists(os.path.join(output_dir, "config.json")):
        return []
    if is_adapter_folder(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_FOLDER.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_model(
    model_or_checkpoints: ModelOrCheckpoints, base_model: Optional[str] = None
) -> Tuple[nn.Module, List[Checkpoint]]:
    """``(model, checkpoints)`` from a model, a folder/Hub id, a list of checkpoints or a Trainer output_dir.

    Adapter folders load on ``base_model`` (default: the base their config names).
    """
    if isinstance(model_or_checkpoints, nn.Module):
        return model_or_checkpoints, [model_or_checkpoints]
    if isinstance(model_or_checkpoints, (str, os.PathLike)):
        path = local_or_hub(model_or_checkpoints)
        folders = trainer_checkpoints(path)
        if folders:
            return resolve_model(folders, base_model)
        model = load_model(path, base_model)
        return model, [path if os.path.isdir(path) else model]
    checkpoints = list(model_or_checkpoints)
    if not checkpoints:
        raise InvalidArgumentError(
            "No checkpoints given: pass a model, a model folder, or a list of checkpoint folders."
        )
    models = [checkpoint for checkpoint in checkpoints if isinstance(checkpoint, nn.Module)]
    paths = [local_or_hub(c, "checkpoint") for c in checkpoints if isinstance(c, (str, os.PathLike))]
    if not models and not paths:
        raise InvalidArgumentError("With state dicts as checkpoints, pass the model itself to TRAKer instead.")
    return (models[-1] if models else load_model(os.fspath(paths[-1]), base_model)), checkpoints


def load_processor(name_or_path: str):
    """The processor saved with a model (multimodal, tokenizer or image processor), or None."""
    name_or_path = local_or_hub(name_or_path, "processor")
    for auto in (AutoProcessor, AutoTokenizer, AutoImageProcessor):
        try:
            return auto.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.debug("No %s in %s: %s", auto.__name__, name_or_path, error)
    return None


def model_folder(model: Optional[str]) -> Optional[str]:
    """The folder a model is loaded from: ``model``, or the last ``checkpoint-N`` of a Trainer output_dir."""
    folders = trainer_checkpoints(model) if model is not None else []
    return folders[-1] if folders else model


def processor_for(model: Optional[str], processor: Optional[str] = None, base_model: Optional[str] = None):
    """``processor`` (a folder or Hub id), else the one saved with ``model`` or, for an adapter, its base
    model; None if there is none (the split must then hold model inputs)."""
    source = processor or model_folder(model)
    if source is None:
        return None
    found = load_processor(source)
    if found is None and is_adapter_folder(source):
        source = adapter_base_model(source, base_model)
        found = load_processor(source)
    if found is None:
        logger.info("No processor found in %s: the dataset must hold model inputs.", source)
    return found


def resolve_store_model(
    config: "TRAKConfig", model: Union[None, nn.Module, str] = None, base_model: Optional[str] = None, root: str = ""
) -> Tuple[nn.Module, Optional[str], Optional[List[Checkpoint]]]:
    """``(model, its folder or Hub id, checkpoints)`` to score against a store with ``config``.

    ``model``: a model, folder or Hub id; by default the last checkpoint folder the store records
    (if it still exists) or the model it names. ``checkpoints`` is None where they are not the
    store's (``TRAKer.from_pretrained`` then uses the recorded ones, or the model for one checkpoint).
    """
    recorded = [path for path in config.checkpoint_sources if os.path.isdir(path)]
    if model is None:
        model = recorded[-1] if recorded else config.name_or_path or None
    if model is None:
        raise InvalidArgumentError(f"The features in {root or 'the store'} record no model folder: pass the model.")
    path = None if isinstance(model, nn.Module) else os.fspath(model)
    model, checkpoints = resolve_model(model, base_model)
    if len(checkpoints) != config.num_checkpoints or not all(isinstance(c, str) for c in checkpoints):
        checkpoints = None
    return model, path, checkpoints
