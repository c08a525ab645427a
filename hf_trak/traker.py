"""``TRAKer``: featurize a training split over checkpoints, then score target splits.

Per checkpoint m and example z_i: x_i = P_mᵀ ∇_θ f(z_i; θ_m) / √p (p = number of
differentiated parameters) and Q_i, written to a ``FeatureStore`` shard by shard; the
kernel and scores are those of ``hf_trak.kernel``. The model given to ``TRAKer`` is only
used for its architecture: every forward pass is a ``functional_call`` at a checkpoint's
tensors.
"""

import dataclasses
import itertools
import logging
import math
import os
import warnings
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .adapters import adapter_parameter_names, adapter_provenance, is_peft_model
from .card import write_dataset_card
from .checkpoints import Checkpoint, checkpoint_fingerprint, checkpoint_source, load_checkpoint
from .config import TRAKConfig
from .data import ExampleSource
from .distributed import Processes
from .factored import FactoredGradientProjector, factorable_parameter_names
from .gradients import DenseGradientProjector, GradWrt, PerExampleGradients, select_parameters
from .hub import download_store, push_store
from .kernel import gram, merge_top_k, regularized_inverse, resolve_lambda, score_block
from .masks import AttentionMaskAdapter
from .model_outputs import AbstractModelOutput, AutoModelOutput, call_model, eval_mode, without_labels
from .projectors import make_projector
from .store import FeatureStore

logger = logging.getLogger(__name__)

STORAGE_DTYPES = (torch.float16, torch.float32)


