"""Factored (Kronecker) projection of per-example gradients, without forming them (LoGra).

A weight W of shape (r, c) used by a layer receives, from example i, the gradient
G_i = Σ_t u_t v_tᵀ (a sum over tokens t), where for

* ``nn.Linear``  (W: d_out × d_in):  u = δ (output gradient), v = x (input);
* ``Conv1D``     (W: d_in × d_out):  u = x, v = δ;
* ``nn.Embedding`` (W: vocab × d):   u = one-hot(id), v = δ (rows at ``padding_idx`` get none);

and a bias b receives Σ_t δ_t. Projecting with a Kronecker matrix P_c ⊗ P_r gives

    P_rᵀ G_i P_c = Σ_t (P_rᵀ u_t)(P_cᵀ v_t)ᵀ        (k_r × k_c per example),

computed from activations and output gradients captured by hooks during ONE batched
forward + backward of Σ_i f(z_i; θ) (examples do not interact in eval mode). A weight
used by several layers (tied embeddings) sums their contributions; a layer whose input
is shared by the batch (position ids of shape (1, T)) has its output expanded to the
batch so that its output gradient stays per example. Factors are
Rademacher with entries ±1/√k (E[P Pᵀ] = I), or the identity where a side is not larger
than its target size, so E⟨P_rᵀ A P_c, P_rᵀ B P_c⟩ = ⟨A, B⟩ for every layer; features
are scaled by √proj_dim to keep the dense projector's convention E⟨Pᵀa, Pᵀb⟩ = k⟨a, b⟩.

Sizes: ``hf_trak.method.factored_sizes`` divides k among the matrices. Principal factors
(``principal_share`` > 0, ``hf_trak.method.principal``): a side's factor keeps the leading eigenvectors of
its per-token second moment (``side_tokens``, over a sample of the train split) and projects the rest at
random; ``principal_factors`` makes them, the store keeps them per checkpoint (they depend on the data) and
``set_factors`` gives them back. The biases' and the dense fallback's projections stay random. How the
factored projector compares with a dense one on LDS is in the docs (benchmarks). Parameters of other layers
(LayerNorm, position tensors, convolutions) fall back to the dense ``vmap(grad)`` path, with their share of
dimensions in one dense block.

The model output function must return Σ_i f(z_i) when given a batch (the shipped ones do).
"""

import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from hf_trak.errors import CorruptStoreError, IncompleteStoreError, InvalidArgumentError
from hf_trak.method.factored_sizes import Target, filled_sizes, legacy_sizes
from hf_trak.method.gradients import PerExampleGradients
from hf_trak.method.model_outputs import AbstractModelOutput
from hf_trak.method.principal import MAX_PRINCIPAL_SIDE, principal_factor
from hf_trak.method.projectors import IdentityProjector, RandomProjector, seeded_generator
from hf_trak.method.shared_outputs import keeping_outputs
from hf_trak.method.token_vectors import (
    finite_examples,
    finite_gram,
    finite_rows,
    id_counts,
    projected_pair,
    reaching_tokens,
    side_vectors,
    token_gram,
)

logger = logging.getLogger(__name__)

FACTORABLE = (nn.Linear, Conv1D, nn.Embedding)
UNDERFILL_WARNING_SHARE = 0.99  # k below this share of proj_dim is logged as a warning, above it as info


def factorable_parameter_names(model: nn.Module) -> List[str]:
    """Names of the weights and biases of ``nn.Linear``, ``Conv1D`` and ``nn.Embedding`` layers."""
    names_by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    found = set()
    for module in model.modules():
        if isinstance(module, FACTORABLE):
            for parameter in (module.weight, getattr(module, "bias", None)):
                if parameter is not None:
                    found.add(names_by_id[id(parameter)])
    return [name for name in names_by_id.values() if name in found]


@dataclass
class _Use:
    """A layer that uses weight ``weight`` (and bias ``bias``)."""

    module: nn.Module
    weight: Optional[str]
    bias: Optional[str]


