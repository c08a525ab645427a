"""The model at one checkpoint: its tensors loaded once, and f, per-example features and Q there.

``FeatureMap`` holds what does not depend on the checkpoint: the architecture, the model
output function, the p differentiated parameters, the projector and the 4D-mask adapter.
``FeatureMap.at(checkpoint, model_id)`` is the one place that loads a checkpoint; the
``CheckpointView`` it returns evaluates, at those tensors θ_m:

    view.features(batch)      x_i = P_mᵀ ∇_θ f(z_i; θ_m) / √p     (B, k) float32, and the prepared batch
    view.out_to_loss(batch)   Q_i = ∂ℓ/∂f at z_i                  (B,)
    view.outputs(batch)       f(z_i; θ_m)                          (B,)
    view.fingerprints()       sha256 of θ_m, and of its non-adapter part (PEFT; else "")

Featurize, scoring and ``hf_trak.evaluate`` all go through a view, so a call loads each
checkpoint once. A task that depends on other examples (CLIP's contrast set) is bound to
the checkpoint by ``task.at_checkpoint`` the first time the view needs it.
"""

import dataclasses
import logging
import math
from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from hf_trak.arguments import TRAKArguments
from hf_trak.errors import InvalidArgumentError
from hf_trak.hf.adapters import adapter_parameter_names, is_peft_model
from hf_trak.hf.checkpoints import Checkpoint, checkpoint_fingerprint, load_checkpoint
from hf_trak.method.estimator import default_parameters, resolve_estimator
from hf_trak.method.factored import FactoredGradientProjector, factorable_parameter_names
from hf_trak.method.gradients import DenseGradientProjector, PerExampleGradients, select_parameters
from hf_trak.method.masks import AttentionMaskAdapter
from hf_trak.method.model_outputs import AbstractModelOutput, call_model, without_labels
from hf_trak.method.projectors import make_projector
from hf_trak.store.config import STORE_VERSION

logger = logging.getLogger(__name__)

SampleTrainBatch = Callable[[int, int], dict]


# projector="auto": a dense projection matrix of p·k elements up to this size (1 GiB in float32, e.g. a
# 130k-parameter model at k = 2048) is affordable; beyond it, the factored projector is used when the
# Linear/Conv1D/Embedding layers hold at least AUTO_MIN_FACTORABLE_SHARE of the p selected elements.
# (benchmarks/factored.py: on a BERT-small-sized classifier dense costs 183× factored per example.)
AUTO_DENSE_MAX_ELEMENTS = 2**28
AUTO_MIN_FACTORABLE_SHARE = 0.9
# estimator="hf_trak" takes the factored projector (for its per-module kernels) when k gives each factored
# matrix at least this many dimensions on average; below, a dense projection keeps the features meaningful.
AUTO_MIN_DIMS_PER_MATRIX = 4


def choose_projector(model: nn.Module, args: TRAKArguments) -> Tuple[str, str]:
    """``(projector, why)``: ``args.projector``, or for ``"auto"`` the factored projector when the
    Linear/Conv1D/Embedding layers hold at least ``AUTO_MIN_FACTORABLE_SHARE`` of the p selected elements
    and either ``args.estimator`` is ``"hf_trak"`` (its per-module kernels need it; with k at least
    ``AUTO_MIN_DIMS_PER_MATRIX`` per factored matrix) or p·k exceeds ``AUTO_DENSE_MAX_ELEMENTS``;
    rademacher otherwise."""
    if args.projector != "auto":
        return args.projector, f"projector={args.projector!r} was asked for"
    selected = differentiated_parameters(model, dataclasses.replace(args, projector="rademacher"))
    numels = {name: parameter.numel() for name, parameter in model.named_parameters()}
    p, k = sum(numels[name] for name in selected), args.proj_dim
    size = f"p·k = {p:,}·{k:,} = {p * k:,}"
    factorable = set(factorable_parameter_names(model))
    share = sum(numels[name] for name in selected if name in factorable) / p
    layers = "Linear/Conv1D/Embedding layers hold"
    matrices = sum(1 for name in selected if name in factorable)
    if share >= AUTO_MIN_FACTORABLE_SHARE and args.estimator == "hf_trak" and k >= AUTO_MIN_DIMS_PER_MATRIX * matrices:
        return "factored", (
            f"estimator='hf_trak', {layers} {share:.1%} of p and k = {k:,} ≥ {AUTO_MIN_DIMS_PER_MATRIX} per factored "
            f"matrix ({matrices}): the factored projector (per-module kernels)"
        )
    if p * k <= AUTO_DENSE_MAX_ELEMENTS:
        return "rademacher", f"{size} ≤ 2^28 elements: a dense Rademacher projection"
    if share >= AUTO_MIN_FACTORABLE_SHARE:
        return "factored", (
            f"{size} > 2^28 elements and {layers} {share:.1%} of p: the factored "
            "projector (a dense one would regenerate a p × k matrix per batch)"
        )
    return "rademacher", (
        f"{size} > 2^28 elements, but {layers} only {share:.1%} of p: a dense "
        "Rademacher projection (slow at this size; pass grad_wrt= to differentiate fewer parameters)"
    )


