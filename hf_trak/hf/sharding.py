"""Models sharded across processes with FSDP2 (``fully_shard``, as ``accelerate`` applies it with
``fsdp_version=2``): what hf_trak can featurize of them, and in lockstep.

Elsewhere every forward pass of hf_trak is a ``torch.func.functional_call`` of the whole model at a checkpoint's
tensors. A model whose parameters are spread over the processes runs its own forward instead
(``hf_trak.method.model_outputs.call_model``): FSDP gathers each block's parameters for it, and the factored
projector needs only each layer's input and output gradient, which FSDP keeps whole on every process
(``FactoredGradientProjector.captured`` asks autograd for those, never for a parameter's gradient). So:

* the checkpoint is the model's own weights (``checkpoints=[model]``), fingerprinted from the full tensors;
* the features are projected by the factored projector alone (no dense fallback: its ``vmap`` of per-example
  gradients needs whole parameters);
* FSDP gathers parameters inside every forward and backward, so every process runs as many of them, in the same
  order (``passes_short``): the pass over a sample of the rows runs on every process, and a process with fewer
  batches of train rows or targets than another adds passes whose results it drops.

A ``FullyShardedDataParallel`` wrapper (FSDP1) or ``DTensor`` parameters without ``fully_shard`` are refused.
"""

import torch
from accelerate import PartialState
from accelerate.utils import gather
from torch import nn

from hf_trak.errors import InvalidArgumentError


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2: ``fully_shard`` applied to it (and to its blocks)."""
    if not torch.distributed.is_available():  # a torch built without it: nothing is sharded
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are spread over processes: FSDP2, FSDP1's wrapper or ``DTensor`` parameters."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if is_fsdp(model) or any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        return True
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def check_shardable(model: nn.Module) -> None:
    """Refuse a model sharded otherwise than by FSDP2 on the model itself, naming what to pass instead."""
    if is_sharded(model) and not is_fsdp(model):
        raise InvalidArgumentError(
            "The model is sharded across processes otherwise than by FSDP2 on the whole model (an FSDP1 "
            "FullyShardedDataParallel wrapper, or DTensor parameters without fully_shard on the model), which "
            "hf_trak cannot featurize. Shard it with FSDP2 (torch.distributed.fsdp.fully_shard on each block and on "
            "the model; with accelerate, fsdp_version=2), or save it whole (accelerator.get_state_dict(model)) and "
            "give hf_trak the unsharded model: processes then split the rows, not the model."
        )


def passes_short(state: PartialState, planned: int) -> int:
    """How many passes (forward and backward of a sharded model, whose results are dropped) this process adds after
    its ``planned`` ones, so that it runs as many as the process with most. The counts are gathered before any pass
    runs: every pass needs every process."""
    if state.num_processes == 1:
        return 0
    return int(gather(torch.tensor([planned])).max()) - planned