def _as_tensor(array: np.ndarray) -> Tensor:
    """A torch view of a read-only (memory-mapped) numpy array; it is never written to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


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
        save_dir: the feature store ``featurize`` writes (None: a temporary folder).
        device: where gradients are computed (default: the model's device).
        grad_wrt: parameters to differentiate (see ``select_parameters``); default the trainable ones.
        param_chunk_numel: dense projectors: compute per-example gradients for at most this
            many parameter elements at a time (bounds memory to batch_size × param_chunk_numel floats).
        max_projector_cache_bytes: memory for cached projection blocks.
        shard_size: train rows per stored shard (the unit of resuming, of work per process and
            of scoring blocks).
        accelerator: an ``accelerate.Accelerator`` to split work across its processes (one is
            made when launched with several processes); default device: its device.
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
        shard_size: int = 4096,
        accelerator=None,
    ):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be torch.float16 or torch.float32 (the stored feature dtype), got {dtype}.")
        self.model = model
        self.task: AbstractModelOutput = AutoModelOutput.resolve(model, task)
        self.task.check_model(model)
        self.processes = Processes(accelerator)
        if device is None:
            device = self.processes.device or next(model.parameters()).device
        self.device = torch.device(device)
        self.dtype, self.lambda_reg, self.save_dir = dtype, lambda_reg, save_dir
        if grad_wrt is None and is_peft_model(model) and not any(p.requires_grad for p in model.parameters()):
            grad_wrt = adapter_parameter_names(model)  # an inference-mode PeftModel: its adapter, as trained
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
        adapter = adapter_provenance(model) or {}
        self.config = TRAKConfig(
            model_class=type(model).__name__,
            name_or_path=str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            task=type(self.task).__name__,
            task_settings=self.task.settings(),
            projector=projector,
            proj_dim=proj_dim if projector != "identity" else None,
            feature_dim=self.featurizer.proj_dim,
            projector_seed=projector_seed,
            param_names=self.param_names,
            num_params=self.num_params,
            lambda_reg=lambda_reg,
            dtype=str(dtype).replace("torch.", ""),
            model_revision=getattr(getattr(model, "config", None), "_commit_hash", None),
            shard_size=shard_size,
            hf_trak_version=__version__,
            adapter_config=adapter.get("config"),
            base_model=adapter.get("base_model", ""),
        )
        self.store: Optional[FeatureStore] = None
        self.checkpoints: List[Checkpoint] = []
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
        """Write x_i and Q_i of every train example at each checkpoint to ``save_dir``, then K_m.

        ``checkpoints``: state dicts, models, or ``save_pretrained``/Trainer folders. A run
        on a store with the same settings, train split and checkpoints resumes it (complete
        shards are kept); a store made otherwise is only replaced with ``overwrite=True``.
        """
        if not checkpoints:
            raise ValueError(
                "featurize needs at least one checkpoint (a state dict, model or save_pretrained folder)."
            )
        source = self._source(train_dataset, data_collator)
        fingerprints = [self._fingerprints(checkpoint) for checkpoint in checkpoints]
        config = dataclasses.replace(
            self.config,
            base_fingerprint=fingerprints[0][1],
            num_checkpoints=len(checkpoints),
            num_train_examples=len(source),
            train_fingerprint=source.fingerprint,
            checkpoint_fingerprints=[weights for weights, _ in fingerprints],
            checkpoint_sources=[checkpoint_source(c) for c in checkpoints],
        )
        processes = self.processes
        if processes.size > 1 and self.save_dir is None:
            raise ValueError("save_dir is required with several processes: they share the feature store.")
        FeatureStore.validate(self.save_dir, config, overwrite)  # every process refuses alike, before any write
        if processes.is_main:
            self.store = FeatureStore.create_or_resume(self.save_dir, config, overwrite=overwrite)
        processes.barrier()
        if not processes.is_main:
            self.store = FeatureStore.load(self.save_dir)
        self.config, self._train_source, self.checkpoints = self.store.config, source, list(checkpoints)
        with eval_mode(self.model):
            for model_id in range(len(self.checkpoints)):
                self._featurize_checkpoint(source, model_id, batch_size)
        if processes.is_main:
            write_dataset_card(self.store)
        processes.barrier()
        return self

    def _featurize_checkpoint(self, source: ExampleSource, model_id: int, batch_size: int) -> None:
        """Write this process's share of the missing shards, then (all together) the kernel."""
        store, processes = self.store, self.processes
        missing = [(start, stop) for start, stop in store.shard_ranges() if not store.has_shard(model_id, start, stop)]
        processes.barrier()  # every process has the same list before any shard is written
        mine = processes.share(missing)
        if mine:
            weights, buffers = self._at_checkpoint(model_id)
            with tqdm(
                total=sum(stop - start for start, stop in mine),
                unit="example",
                desc=f"Featurizing checkpoint {model_id}",
                disable=None if processes.is_main else True,
            ) as bar:
                for start, stop in mine:
                    self._write_shard(source, weights, buffers, model_id, start, stop, batch_size, bar)
        processes.barrier()
        if not store.has_kernel(model_id):
            dim = self.featurizer.proj_dim
            xtx = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
            for start, stop in processes.share(store.shard_ranges()):
                xtx += gram(_as_tensor(store.shard(model_id, start, stop)[0]).to(self.device))
            xtx = processes.sum(xtx)  # all-reduce of k × k: no features travel
            if processes.is_main:
                lambda_reg = resolve_lambda(xtx, self.lambda_reg)
                store.save_kernel(model_id, xtx.cpu(), regularized_inverse(xtx, lambda_reg).cpu(), lambda_reg)
                logger.info("Checkpoint %d: k=%d, lambda=%.3g", model_id, xtx.shape[0], lambda_reg)
        processes.barrier()

    def _write_shard(self, source, weights, buffers, model_id: int, start: int, stop: int, batch_size: int, bar):
        features, out_to_loss = [], []
        for batch in source.batches(batch_size, start, stop):
            projected, batch = self._project_batch(weights, buffers, batch, model_id)
            with torch.no_grad():
                q = self.task.get_out_to_loss_grad(self.model, weights, buffers, batch)
            features.append(projected.to(self.dtype).cpu())
            out_to_loss.append(q.float().cpu())
            bar.update(len(q))
        features = torch.cat(features)
        if len(features) != stop - start:
            raise ValueError(
                f"The data yielded {len(features)} examples for rows [{start}, {stop}) "
                "(a DataLoader with drop_last=True?)."
            )
        self.store.write_shard(model_id, start, features.numpy(), torch.cat(out_to_loss).numpy())

    # ---------------------------------------------------------------- scores
    def _target_features(self, batches: List[dict]) -> List[Tensor]:
        """T_m for a block of target batches at every checkpoint: list of (b, k) float32."""
        targets = []
        for model_id in range(len(self.checkpoints)):
            weights, buffers = self._at_checkpoint(model_id)
            targets.append(torch.cat([self._project_batch(weights, buffers, batch, model_id)[0] for batch in batches]))
        return targets

    def _score_blocks(self, source: ExampleSource, rows: range, batch_size: int, target_block_size: int):
        """Yields, per block of the targets in ``rows``, ``(offset in rows, blocks)`` where ``blocks``
        yields ``(train_start, scores)`` with scores of shape (shard rows × block targets), float32."""
        store, num_checkpoints = self._require_store(), self.config.num_checkpoints
        kernels = [store.load_kernel(m)["kernel"].to(self.device, torch.float64) for m in range(num_checkpoints)]
        out_to_loss = torch.from_numpy(np.mean([store.out_to_loss(m) for m in range(num_checkpoints)], axis=0))
        offset, pending, pending_rows = 0, [], 0
        show = None if self.processes.is_main else True
        with eval_mode(self.model), tqdm(total=len(rows), desc="Scoring targets", disable=show) as progress:
            for batch in itertools.chain(source.batches(batch_size, rows.start, rows.stop), [None]):
                if batch is not None:
                    pending.append(batch)
                    pending_rows += len(next(iter(batch.values())))
                    if pending_rows < target_block_size:
                        continue
                if not pending:
                    break
                yield offset, self._score_shards(kernels, self._target_features(pending), out_to_loss)
                offset += pending_rows
                progress.update(pending_rows)
                pending, pending_rows = [], 0

    def _score_shards(self, kernels: List[Tensor], target_features: List[Tensor], out_to_loss: Tensor):
        """``(train_start, scores (shard rows × b))`` for each train shard, read memory-mapped."""
        num_checkpoints = len(kernels)
        for shards in zip(*(self.store.shards(m) for m in range(num_checkpoints))):
            start, rows = shards[0][0], len(shards[0][1])
            features = [_as_tensor(features) for _, features, _ in shards]
            yield start, score_block(features, kernels, target_features, out_to_loss[start : start + rows]).cpu()

    def _gather(self, name: str, arrays: dict) -> Optional[List[dict]]:
        """Every process's ``arrays``, in rank order, on the main process (None elsewhere), via the store."""
        if self.processes.size == 1:
            return [arrays]
        self.store.write_part(name, self.processes.rank, arrays)
        self.processes.barrier()
        parts = self.store.pop_parts(name, self.processes.size) if self.processes.is_main else None
        self.processes.barrier()
        return parts

    def score(
        self,
        targets,
        batch_size: int = 32,
        data_collator: Optional[Callable] = None,
        out: Optional[np.ndarray] = None,
        target_block_size: int = 4096,
    ) -> Optional[np.ndarray]:
        """TRAK scores, shape (len(train), len(targets)), float32.

        Targets are featurized ``target_block_size`` at a time and scored against one
        memory-mapped shard of train features at a time; pass ``out`` (e.g. an
        ``np.memmap``) when the score matrix is larger than memory. With several processes,
        each scores a contiguous share of the targets and the main process returns the
        whole matrix (the others return None).
        """
        source = self._source(targets, data_collator)
        shape = (self.config.num_train_examples, len(source))
        if out is not None and out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}.")
        rows = self.processes.contiguous_share(len(source))
        single = self.processes.size == 1
        local = out if single and out is not None else np.empty((shape[0], len(rows)), dtype=np.float32)
        for offset, blocks in self._score_blocks(source, rows, batch_size, target_block_size):
            for train_start, block in blocks:
                local[train_start : train_start + block.shape[0], offset : offset + block.shape[1]] = block
        parts = self._gather("scores", {"scores": local})
        if single or parts is None:
            return local if single else None
        out = np.empty(shape, dtype=np.float32) if out is None else out
        out[:] = np.concatenate([part["scores"] for part in parts], axis=1)
        return out

    def top_k(
        self,
        targets,
        k: int = 10,
        largest: bool = True,
        batch_size: int = 32,
        data_collator: Optional[Callable] = None,
        target_block_size: int = 4096,
    ) -> Optional[TopK]:
        """The k proponents (``largest=True``) or opponents of each target, without the full score matrix
        (on the main process with several processes; None on the others)."""
        source = self._source(targets, data_collator)
        rows = self.processes.contiguous_share(len(source))
        k = min(k, self.config.num_train_examples)
        indices, scores = [np.empty((0, k), np.int64)], [np.empty((0, k), np.float32)]
        for _, blocks in self._score_blocks(source, rows, batch_size, target_block_size):
            best = None
            for train_start, block in blocks:
                best = merge_top_k(best, block, train_start, k, largest)
            scores.append(best[0].T.numpy())
            indices.append(best[1].T.numpy())
        parts = self._gather("top_k", {"indices": np.concatenate(indices), "scores": np.concatenate(scores)})
        if parts is None:
            return None
        return TopK(*(np.concatenate([part[key] for part in parts]) for key in ("indices", "scores")))

    def save_scores(self, scores: np.ndarray, name: str) -> str:
        """Keep ``scores`` in the store as ``scores/<name>.arrow`` (pushed with the features); returns its path."""
        path = self._require_store().save_scores(name, scores)
        write_dataset_card(self.store)
        return path

    def _require_store(self) -> FeatureStore:
        if self.store is None:
            raise RuntimeError("No train features: call featurize(...) or TRAKer.from_pretrained(...) first.")
        return self.store

    # ------------------------------------------------------------- load/push
    @classmethod
    def from_pretrained(
        cls,
        save_dir: str,
        model: nn.Module,
        checkpoints: Optional[Sequence[Checkpoint]] = None,
        task=None,
        train_dataset=None,
        device=None,
        **kwargs,
    ) -> "TRAKer":
        """Score against the features in ``save_dir`` (written by ``featurize`` or downloaded).

        ``checkpoints``: those the features were made at; by default their recorded paths,
        or ``model`` itself for a single checkpoint. Their weights must match the recorded
        fingerprints, and the model, task, parameters and projection the stored settings.
        ``train_dataset`` is only needed by tasks that sample training examples (CLIP).
        """
        store = FeatureStore.load(save_dir)
        if not store.is_complete():
            raise ValueError(
                f"The featurization in {save_dir} is incomplete: run featurize(...) again with the "
                "same arguments to resume it."
            )
        stored = store.config
        traker = cls(
            model,
            task=task,
            proj_dim=stored.proj_dim,
            projector=stored.projector,
            projector_seed=stored.projector_seed,
            lambda_reg=stored.lambda_reg,
            dtype=getattr(torch, stored.dtype),
            save_dir=save_dir,
            device=device,
            grad_wrt=kwargs.pop("grad_wrt", stored.param_names),
            shard_size=stored.shard_size,
            **kwargs,
        )
        mismatches = stored.mismatches(traker.config)
        if mismatches:
            raise ValueError(
                f"The features in {save_dir} were made with other settings than this model and task: "
                + "; ".join(mismatches)
            )
        traker.store, traker.config = store, stored
        traker.checkpoints = traker._verified_checkpoints(checkpoints)
        if train_dataset is not None:
            traker._train_source = traker._source(train_dataset, None)
        return traker

    def _fingerprints(self, checkpoint: Checkpoint) -> Tuple[str, str]:
        """(fingerprint of all the checkpoint's weights, of its non-adapter weights: "" without an adapter)."""
        weights, _ = load_checkpoint(checkpoint, self.model, torch.device("cpu"))
        base = ""
        if self.config.adapter_config is not None:
            adapter = set(adapter_parameter_names(self.model))
            base = checkpoint_fingerprint({name: w for name, w in weights.items() if name not in adapter})
        return checkpoint_fingerprint(weights), base

    def _verified_checkpoints(self, checkpoints: Optional[Sequence[Checkpoint]]) -> List[Checkpoint]:
        stored = self.store.config
        if checkpoints is None:
            if all(os.path.exists(source) for source in stored.checkpoint_sources):
                checkpoints = stored.checkpoint_sources
            elif stored.num_checkpoints == 1:
                checkpoints = [self.model]
            else:
                raise ValueError(
                    f"The features were made at {stored.num_checkpoints} checkpoints "
                    f"({stored.checkpoint_sources}); pass them as checkpoints=[...]."
                )
        if len(checkpoints) != stored.num_checkpoints:
            raise ValueError(
                f"The features were made at {stored.num_checkpoints} checkpoints, got {len(checkpoints)}."
            )
        for model_id, checkpoint in enumerate(checkpoints):
            weights, base = self._fingerprints(checkpoint)
            if stored.base_fingerprint and base != stored.base_fingerprint:
                raise ValueError(
                    f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has another base model than the one the "
                    f"adapter features were made with ({stored.base_model or 'recorded in the store'}): load the "
                    "adapters onto that base model."
                )
            if weights != stored.checkpoint_fingerprints[model_id]:
                raise ValueError(
                    f"Checkpoint {model_id} ({checkpoint_source(checkpoint)}) has other weights than the one the "
                    f"features were made at ({stored.checkpoint_sources[model_id]}): pass the checkpoints used by "
                    "featurize, in the same order."
                )
        return list(checkpoints)

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: str = "Upload TRAK features with hf_trak",
        revision: Optional[str] = None,
    ) -> str:
        """Upload the store (features, kernels, scores, card) as a dataset repo; returns the commit URL."""
        return push_store(self._require_store(), repo_id, private, token, commit_message, revision)

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        model: nn.Module,
        checkpoints: Optional[Sequence[Checkpoint]] = None,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[str] = None,
        **kwargs,
    ) -> "TRAKer":
        """``from_pretrained`` on a features repo pushed with ``push_to_hub`` (downloaded to the HF cache)."""
        local = download_store(repo_id, revision, token, cache_dir)
        return cls.from_pretrained(local, model, checkpoints=checkpoints, **kwargs)