def differentiated_parameters(model: nn.Module, args: TRAKArguments) -> list:
    """The parameters to differentiate: ``args.grad_wrt``; by default the trainable ones (a PEFT model in
    inference mode: its adapter), restricted to factorable layers for the factored projector, of which the
    estimator keeps its own (``hf_trak.method.estimator.default_parameters``: hf_trak's leave the biases out, and the
    attention's query/key/value projections of a whole model)."""
    if args.grad_wrt_selection is not None:
        return select_parameters(model, args.grad_wrt_selection)
    grad_wrt, factorable = None, False
    if is_peft_model(model) and not any(p.requires_grad for p in model.parameters()):
        grad_wrt = adapter_parameter_names(model)
    elif args.projector == "factored":
        trainable = set(select_parameters(model))
        grad_wrt = [name for name in factorable_parameter_names(model) if name in trainable]
        factorable = True
    whole_model = factorable and not is_peft_model(model)  # an adapter's layers are the user's choice
    selected = select_parameters(model, grad_wrt)
    names = default_parameters(args, model, selected, whole_model=whole_model)
    if factorable:
        logger.info(
            "Factored projection: differentiating %d of %d Linear/Conv1D/Embedding parameters (estimator=%r: "
            "hf_trak leaves biases and attention query/key/value projections out); pass grad_wrt to choose them "
            "(others use the dense fallback).",
            len(names),
            len(selected),
            args.estimator,
        )
    return names


class FeatureMap:
    """z ↦ x = P_mᵀ ∇_θ f(z; θ_m) / √p for ``model`` with ``task`` and the settings of ``args``
    (``args=None``: no features, for views that only evaluate f or Q). ``store_version``: the
    store format the features are for (older stores keep the factored projector's old sizes).
    ``self.args``: ``args`` with the projector chosen and the estimator's settings resolved
    (``hf_trak.method.estimator``), which the factored projector's sizes depend on."""

    def __init__(
        self,
        model: nn.Module,
        task: AbstractModelOutput,
        args: Optional[TRAKArguments],
        device: torch.device,
        store_version: int = STORE_VERSION,
    ):
        self.model, self.task, self.device = model, task, torch.device(device)
        self.masks = AttentionMaskAdapter(dtype=next(model.parameters()).dtype)
        self.param_names, self.num_params, self.projector = [], 0, None
        self.store_version = store_version
        self.projector_kind, self.projector_reason = None, ""
        self.args = args
        self.store = None  # the feature store whose principal factors the views use (``at``)
        if args is not None:
            self.projector_kind, self.projector_reason = choose_projector(model, args)
            if args.projector == "auto":
                logger.info("projector='auto' chose %s: %s.", self.projector_kind, self.projector_reason)
            self.args = resolve_estimator(args, self.projector_kind, task, store_version)
            self._make_projector(dataclasses.replace(self.args, projector=self.projector_kind))

    def _make_projector(self, args: TRAKArguments) -> None:
        model = self.model
        self.param_names = differentiated_parameters(model, args)
        parameters = dict(model.named_parameters())
        self.num_params = sum(parameters[name].numel() for name in self.param_names)
        if args.projector == "factored":
            sizing = "fill" if self.store_version >= 3 else "legacy"
            if self.store_version >= 4 and args.kernel_from == "tokens":
                sizing = "square"  # per-token gradients are rank one: equal sides project them best
            self.projector = FactoredGradientProjector(
                model,
                self.param_names,
                args.proj_dim,
                args.projector_seed,
                self.device,
                sizing=sizing,
                principal_share=args.principal_share or 0.0,
            )
        else:
            numels = {name: parameters[name].numel() for name in self.param_names}
            self.projector = DenseGradientProjector(
                PerExampleGradients(model, self.param_names, args.param_chunk_numel),
                make_projector(
                    args.projector,
                    numels,
                    args.proj_dim,
                    args.projector_seed,
                    self.device,
                    args.max_projector_cache_bytes,
                ),
            )

    @property
    def dim(self) -> int:
        """k, the feature dimension."""
        return self.projector.proj_dim

    def kernel_blocks(self, kernel: str) -> list:
        """[offset, size] of each per-module kernel block (one per projected matrix of the factored projector,
        and one for its dense fallback); [] for a global kernel."""
        if kernel == "global" or self.projector is None:
            return []
        if not isinstance(self.projector, FactoredGradientProjector):
            raise InvalidArgumentError(
                f"kernel='per_module' needs features made per projected matrix, which the factored projector "
                f"gives and the {self.projector_kind} one does not: pass projector='factored'."
            )
        blocks = [[target.offset, target.size] for target in self.projector.targets]
        if self.projector.fallback_projector is not None:
            blocks.append([self.projector.fallback_offset, self.projector.fallback_projector.proj_dim])
        return blocks

    def at(
        self, checkpoint: Checkpoint, model_id: int, sample_train_batch: Optional[SampleTrainBatch] = None
    ) -> "CheckpointView":
        """Load ``checkpoint`` (the only load of it in a featurize or score call) as checkpoint ``model_id``, with
        the principal factors ``self.store`` holds for it, if the projector has any (featurize makes them)."""
        weights, buffers = load_checkpoint(checkpoint, self.model, self.device)
        if isinstance(self.projector, FactoredGradientProjector) and self.projector.principal_sides():
            has_factors = self.store is not None and self.store.has_principal_factors(model_id)
            self.projector.set_factors(model_id, self.store.principal_factors(model_id) if has_factors else None)
        return CheckpointView(self, model_id, weights, buffers, sample_train_batch)