class FactoredGradientProjector:
    """Callable ``(task, weights, buffers, batch, model_id) -> (B, proj_dim)`` projected gradients Pᵀg.

    Args:
        model: the model (its layers are hooked).
        param_names: parameters to differentiate; those outside factorable layers use the dense path.
        proj_dim: feature budget (the actual dimension, ``self.proj_dim``, is at most this).
        seed: projection seed; checkpoint ``model_id`` gets independent factors.
        device: where the factors live.
        kind: ``"rademacher"``, or ``"identity"`` (all factors identity: the exact gradients).
        sizing: ``"fill"`` (sizes summing to ``proj_dim``, k_r:k_c ≈ r:c), ``"square"`` (the same with
            k_r ≈ k_c, for kernels from per-token gradients) or ``"legacy"`` (the first store formats); see
            ``hf_trak.method.factored_sizes`` and ``hf_trak.store.versions.factored_sizing``.
        principal_share: share s of each eligible side's dimensions given to the leading eigenvectors of its
            second moment (see the module's docstring); 0: every factor random. With s > 0, a checkpoint's
            factors must be given (``set_factors``) before its features are asked for.
    """

    def __init__(
        self,
        model: nn.Module,
        param_names: Sequence[str],
        proj_dim: int,
        seed: int,
        device: torch.device,
        kind: str = "rademacher",
        sizing: str = "fill",
        principal_share: float = 0.0,
    ):
        self.model, self.seed, self.kind, self.sizing = model, seed, kind, sizing
        self.principal_share = principal_share
        self.device = torch.device(device)
        parameters = dict(model.named_parameters())
        names_by_id = {id(parameter): name for name, parameter in parameters.items()}
        selected = set(param_names)
        self.uses: List[_Use] = []
        targets: Dict[str, Target] = {}
        for module in model.modules():
            if not isinstance(module, FACTORABLE):
                continue
            weight = names_by_id[id(module.weight)]
            bias = getattr(module, "bias", None)
            bias = names_by_id[id(bias)] if bias is not None else None
            use = _Use(module, weight if weight in selected else None, bias if bias in selected else None)
            if use.weight is None and use.bias is None:
                continue
            self.uses.append(use)
            if use.weight is not None:
                targets[use.weight] = Target(use.weight, *parameters[use.weight].shape)
            if use.bias is not None:
                targets[use.bias] = Target(use.bias, parameters[use.bias].numel(), 1)
        self.targets = [targets[name] for name in param_names if name in targets]
        fallback = [name for name in param_names if name not in targets]
        self._size_targets(proj_dim, fallback, parameters)
        self.fallback_gradients = PerExampleGradients(model, fallback) if fallback else None
        self._factors: Dict[Tuple[int, str, str], Tensor] = {}
        # Kernel statistics, accumulated while ``statistics`` is a dict (``start_statistics``), before the
        # √proj_dim scaling, under "block_<b>" for kernel block b (each target, then the fallback block):
        # "tokens": Σ_{i,t} z_it z_itᵀ of the projected per-token gradients z_it = (P_rᵀu_t)⊗(P_cᵀv_t), and for
        # a weight also its projected Kronecker factors, as for "ekfac" (a kernel's shrinkage target);
        # "ekfac": for a weight, its Kronecker factors Σ_{i,t} (P_rᵀu_t)(P_rᵀu_t)ᵀ ("block_<b>_rows") and
        # Σ_{i,t} (P_cᵀv_t)(P_cᵀv_t)ᵀ ("block_<b>_cols"); for a bias its per-token Gram matrix. The fallback
        # block gets its per-example Gram matrix.
        self.statistics: Optional[Dict[str, Tensor]] = None
        self.statistics_kind = "tokens"

    def start_statistics(self, kind: str) -> None:
        """Accumulate ``kind`` ("tokens" or "ekfac": ``run.kernels.statistics_kind``) statistics (see ``__init__``)."""
        self.statistics, self.statistics_kind = {}, kind

    def _size_targets(self, proj_dim: int, fallback: List[str], parameters: Mapping[str, nn.Parameter]) -> None:
        """Give each matrix a share of ``proj_dim`` proportional to its size, split k_r:k_c as r:c."""
        if self.kind == "identity":
            for target in self.targets:
                target.k_rows, target.k_cols = target.rows, target.cols
            fallback_dim = None
        elif self.sizing == "legacy":
            fallback_dim = legacy_sizes(self.targets, proj_dim, sum(parameters[n].numel() for n in fallback))
        else:
            fallback_numel = sum(parameters[n].numel() for n in fallback) if fallback else None
            fallback_dim = filled_sizes(self.targets, proj_dim, fallback_numel, square=self.sizing == "square")
        offset = self._place_targets()
        self.fallback_projector = None
        if fallback:
            numels = {name: parameters[name].numel() for name in fallback}
            self.fallback_projector = (
                IdentityProjector(numels, self.device)
                if self.kind == "identity"
                else RandomProjector(numels, fallback_dim, "rademacher", self.seed, self.device)
            )
            offset += self.fallback_projector.proj_dim
        if self.kind != "identity" and offset > proj_dim:
            raise InvalidArgumentError(
                f"proj_dim={proj_dim} is too small for {len(self.targets)} factored matrices "
                f"(each needs at least one dimension); use proj_dim >= {offset}."
            )
        if self.kind != "identity" and self.sizing != "legacy" and offset < proj_dim:
            # A few dimensions short (no bias vector left to take single ones) is routine; more is worth a warning.
            level = logging.WARNING if offset < UNDERFILL_WARNING_SHARE * proj_dim else logging.INFO
            logger.log(
                level,
                "The factored projector gives k=%d features for proj_dim=%d: every projected matrix has its full "
                "size (k_rows = rows, k_cols = cols) or no step of k_rows or k_cols fits the rest.",
                offset,
                proj_dim,
            )
        self.proj_dim = offset

    # ----------------------------------------------------------------- factors
    def principal_sides(self) -> List[Tuple[Target, str]]:
        """(target, side) of the sides that get principal factors: weights' sides with k < d ≤ MAX_PRINCIPAL_SIDE
        (none when ``principal_share`` is 0)."""
        if not self.principal_share or self.kind == "identity":
            return []
        sides = [(t, side) for t in self.weights() for side in ("rows", "cols")]  # k_rows < rows, or k_cols < cols
        return [(t, side) for t, side in sides if getattr(t, f"k_{side}") < getattr(t, side) <= MAX_PRINCIPAL_SIDE]

    def set_factors(self, model_id: int, factors: Optional[Mapping[str, Tensor]]) -> None:
        """Use ``factors`` ({"<name>/<side>": d × k}, from ``principal_factors``) for checkpoint ``model_id``;
        ``None`` forgets them (features then need them set again)."""
        for target, side in self.principal_sides():
            if factors is None:
                self._factors.pop((model_id, target.name, side), None)
                continue
            factor = factors.get(f"{target.name}/{side}")
            expected = target.side(side)
            if factor is None or tuple(factor.shape) != expected:
                found = None if factor is None else tuple(factor.shape)
                raise CorruptStoreError(
                    f"The principal factor {target.name}/{side} of checkpoint {model_id} is {found}, not {expected}."
                )
            self._factors[(model_id, target.name, side)] = factor.to(self.device, torch.float32)

    def principal_factors(
        self, model_id: int, moments: Mapping[str, Tensor], leading: Optional[Mapping[str, Tensor]] = None
    ) -> Dict[str, Tensor]:
        """{"<name>/<side>": P = [V_a, (I − V_a V_aᵀ) R]} for each principal side (``principal_factor``), from its
        second moment F (``side_tokens`` summed over the sample) and ``leading[name]``, F's leading eigenvectors
        where found before (``hf_trak.run.block_shapes``)."""
        factors = {}
        for target, side in self.principal_sides():
            name = f"{target.name}/{side}"
            dim, k = target.side(side)
            generator = seeded_generator(self.seed, model_id, target.name, side, "principal")
            found = (leading or {}).get(name)
            factors[name] = principal_factor(moments.get(name), dim, k, self.principal_share, generator, found)
        return factors

    def factor(self, model_id: int, target: Target, side: str) -> Tensor:
        """P_r (rows × k_rows) or P_c (cols × k_cols) of ``target``: identity, ±1/√k Rademacher, or the principal
        factor given by ``set_factors``."""
        dim, k = target.side(side)
        key = (model_id, target.name, side)
        if key not in self._factors and any(t.name == target.name and s == side for t, s in self.principal_sides()):
            raise IncompleteStoreError(
                f"Checkpoint {model_id} has no principal factors yet (principal_share={self.principal_share}): "
                "featurize computes and stores them; scoring loads them from the store."
            )
        if key not in self._factors:
            if k == dim:
                factor = torch.eye(dim)
            else:
                generator = seeded_generator(self.seed, model_id, target.name, side)
                signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
                factor = (signs.to(torch.float32) * 2 - 1) / math.sqrt(k)
            self._factors[key] = factor.to(self.device)
        return self._factors[key]

    # ------------------------------------------------------------- projection
    def __call__(
        self,
        task: AbstractModelOutput,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        model_id: int,
    ) -> Tensor:
        batch_size = next(iter(batch.values())).shape[0]
        out = torch.zeros(batch_size, self.proj_dim, device=self.device)
        if self.targets:
            self._project_factored(task, weights, buffers, batch, model_id, out)
        if self.fallback_gradients is not None:
            for grads in self.fallback_gradients(task, weights, buffers, batch):
                out[:, self.fallback_offset :] += self.fallback_projector.project(grads, model_id)
            self._add_gram(f"block_{len(self.targets)}", out[:, self.fallback_offset :])
        if self.kind != "identity":
            out.mul_(math.sqrt(self.proj_dim))
        return out

    def captured(self, task, weights, buffers, batch, batch_size: int) -> List[Tuple[_Use, Tensor, Tensor]]:
        """(layer use, its input, its output gradient δ (B, T, d_out) or None) of every hooked layer, from one
        forward and backward of Σ_i f(z_i)."""
        records: List[Tuple[_Use, Tensor, Tensor]] = []

        def hook(use):
            def record(module, inputs, output):
                inputs = inputs[0].detach()
                if output.shape[0] != batch_size:
                    if output.shape[0] != 1:
                        raise InvalidArgumentError(
                            f"{type(module).__name__} output has leading dimension {output.shape[0]}, "
                            f"not the batch size {batch_size}: exclude its parameters from grad_wrt."
                        )
                    # An input shared by the batch (position ids of shape (1, T)): give every example its
                    # own copy of the output, so that its gradient is per example and not summed.
                    inputs = inputs.expand(batch_size, *inputs.shape[1:])
                    output = output.expand(batch_size, *output.shape[1:])
                records.append((use, inputs, output))
                return output

            return record

        handles = [use.module.register_forward_hook(hook(use)) for use in self.uses]
        try:
            # Detached leaves that require grad put the layer outputs on the autograd graph; only
            # the output gradients δ are asked for, so no weight gradient is ever computed.
            leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in weights.items()}
            with torch.enable_grad(), keeping_outputs():  # Q of the batch reuses this forward's outputs
                total = task.get_output(self.model, leaves, buffers, batch)
                deltas = torch.autograd.grad(total, [output for _, _, output in records], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return [
            (use, inputs, None if delta is None else delta.detach().float().reshape(batch_size, -1, delta.shape[-1]))
            for (use, inputs, _), delta in zip(records, deltas)
        ]

    def weights(self) -> List[Target]:
        """The targets that are weights (not biases): what ``block_sizes="spectrum"`` sizes."""
        biases = {use.bias for use in self.uses}
        return [target for target in self.targets if target.name not in biases]

    def reshape(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Give each weight the sides ``shapes[name]`` = (k_r, k_c) (``hf_trak.method.block_sizes``); the biases and
        the dense fallback block keep theirs, and the features' layout (offsets, ``proj_dim``) follows.
        ``CorruptStoreError`` unless the shapes name every weight and fit it."""
        weights = {target.name: target for target in self.weights()}
        fits = set(shapes) == set(weights) and all(
            1 <= int(shapes[name][0]) <= t.rows and 1 <= int(shapes[name][1]) <= t.cols for name, t in weights.items()
        )
        if not fits:
            raise CorruptStoreError(
                f"The recorded block shapes do not fit this model's {len(weights)} projected weights: pass the model "
                "and grad_wrt the features were made with."
            )
        for name, (k_rows, k_cols) in shapes.items():
            weights[name].k_rows, weights[name].k_cols = int(k_rows), int(k_cols)
        offset = self._place_targets()
        self.proj_dim = offset + (self.fallback_projector.proj_dim if self.fallback_projector is not None else 0)
        self._factors.clear()

    def _place_targets(self) -> int:
        """Each target's offset in the features, one after the other; returns the fallback block's offset."""
        offset = 0
        for target in self.targets:
            target.offset = offset
            offset += target.size
        self.fallback_offset = offset
        return offset

    def side_tokens(self, task, weights, buffers, batch, sides=None) -> Iterator[Tuple[str, Tensor]]:
        """("<name>/<side>", V) for each of ``sides`` (default: the principal sides) and each use of its weight in
        a batch: the vectors u_t of the tokens that reach the loss, with finite values (n × d, float32), whose
        Σ_t u_t u_tᵀ = VᵀV is the side's per-token second moment (K-FAC's factor); for an embedding's one-hot
        ids, their counts (d,), the moment's diagonal."""
        sides = self.principal_sides() if sides is None else sides
        batch_size = next(iter(batch.values())).shape[0]
        for use, inputs, delta in self.captured(task, weights, buffers, batch, batch_size):
            if delta is None or use.weight is None:
                continue
            alive = reaching_tokens(delta) & finite_examples(delta, inputs)
            for target, side in sides:
                if target.name != use.weight:
                    continue
                if isinstance(use.module, nn.Embedding) and side == "rows":
                    yield f"{target.name}/{side}", id_counts(use.module, inputs.reshape(-1)[alive]).double()
                else:
                    yield f"{target.name}/{side}", finite_rows(side_vectors(use.module, inputs, delta, side)[alive])

    def _project_factored(self, task, weights, buffers, batch, model_id: int, out: Tensor) -> None:
        batch_size = out.shape[0]
        targets = {target.name: target for target in self.targets}
        position = {target.name: index for index, target in enumerate(self.targets)}
        for use, inputs, delta in self.captured(task, weights, buffers, batch, batch_size):
            if delta is None:
                continue
            if use.weight is not None:
                target = targets[use.weight]
                rows, cols = self.factor(model_id, target, "rows"), self.factor(model_id, target, "cols")
                u, v = projected_pair(use.module, inputs, delta, rows, cols)
                projected = torch.einsum("btr,btc->brc", u, v).reshape(batch_size, -1)
                out[:, target.offset : target.offset + target.size] += projected
                block = f"block_{position[use.weight]}"
                if self.statistics is not None and self.statistics_kind == "tokens":
                    self._add_gram(block, gram=token_gram(use.module, inputs, u, v))
                if self.statistics is not None:
                    alive = reaching_tokens(delta) & finite_examples(u, v)
                    self._add_gram(block + "_rows", u.reshape(-1, target.k_rows)[alive])
                    self._add_gram(block + "_cols", v.reshape(-1, target.k_cols)[alive])
            if use.bias is not None:
                target = targets[use.bias]
                tokens = delta @ self.factor(model_id, target, "rows")
                out[:, target.offset : target.offset + target.size] += tokens.sum(1)
                self._add_gram(f"block_{position[use.bias]}", tokens.reshape(-1, target.size))

    def _add_gram(self, name: str, rows: Optional[Tensor] = None, gram: Optional[Tensor] = None) -> None:
        """statistics[name] += rowsᵀ rows (or ``gram``, formed so): one batch's product in float32 (a batch's few
        thousand token rows lose ~1e-7 relative), the running sum over batches in float64."""
        if self.statistics is not None:
            gram = (finite_gram(rows) if gram is None else gram).double()
            self.statistics[name] = gram + self.statistics[name] if name in self.statistics else gram
