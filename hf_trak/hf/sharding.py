"""Models sharded across processes (FSDP), which hf_trak does not featurize.

Every forward pass of hf_trak is a ``torch.func.functional_call`` of the whole model at a
checkpoint's tensors, on each process: a model whose parameters are spread over processes
(FSDP's ``fully_shard``, whose parameters are ``DTensor`` shards, or a
``FullyShardedDataParallel`` wrapper) is refused before any work, with the fix named.
"""

from torch import nn

from hf_trak.errors import InvalidArgumentError


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP-wrapped or holds ``DTensor`` parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        return True
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def check_unsharded(model: nn.Module) -> None:
    """Refuse a sharded model, naming what to pass instead."""
    if is_sharded(model):
        raise InvalidArgumentError(
            "The model is sharded across processes (FSDP), and hf_trak needs the whole model on each process. "
            "Save the trained model whole (with accelerate: accelerator.get_state_dict(model), or the Trainer's "
            "save_model with a full state dict), load it unsharded with from_pretrained and give that model, its "
            "checkpoints as folders; processes then split the rows, not the model."
        )
