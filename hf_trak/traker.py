"""``TRAKer``: featurize a training split over checkpoints, then score target splits.

Per checkpoint m and example z_i: x_i = P_mᵀ ∇_θ f(z_i; θ_m) / √p (p = number of
differentiated parameters) and Q_i; the kernel and scores are those of ``kernel``.
The model given to ``TRAKer`` is only used for its architecture: every forward pass is a
``functional_call`` at a checkpoint's tensors.
"""

import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .checkpoints import Checkpoint, load_checkpoint
from .config import CONFIG_NAME, TRAKConfig
from .data import ExampleSource
from .factored import FactoredGradientProjector, factorable_parameter_names
from .gradients import DenseGradientProjector, GradWrt, PerExampleGradients, select_parameters
from .kernel import merge_top_k, regularized_inverse, resolve_lambda, score_block
from .masks import AttentionMaskAdapter
from .model_outputs import AbstractModelOutput, AutoModelOutput, call_model, eval_mode, without_labels
from .projectors import make_projector

logger = logging.getLogger(__name__)


@dataclass
class CheckpointFeatures:
    """Finalized train features of one checkpoint.

    ``features``: Φ = X K (n × k, storage dtype); ``out_to_loss``: Q (n,); ``xtx``: XtX
    (k × k, float32); ``lambda_reg``: the λ used in K.
    """

    features: Tensor
    out_to_loss: Tensor
    xtx: Tensor
    lambda_reg: float

    def to_tensors(self) -> dict:
        return {
            "features": self.features,
            "out_to_loss": self.out_to_loss,
            "xtx": self.xtx,
            "lambda_reg": torch.tensor(self.lambda_reg, dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> "CheckpointFeatures":
        return cls(tensors["features"], tensors["out_to_loss"], tensors["xtx"], float(tensors["lambda_reg"]))


class TopK(NamedTuple):
    """``indices[j]``/``scores[j]``: the k train examples with the highest (or lowest) score for target j."""

    indices: np.ndarray
    scores: np.ndarray


class TRAKer:
    """TRAK data attribution for a Hugging Face model.

    Args:
        model: the architecture (e.g. ``BertForSequenceClassification``); never modified.
        task: None (pick from the model head with ``AutoModelOutput``), a task name, or an
            ``AbstractModelOutput``.
        proj_dim: k, the feature dimension (ignored by ``projector="identity"``).
        projector: ``"rademacher"``, ``"normal"``, ``"identity"`` (raw gradients), or ``"factored"``
            (Kronecker projection from one batched forward/backward, see ``hf_trak.factored``;
            by default it differentiates the Linear/Conv1D/Embedding parameters only).
        projector_seed: seed of the projection (checkpoint m gets its own matrix).
        lambda_reg: λ added to XtX; None derives it per checkpoint (see ``hf_trak.kernel``).
        dtype: storage dtype of the train features.
        save_dir: where ``featurize`` writes its features (None: keep them in memory only).
        device: where gradients are computed (default: the model's device).
        grad_wrt: parameters to differentiate (see ``select_parameters``); default the trainable ones.
        param_chunk_numel: dense projectors: compute per-example gradients for at most this
            many parameter elements at a time (bounds memory to batch_size × param_chunk_numel floats).
        max_projector_cache_bytes: memory for cached projection blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        task=None,
        proj_dim: Optional[int] = 2048,
        projector: str = "rademacher",
        projector_seed: int = 0,
        lambda_reg: Optional[float] = None,
        dtype: torch.dtype = torch.float16,
        save_dir: Optional[str] = "trak_results",
        device=None,
        grad_wrt: GradWrt = None,
        param_chunk_numel: Optional[int] = None,
        max_projector_cache_bytes: int = 4 * 2**30,
    ):
        self.model = model
        self.task: AbstractModelOutput = AutoModelOutput.resolve(model, task)
        self.task.check_model(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype, self.lambda_reg, self.save_dir = dtype, lambda_reg, save_dir
        if projector == "factored" and grad_wrt is None:
            trainable = set(select_parameters(model))
            grad_wrt = [name for name in factorable_parameter_names(model) if name in trainable]
            logger.info(
                "Factored projection: differentiating %d Linear/Conv1D/Embedding parameters; "
                "pass grad_wrt to add others (dense fallback).",
                len(grad_wrt),
            )
        self.param_names = select_parameters(model, grad_wrt)
        parameters = dict(model.named_parameters())
        self.num_params = sum(parameters[name].numel() for name in self.param_names)
        if projector == "factored":
            if proj_dim is None or int(proj_dim) <= 0:
                raise ValueError(
                    f"proj_dim must be a positive integer for the 'factored' projector, got {proj_dim!r}."
                )
            self.featurizer = FactoredGradientProjector(
                model, self.task, self.param_names, int(proj_dim), projector_seed, self.device
            )
        else:
            param_numels = {name: parameters[name].numel() for name in self.param_names}
            self.featurizer = DenseGradientProjector(
                PerExampleGradients(model, self.task, self.param_names, param_chunk_numel),
                make_projector(
                    projector, param_numels, proj_dim, projector_seed, self.device, max_projector_cache_bytes
                ),
            )
        self.masks = AttentionMaskAdapter(dtype=next(model.parameters()).dtype)
        self.config = TRAKConfig(
            model_class=type(model).__name__,
            name_or_path=str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            task=type(self.task).__name__,
            task_settings=self.task.settings(),
            projector=projector,
            proj_dim=self.featurizer.proj_dim,
            projector_seed=projector_seed,
            param_names=self.param_names,
            num_params=self.num_params,
            lambda_reg=lambda_reg,
            dtype=str(dtype).replace("torch.", ""),
            hf_trak_version=__version__,
        )
        self.checkpoints: List[Checkpoint] = []
        self.features: List[CheckpointFeatures] = []
        self._train_source: Optional[ExampleSource] = None

    # ----------------------------------------------------------------- inputs
    def _source(self, data, data_collator) -> ExampleSource:
        return ExampleSource.for_model(data, self.model, self.task, data_collator)

    def _to_device(self, batch: Mapping[str, Tensor]) -> dict:
        return {name: value.to(self.device) for name, value in batch.items()}

    def _forward(self, weights, buffers) -> Callable:
        """``batch -> model outputs`` at the given tensors (labels left out)."""
        return lambda batch: call_model(self.model, weights, buffers, without_labels(batch))

    def _at_checkpoint(self, model_id: int):
        """Weights and buffers of checkpoint ``model_id``, with the task set up for them."""
        weights, buffers = load_checkpoint(self.checkpoints[model_id], self.model, self.device)
        self.task.setup(self.model, weights, buffers, self._sample_train_batch)
        return weights, buffers

    def _sample_train_batch(self, num_examples: int, seed: int) -> dict:
        if self._train_source is None:
            raise RuntimeError(
                f"{type(self.task).__name__} needs training examples: call featurize(...) first, "
                "or pass train_dataset= to TRAKer.from_pretrained."
            )
        return self._to_device(self._train_source.sample(num_examples, seed))

    # ------------------------------------------------------------- features
    def _project_batch(self, weights, buffers, batch: Mapping[str, Tensor], model_id: int) -> Tuple[Tensor, dict]:
        """(x, prepared batch), with x_i = P_mᵀ g_i / √p for each example: (B, k) float32."""
        batch = self.masks(self._to_device(batch), self._forward(weights, buffers))
        projected = self.featurizer(weights, buffers, batch, model_id)
        return projected.div_(math.sqrt(self.num_params)), batch

    def featurize(
        self,
        train_dataset,
        checkpoints: Sequence[Checkpoint],
        batch_size: int = 32,
        data_collator: Optional[Callable] = None,
        overwrite: bool = False,
    ) -> "TRAKer":
        """Compute the train features Φ_m and Q_m at each checkpoint (one projection each).

        ``checkpoints``: state dicts, models, or ``save_pretrained``/Trainer folders.
        Writes them to ``save_dir`` unless it is None; an existing featurization there is
        only replaced with ``overwrite=True``.
        """
        if not checkpoints:
            raise ValueError(
                "featurize needs at least one checkpoint (a state dict, model or save_pretrained folder)."
            )
        if self.save_dir is not None and os.path.exists(os.path.join(self.save_dir, CONFIG_NAME)) and not overwrite:
            raise FileExistsError(
                f"{self.save_dir} already holds TRAK features. Load them with "
                "TRAKer.from_pretrained, choose another save_dir, or pass overwrite=True."
            )
        source = self._source(train_dataset, data_collator)
        self._train_source, self.checkpoints, self.features = source, list(checkpoints), []
        with eval_mode(self.model):
            for model_id in range(len(self.checkpoints)):
                self.features.append(self._featurize_checkpoint(source, model_id, batch_size))
        self.config.num_checkpoints, self.config.num_train_examples = len(self.checkpoints), len(source)
        if self.save_dir is not None:
            self.save_pretrained(self.save_dir)
        return self

    def _featurize_checkpoint(self, source: ExampleSource, model_id: int, batch_size: int) -> CheckpointFeatures:
        weights, buffers = self._at_checkpoint(model_id)
        n, k = len(source), self.featurizer.proj_dim
        features = torch.empty(n, k, dtype=self.dtype)
        out_to_loss = torch.empty(n, dtype=torch.float32)
        xtx = torch.zeros(k, k, dtype=torch.float32, device=self.device)
        row = 0
        for batch in tqdm(
            source.batches(batch_size),
            total=math.ceil(n / batch_size),
            desc=f"Featurizing checkpoint {model_id}",
            disable=None,
        ):
            projected, batch = self._project_batch(weights, buffers, batch, model_id)
            stored = projected.to(self.dtype)
            xtx.addmm_(stored.T.float(), stored.float())
            with torch.no_grad():
                q = self.task.get_out_to_loss_grad(self.model, weights, buffers, batch)
            features[row : row + len(stored)] = stored.cpu()
            out_to_loss[row : row + len(stored)] = q.float().cpu()
            row += len(stored)
        if row != n:
            raise ValueError(f"The data yielded {row} examples for a dataset of {n} (drop_last=True?).")
        lambda_reg = resolve_lambda(xtx, self.lambda_reg)
        kernel = regularized_inverse(xtx, lambda_reg)
        for start in range(0, n, 8192):
            block = features[start : start + 8192].to(self.device, torch.float32)
            features[start : start + 8192] = (block @ kernel).to(self.dtype).cpu()
        logger.info("Checkpoint %d: %d examples, k=%d, lambda=%.3g", model_id, n, k, lambda_reg)
        return CheckpointFeatures(features, out_to_loss, xtx.cpu(), lambda_reg)

    # ---------------------------------------------------------------- scores
    def _target_features(self, batches: List[dict]) -> List[Tensor]:
        """T_m for a block of target batches at every checkpoint: list of (b, k) float32."""
        targets = []
        for model_id in range(len(self.checkpoints)):
            weights, buffers = self._at_checkpoint(model_id)
            targets.append(torch.cat([self._project_batch(weights, buffers, batch, model_id)[0] for batch in batches]))
        return targets

    def _score_blocks(self, targets, batch_size, data_collator, train_block_size, target_block_size):
        """Yields, per block of targets, ``(target_start, blocks)`` where ``blocks`` yields
        ``(train_start, scores)`` with scores of shape (train rows × block targets), float32."""
        if not self.features:
            raise RuntimeError("No train features: call featurize(...) or TRAKer.from_pretrained(...) first.")
        source = self._source(targets, data_collator)
        out_to_loss = torch.stack([f.out_to_loss for f in self.features]).mean(0)
        n, target_start, pending, pending_rows = len(out_to_loss), 0, [], 0
        with eval_mode(self.model), tqdm(total=len(source), desc="Scoring targets", disable=None) as progress:
            for batch in itertools.chain(source.batches(batch_size), [None]):
                if batch is not None:
                    pending.append(batch)
                    pending_rows += len(next(iter(batch.values())))
                    if pending_rows < target_block_size:
                        continue
                if not pending:
                    break
                target_features = self._target_features(pending)
                yield (
                    target_start,
                    (
                        (
                            train_start,
                            score_block(
                                [f.features[train_start : train_start + train_block_size] for f in self.features],
                                target_features,
                                out_to_loss[train_start : train_start + train_block_size],
                            ).cpu(),
                        )
                        for train_start in range(0, n, train_block_size)
                    ),
                )
                target_start += pending_rows
                progress.update(pending_rows)
                pending, pending_rows = [], 0

    def score(
        self,
        targets,
        batch_size: int = 32,
        data_collator: Optional[Callable] = None,
        out: Optional[np.ndarray] = None,
        train_block_size: int = 16384,
        target_block_size: int = 1024,
    ) -> np.ndarray:
        """TRAK scores, shape (len(train), len(targets)), float32.

        Targets are featurized ``target_block_size`` at a time and scored against
        ``train_block_size`` train rows at a time; pass ``out`` (e.g. an ``np.memmap``)
        when the score matrix is larger than memory.
        """
        shape = (self.config.num_train_examples, len(self._source(targets, data_collator)))
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}.")
        for target_start, blocks in self._score_blocks(
            targets, batch_size, data_collator, train_block_size, target_block_size
        ):
            for train_start, block in blocks:
                out[train_start : train_start + block.shape[0], target_start : target_start + block.shape[1]] = (
                    block.numpy()
                )
        return out

    def top_k(
        self,
        targets,
        k: int = 10,
        largest: bool = True,
        batch_size: int = 32,
        data_collator: Optional[Callable] = None,
        train_block_size: int = 16384,
        target_block_size: int = 1024,
    ) -> TopK:
        """The k proponents (``largest=True``) or opponents of each target, without the full score matrix."""
        indices, scores = [], []
        for _, blocks in self._score_blocks(targets, batch_size, data_collator, train_block_size, target_block_size):
            best = None
            for train_start, block in blocks:
                best = merge_top_k(best, block, train_start, k, largest)
            scores.append(best[0].T.numpy())
            indices.append(best[1].T.numpy())
        return TopK(np.concatenate(indices), np.concatenate(scores))

    # ------------------------------------------------------------- save/load
    def save_pretrained(self, save_dir: str) -> None:
        """Write ``trak_config.json`` and ``features-<m>.safetensors`` (Φ_m, Q_m, XtX_m, λ_m) to ``save_dir``."""
        os.makedirs(save_dir, exist_ok=True)
        for model_id, features in enumerate(self.features):
            save_file(
                {name: t.contiguous() for name, t in features.to_tensors().items()},
                os.path.join(save_dir, f"features-{model_id}.safetensors"),
            )
        with open(os.path.join(save_dir, CONFIG_NAME), "w") as file:
            file.write(self.config.to_json_string())

    @classmethod
    def from_pretrained(
        cls,
        save_dir: str,
        model: nn.Module,
        checkpoints: Sequence[Checkpoint],
        task=None,
        train_dataset=None,
        device=None,
        **kwargs,
    ) -> "TRAKer":
        """Reload features written by ``featurize``; ``checkpoints`` are those it was run with.

        Refuses, naming the difference, if the model, task, parameters or projection differ.
        """
        with open(os.path.join(save_dir, CONFIG_NAME)) as file:
            stored = TRAKConfig.from_json_string(file.read())
        if len(checkpoints) != stored.num_checkpoints:
            raise ValueError(
                f"{save_dir} was featurized at {stored.num_checkpoints} checkpoints, got {len(checkpoints)}."
            )
        traker = cls(
            model,
            task=task,
            proj_dim=stored.proj_dim,
            projector=stored.projector,
            projector_seed=stored.projector_seed,
            lambda_reg=stored.lambda_reg,
            dtype=getattr(torch, stored.dtype),
            save_dir=None,
            device=device,
            grad_wrt=kwargs.pop("grad_wrt", stored.param_names),
            **kwargs,
        )
        mismatches = stored.mismatches(traker.config)
        if mismatches:
            raise ValueError(f"The features in {save_dir} were made with different settings: " + "; ".join(mismatches))
        traker.config = stored
        traker.checkpoints = list(checkpoints)
        traker.features = [
            CheckpointFeatures.from_tensors(load_file(os.path.join(save_dir, f"features-{m}.safetensors")))
            for m in range(stored.num_checkpoints)
        ]
        if train_dataset is not None:
            traker._train_source = traker._source(train_dataset, None)
        return traker
