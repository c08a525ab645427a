"""One forward pass for a batch's features and its Q.

Featurizing a batch needs f's output gradients (a forward and backward of Σ_i f(z_i), the factored
projector's) and Q_i = ∂ℓ/∂f_i, which ``get_out_to_loss_grad`` computes from the model's outputs
on the same batch. Inside ``shared_outputs()`` (one checkpoint's weights, one batch), the outputs
of a model call made while ``keeping_outputs()`` is active are kept, detached, and a later
``call_model`` of the same model on the very same input tensors returns them instead of running
the model again. A call on other inputs (other tensors) runs the model as usual.
"""

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping, Optional

from torch import Tensor, nn

_SHARED: ContextVar[Optional[dict]] = ContextVar("hf_trak_shared_outputs", default=None)
_KEEPING: ContextVar[bool] = ContextVar("hf_trak_keeping_outputs", default=False)


@contextlib.contextmanager
def shared_outputs() -> Iterator[None]:
    """The scope in which kept outputs are reused: one batch at one checkpoint."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


@contextlib.contextmanager
def keeping_outputs() -> Iterator[None]:
    """Keep the outputs of the model calls made within (inside ``shared_outputs``)."""
    token = _KEEPING.set(True)
    try:
        yield
    finally:
        _KEEPING.reset(token)


def _detached(output):
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, Mapping):  # a transformers ModelOutput
        return type(output)(**{name: _detached(value) for name, value in output.items()})
    return output


def reuse_or_run(model: nn.Module, inputs: Mapping[str, Tensor], run: Callable[[], object]):
    """``run()`` (the model on ``inputs``), or the kept outputs of the same model on the same tensors."""
    shared = _SHARED.get()
    if shared is None:
        return run()
    key = (id(model), *sorted((name, id(value)) for name, value in inputs.items()))
    if key in shared:
        kept_inputs, output = shared[key]
        if all(kept_inputs[name] is value for name, value in inputs.items()):  # held: ids not reused
            return output
    output = run()
    if _KEEPING.get():
        shared[key] = (dict(inputs), _detached(output))
    return output
