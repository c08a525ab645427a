"""Per-example gradients g_i = ∇_θ f(z_i; θ) with ``torch.func``.

Only the selected parameters θ are arguments of ``grad``; the others enter the model as
constants, so no gradient is ever computed for them (``vmap(grad(f))`` differentiates
its first argument only). With ``chunk_numel`` the selected parameters are split into
chunks of at most that many elements (a parameter is never split) and gradients are
computed chunk by chunk, so the (B, p) gradient block never needs to fit in memory at
once; each chunk costs one more forward/backward.
"""

from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hf_trak.errors import InvalidArgumentError
from hf_trak.hf.input_grads import input_require_grads_off
from hf_trak.method.model_outputs import AbstractModelOutput
from hf_trak.method.projectors import AbstractProjector

GradWrt = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]


def select_parameters(model: nn.Module, grad_wrt: GradWrt = None) -> List[str]:
    """Names of the parameters to differentiate, in ``model.named_parameters()`` order.

    ``grad_wrt`` is None (the trainable parameters, ``requires_grad=True``: with PEFT/LoRA
    only the adapters), ``"all"``, a list of parameter names, or a predicate
    ``(name, parameter) -> bool``.
    """
    parameters = dict(model.named_parameters())
    if grad_wrt is None:
        names = [name for name, parameter in parameters.items() if parameter.requires_grad]
    elif isinstance(grad_wrt, str):
        if grad_wrt != "all":
            raise InvalidArgumentError(
                f"grad_wrt as a string must be 'all', got {grad_wrt!r}; pass a list for parameter names."
            )
        names = list(parameters)
    elif callable(grad_wrt):
        names = [name for name, parameter in parameters.items() if grad_wrt(name, parameter)]
    else:
        unknown = [name for name in grad_wrt if name not in parameters]
        if unknown:
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise InvalidArgumentError(
                f"grad_wrt names parameters that {type(model).__name__} does not have: {shown}."
            )
        wanted = set(grad_wrt)
        names = [name for name in parameters if name in wanted]
    if not names:
        raise InvalidArgumentError(
            "No parameters selected for gradients: check grad_wrt (or requires_grad of the model)."
        )
    return names


class PerExampleGradients:
    """Callable ``(task, weights, buffers, batch) -> iterator of {name: (B, numel)}``, one dict per chunk."""

    def __init__(self, model: nn.Module, param_names: Sequence[str], chunk_numel: Optional[int] = None):
        self.model = model
        numels = {name: parameter.numel() for name, parameter in model.named_parameters()}
        self.chunks: List[List[str]] = []
        chunk, chunk_size = [], 0
        for name in param_names:
            if chunk and chunk_numel is not None and chunk_size + numels[name] > chunk_numel:
                self.chunks.append(chunk)
                chunk, chunk_size = [], 0
            chunk.append(name)
            chunk_size += numels[name]
        self.chunks.append(chunk)

    def __call__(
        self,
        task: AbstractModelOutput,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
    ) -> Iterator[dict]:
        def output(differentiated, fixed, buffers, example) -> Tensor:
            example = {name: value.unsqueeze(0) for name, value in example.items()}
            return task.get_output(self.model, {**fixed, **differentiated}, buffers, example)

        per_example_grad = torch.func.vmap(torch.func.grad(output), in_dims=(None, None, None, 0))
        for chunk in self.chunks:
            differentiated = {name: weights[name] for name in chunk}
            fixed = {name: weight for name, weight in weights.items() if name not in differentiated}
            with torch.no_grad(), input_require_grads_off(self.model):  # no_grad: grad() still differentiates
                grads = per_example_grad(differentiated, fixed, buffers, dict(batch))
            yield {name: grad.reshape(grad.shape[0], -1) for name, grad in grads.items()}


class DenseGradientProjector:
    """Callable ``(task, weights, buffers, batch, model_id) -> (B, k)``: Pᵀg with g from ``vmap(grad)``, chunk by
    chunk."""

    def __init__(self, gradients: PerExampleGradients, projector: AbstractProjector):
        self.gradients, self.projector = gradients, projector
        self.proj_dim = projector.proj_dim

    def __call__(
        self,
        task: AbstractModelOutput,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        model_id: int,
    ) -> Tensor:
        projected = None
        for grads in self.gradients(task, weights, buffers, batch):
            partial = self.projector.project(grads, model_id)
            projected = partial if projected is None else projected.add_(partial)
        return projected