class CheckpointView:
    """``FeatureMap`` at the tensors ``weights``/``buffers`` of checkpoint ``model_id`` (see the module docstring)."""

    def __init__(
        self,
        feature_map: FeatureMap,
        model_id: int,
        weights: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        sample_train_batch: Optional[SampleTrainBatch] = None,
    ):
        self.map, self.model_id, self.weights, self.buffers = feature_map, model_id, weights, buffers
        self._sample_train_batch = sample_train_batch
        self._task: Optional[AbstractModelOutput] = None

    @property
    def task(self) -> AbstractModelOutput:
        """The model output function bound to this checkpoint (``AbstractModelOutput.at_checkpoint``)."""
        if self._task is None:
            model = self.map.model
            self._task = self.map.task.at_checkpoint(model, self.weights, self.buffers, self._sample)
        return self._task

    def _sample(self, num_examples: int, seed: int) -> dict:
        if self._sample_train_batch is None:
            raise RuntimeError(
                f"{type(self.map.task).__name__} needs training examples: call featurize(...) first, "
                "or pass train_dataset= to TRAKer.from_pretrained."
            )
        return self._to_device(self._sample_train_batch(num_examples, seed))

    def _to_device(self, batch: Mapping[str, Tensor]) -> dict:
        return {name: value.to(self.map.device) for name, value in batch.items()}

    def forward(self, batch: Mapping[str, Tensor]):
        """Model outputs at this checkpoint (labels left out)."""
        return call_model(self.map.model, self.weights, self.buffers, without_labels(batch))

    def prepare(self, batch: Mapping[str, Tensor]) -> dict:
        """The batch on the device, 2D attention masks replaced by the model's 4D mask (for ``vmap``)."""
        return self.map.masks(self._to_device(batch), self.forward)

    def features(self, batch: Mapping[str, Tensor]) -> Tuple[Tensor, dict]:
        """``(x, prepared batch)``: x_i = P_mᵀ g_i / √p for each example, (B, k) float32."""
        batch = self.prepare(batch)
        projected = self.map.projector(self.task, self.weights, self.buffers, batch, self.model_id)
        return projected.div_(math.sqrt(self.map.num_params)), batch

    def side_moments(self, batch: Mapping[str, Tensor]) -> dict:
        """The per-token second moments of a batch (``FactoredGradientProjector.side_moments``; one batched
        forward and backward, no ``vmap``: the batch keeps its 2D attention mask)."""
        return self.map.projector.side_moments(self.task, self.weights, self.buffers, self._to_device(batch))

    def out_to_loss(self, prepared_batch: Mapping[str, Tensor]) -> Tensor:
        """Q of each example of a batch from ``features`` (B,)."""
        with torch.no_grad():
            return self.task.get_out_to_loss_grad(self.map.model, self.weights, self.buffers, prepared_batch)

    def outputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """f(z_i; θ_m) of each example (B,), without gradients."""
        batch, task = self.prepare(batch), self.task

        def output(example):
            example = {name: value.unsqueeze(0) for name, value in example.items()}
            return task.get_output(self.map.model, self.weights, self.buffers, example)

        with torch.no_grad():
            return torch.vmap(output)(batch)

    def fingerprints(self) -> Tuple[str, str]:
        """(sha256 of all θ_m, of θ_m without the adapter's tensors: "" for a model without adapter)."""
        base = ""
        if is_peft_model(self.map.model):
            adapter = set(adapter_parameter_names(self.map.model))
            base = checkpoint_fingerprint({name: w for name, w in self.weights.items() if name not in adapter})
        return checkpoint_fingerprint(self.weights), base
