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
import math
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from hf_trak.arguments import TRAKArguments
from hf_trak.errors import InvalidArgumentError, NotFeaturizedError
from hf_trak.hf.adapters import adapter_parameter_names, is_peft_model
from hf_trak.hf.checkpoints import Checkpoint, checkpoint_fingerprint, load_checkpoint
from hf_trak.hf.input_grads import input_require_grads_off
from hf_trak.hf.sharding import check_shardable, is_fsdp
from hf_trak.method.block_sizes import SideSample
from hf_trak.method.estimator import differentiated_parameters
from hf_trak.method.factored import FactoredGradientProjector
from hf_trak.method.gradients import DenseGradientProjector, PerExampleGradients
from hf_trak.method.masks import AttentionMaskAdapter
from hf_trak.method.model_outputs import AbstractModelOutput, call_model, without_labels
from hf_trak.method.projectors import make_projector
from hf_trak.method.token_vectors import token_features
from hf_trak.store.versions import STORE_VERSION, factored_sizing

SampleTrainBatch = Callable[[int, int], dict]


class FeatureMap:
    """z ↦ x = P_mᵀ ∇_θ f(z; θ_m) / √p for ``model`` with ``task`` and the resolved settings ``args``
    (``hf_trak.method.estimator.resolve_settings``; ``args=None``: no features, for views that only evaluate f
    or Q). ``store_version``: the store format the features are for (``hf_trak.store.versions``)."""

    def __init__(
        self,
        model: nn.Module,
        task: AbstractModelOutput,
        args: Optional[TRAKArguments],
        device: torch.device,
        store_version: int = STORE_VERSION,
    ):
        check_shardable(model)
        self.model, self.task, self.device = model, task, torch.device(device)
        self.sharded = is_fsdp(model)  # FSDP2: its own forward, in lockstep (``hf_trak.hf.sharding``)
        self.masks = AttentionMaskAdapter(dtype=next(model.parameters()).dtype)
        self.param_names, self.num_params, self.projector = [], 0, None
        self.store_version = store_version
        self.args = args
        self.store = None  # the feature store whose principal factors the views use (``at``)
        if args is not None:
            self._make_projector(args)
            self._check_sharded_projector()

    def _make_projector(self, args: TRAKArguments) -> None:
        model = self.model
        self.param_names = differentiated_parameters(model, args)
        parameters = dict(model.named_parameters())
        self.num_params = sum(parameters[name].numel() for name in self.param_names)
        if args.projector == "factored":
            sizing = factored_sizing(self.store_version, args.kernel_from)
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

    def _check_sharded_projector(self) -> None:
        """A sharded model's features come from the factored projector alone (``hf_trak.hf.sharding``)."""
        if not self.sharded:
            return
        factored = isinstance(self.projector, FactoredGradientProjector)
        if not factored or self.projector.fallback_gradients is not None:
            names = sum(self.projector.fallback_gradients.chunks, []) if factored else self.param_names
            raise InvalidArgumentError(
                f"An FSDP-sharded model is featurized by the factored projector alone, from each layer's inputs and "
                f"output gradients; {len(names)} parameter(s) would need whole per-example gradients (such as "
                f"{names[0]}). Pass projector='factored' and grad_wrt naming Linear, Conv1D and Embedding weights "
                "and biases only, or give hf_trak the unsharded model."
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
                f"gives and the {self.args.projector} one does not: pass projector='factored'."
            )
        blocks = [[target.offset, target.size] for target in self.projector.targets]
        if self.projector.fallback_projector is not None:
            blocks.append([self.projector.fallback_offset, self.projector.fallback_projector.proj_dim])
        return blocks

    def reshaped(self, config, shapes: Mapping[str, Sequence[int]]):
        """``config`` (a ``TRAKConfig``) with the factored projector given ``shapes`` ({weight: (k_r, k_c)},
        ``FactoredGradientProjector.reshape``): its ``block_shapes``, feature dimension and kernel blocks follow."""
        self.projector.reshape(shapes)
        return dataclasses.replace(
            config,
            block_shapes={name: [int(k_rows), int(k_cols)] for name, (k_rows, k_cols) in shapes.items()},
            feature_dim=self.dim,
            kernel_blocks=self.kernel_blocks(config.kernel),
        )

    def at(
        self, checkpoint: Checkpoint, model_id: int, sample_train_batch: Optional[SampleTrainBatch] = None
    ) -> "CheckpointView":
        """Load ``checkpoint`` (the only load of it in a featurize or score call) as checkpoint ``model_id``, with
        the principal factors ``self.store`` holds for it, if the projector has any (featurize makes them)."""
        weights, buffers = (
            self._own_tensors(checkpoint) if self.sharded else load_checkpoint(checkpoint, self.model, self.device)
        )
        if isinstance(self.projector, FactoredGradientProjector) and self.projector.principal_sides():
            has_factors = self.store is not None and self.store.has_principal_factors(model_id)
            self.projector.set_factors(model_id, self.store.principal_factors(model_id) if has_factors else None)
        return CheckpointView(self, model_id, weights, buffers, sample_train_batch)

    def _own_tensors(self, checkpoint: Checkpoint) -> Tuple[dict, dict]:
        """A sharded model's own parameters and buffers: its only checkpoint (``hf_trak.hf.sharding``)."""
        self.check_checkpoints([checkpoint])
        return dict(self.model.named_parameters()), dict(self.model.named_buffers())

    def check_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Refuse checkpoints a sharded model cannot be evaluated at: any but the model itself."""
        if self.sharded and any(checkpoint is not self.model for checkpoint in checkpoints):
            raise InvalidArgumentError(
                "An FSDP-sharded model is featurized and scored at its own weights: pass checkpoints=[model] (one "
                "checkpoint; for several, give hf_trak the unsharded model and its checkpoints)."
            )

    def check_unsharded(self, what: str) -> None:
        """Refuse ``what`` for a sharded model: a pass that runs on some processes only, or under ``vmap``."""
        if self.sharded:
            raise InvalidArgumentError(
                f"{what} needs the whole model on one process; the model is FSDP-sharded, which featurize, score, "
                "top_k, self_scores and attribute support. Load the model unsharded (from_pretrained) for this call."
            )


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
            raise NotFeaturizedError(
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
        """The batch on the device, 2D attention masks replaced by the model's 4D mask (for ``vmap``; a sharded model
        keeps its 2D mask: no ``vmap`` runs on it, and finding the 4D mask takes a number of forward passes that
        depends on the batch, which would break the processes' lockstep)."""
        if self.map.sharded:
            return self._to_device(batch)
        return self.map.masks(self._to_device(batch), self.forward)

    def features(self, batch: Mapping[str, Tensor]) -> Tuple[Tensor, dict]:
        """``(x, prepared batch)``: x_i = P_mᵀ g_i / √p for each example, (B, k) float32."""
        batch = self.prepare(batch)
        projected = self.map.projector(self.task, self.weights, self.buffers, batch, self.model_id)
        return projected.div_(math.sqrt(self.map.num_params)), batch

    def token_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, T + 1, k) float32: x_{i,t}, each position's part of ``features``, then the part of the layers that
        see no positions; they sum to x_i (``hf_trak.method.token_vectors.token_features``)."""
        if not isinstance(self.map.projector, FactoredGradientProjector):
            raise InvalidArgumentError(
                'Per-token scores need the factored projector: featurize with projector="factored".'
            )
        self.map.check_unsharded("Per-token scores")
        batch = self._to_device(batch)
        projected = token_features(self.map.projector, self.task, self.weights, self.buffers, batch, self.model_id)
        return projected.div_(math.sqrt(self.map.num_params))

    def side_tokens(self, batch: Mapping[str, Tensor], sides=None):
        """The tokens' vectors of each side in a batch (``FactoredGradientProjector.side_tokens``, an iterator)."""
        return self.map.projector.side_tokens(self.task, self.weights, self.buffers, self._to_device(batch), sides)

    def side_samples(self, batch: Mapping[str, Tensor], sides=None) -> dict:
        """{"<name>/<side>": ``SideSample``} of a batch, for each of ``sides`` (default: the principal sides) from
        ``side_tokens``: the per-token second moments F = Σ_{i,t} u_t u_tᵀ (K-FAC's factors, ``SideSample.dense``)
        that ``FactoredGradientProjector.principal_factors`` takes the eigenvectors of. One batched forward and
        backward, no ``vmap``: the batch keeps its 2D attention mask."""
        samples = {}
        for name, tokens in self.side_tokens(batch, sides):
            samples.setdefault(name, SideSample()).add(tokens)
        return samples

    def out_to_loss(self, prepared_batch: Mapping[str, Tensor]) -> Tensor:
        """Q of each example of a batch from ``features`` (B,)."""
        with torch.no_grad():
            return self.task.get_out_to_loss_grad(self.map.model, self.weights, self.buffers, prepared_batch)

    def outputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """f(z_i; θ_m) of each example (B,), without gradients."""
        self.map.check_unsharded("The model's outputs (evaluate, the checks, the explorer)")
        batch, task = self.prepare(batch), self.task

        def output(example):
            example = {name: value.unsqueeze(0) for name, value in example.items()}
            return task.get_output(self.map.model, self.weights, self.buffers, example)

        with torch.no_grad(), input_require_grads_off(self.map.model):
            return torch.vmap(output)(batch)

    def fingerprints(self) -> Tuple[str, str]:
        """(sha256 of all θ_m, of θ_m without the adapter's tensors: "" for a model without adapter)."""
        base = ""
        if is_peft_model(self.map.model):
            adapter = set(adapter_parameter_names(self.map.model))
            base = checkpoint_fingerprint({name: w for name, w in self.weights.items() if name not in adapter})
        return checkpoint_fingerprint(self.weights), base
