"""``TRAKer``: featurize a training split over checkpoints, then score target splits.

A thin facade: settings are a ``TRAKArguments``; features are made by a ``FeatureMap``
(``hf_trak.method.feature_map``), written by ``hf_trak.run.featurize``, scored by
``hf_trak.run.scoring`` and moved to and from the Hub by ``hf_trak.store.hub``. The model given to
``TRAKer`` is only used for its architecture: every forward pass is a ``functional_call``
at a checkpoint's tensors. (Near 400 lines: its docstrings are the API's reference.)
"""

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from hf_trak.arguments import TRAKArguments
from hf_trak.data.inputs import scan_split
from hf_trak.data.source import ExampleSource
from hf_trak.data.streaming import spooled
from hf_trak.errors import InvalidArgumentError, NotFeaturizedError, StoreMismatchError, check_positive_int
from hf_trak.hf.adapters import adapter_provenance
from hf_trak.hf.checkpoints import Checkpoint
from hf_trak.method.estimator import resolve_settings
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.model_outputs import AbstractModelOutput, AutoModelOutput, eval_mode
from hf_trak.run.featurize import featurize_store, verify_checkpoints
from hf_trak.run.memory import batch_size_for
from hf_trak.run.processes import collectives, gather_to_main, process_state
from hf_trak.run.scoring import TopK, scores, self_scores, target_features, top_k
from hf_trak.run.token_scores import TokenScores, token_scores
from hf_trak.store import lock
from hf_trak.store.card import write_dataset_card
from hf_trak.store.config import TRAKConfig
from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.hub import download_store, push_store
from hf_trak.store.integrity import check_store
from hf_trak.store.provenance import split_rows
from hf_trak.store.versions import STORE_VERSION
from hf_trak.version import __version__

if TYPE_CHECKING:
    import accelerate

logger = logging.getLogger(__name__)

__all__ = ["TRAKer", "TopK"]


class TRAKer:
    """TRAK data attribution for a Hugging Face model.

    Args:
        model: the architecture (e.g. ``BertForSequenceClassification``); never modified.
        task: None (pick from the model head with ``AutoModelOutput``), a task name, or an
            ``AbstractModelOutput``.
        args: a ``TRAKArguments`` with every setting (projector, proj_dim, λ, dtype, save_dir,
            batch sizes...); keyword arguments named like its fields override it, so
            ``TRAKer(model, proj_dim=1024, save_dir="feats")`` works too. ``save_dir=None``
            (the default) keeps the features in a temporary folder.
        accelerator: an ``accelerate.Accelerator`` to split work across its processes (without one,
            a launch's processes are counted by ``hf_trak.run.processes.process_state``); the default
            device is then its.
        store_version: the store format to make features for (``from_pretrained`` passes the stored one).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Union[None, str, AbstractModelOutput] = None,
        *,
        args: Optional[TRAKArguments] = None,
        accelerator: Optional["accelerate.Accelerator"] = None,
        store_version: int = STORE_VERSION,
        **settings,
    ):
        if isinstance(task, str):
            settings["task"] = task
        if settings.get("device") is not None:
            settings["device"] = str(settings["device"])
        self.args = dataclasses.replace(args or TRAKArguments(), **settings)
        self.model = model
        self.task: AbstractModelOutput = AutoModelOutput.resolve(model, task if task is not None else self.args.task)
        self.task.check_model(model)
        self.state = process_state(self.args.process_timeout)  # an accelerator's, the launcher's, or one process
        if self.args.device is not None:
            self.device = torch.device(self.args.device)
        elif accelerator is not None or self.state.num_processes > 1:
            self.device = self.state.device
        else:
            self.device = next(model.parameters()).device
        self.args, projector_reason = resolve_settings(self.args, model, self.task, store_version)
        self.feature_map = FeatureMap(model, self.task, self.args, self.device, store_version)
        adapter = adapter_provenance(model) or {}
        model_config = getattr(model, "config", None)
        self.config = TRAKConfig.from_settings(
            self.args,
            model_class=type(model).__name__,
            name_or_path=str(getattr(model_config, "_name_or_path", "") or ""),
            task=type(self.task).__name__,
            task_settings=self.task.settings(),
            param_names=self.feature_map.param_names,
            num_params=self.feature_map.num_params,
            store_version=store_version,
            feature_dim=self.feature_map.dim,
            kernel_blocks=self.feature_map.kernel_blocks(self.args.kernel),
            projector_reason=projector_reason,
            model_revision=getattr(model_config, "_commit_hash", None),
            hf_trak_version=__version__,
            adapter_config=adapter.get("config"),
            base_model=adapter.get("base_model", ""),
        )
        self.store: Optional[FeatureStore] = None
        self.checkpoints: List[Checkpoint] = []
        self.train_source: Optional[ExampleSource] = None  # the featurized split: CLIP draws its contrast set here
        self.train_rows: Optional[np.ndarray] = None  # with a train subset: the stored row of each of its rows

    @property
    def save_dir(self) -> Optional[str]:
        return self.store.root if self.store is not None else self.args.save_dir

    @property
    def param_names(self) -> List[str]:
        return self.feature_map.param_names

    @property
    def num_params(self) -> int:
        return self.feature_map.num_params

    def _source(self, data, data_collator) -> ExampleSource:
        return ExampleSource.for_model(data, self.model, self.task, data_collator)

    @property
    def train_sampler(self):
        """``(num_examples, seed) -> batch`` of the featurized train split (CLIP's contrast set), if any."""
        return self.train_source.sample if self.train_source is not None else None

    # ------------------------------------------------------------- features
    def featurize(
        self,
        train_dataset,
        checkpoints: Sequence[Checkpoint],
        batch_size: Optional[int] = None,
        data_collator: Optional[Callable] = None,
        overwrite: Optional[bool] = None,
    ) -> "TRAKer":
        """Write x_i and Q_i of every train example at each checkpoint to ``save_dir``, then K_m.

        ``checkpoints``: state dicts, models, or ``save_pretrained``/Trainer folders, each
        loaded once. A run on a store with the same settings, train split and checkpoints
        resumes it (complete shards are kept); a store made otherwise is only replaced with
        ``overwrite=True``. ``batch_size``/``overwrite`` default to ``args``'. A stream (``IterableDataset``) is
        read once into ``<stream_dir>/train`` (``hf_trak.data.streaming``), resumably.
        """
        batch_size = self._batch_setting(batch_size)
        overwrite = self.args.overwrite if overwrite is None else overwrite
        train = spooled(train_dataset, self.args.stream_dir, self.args.save_dir, "train", self.state, overwrite)
        self.train_source = self._source(train, data_collator)
        with eval_mode(self.model), collectives(self.state):
            self.store = featurize_store(
                self.feature_map, self.config, self.train_source, list(checkpoints), save_dir=self.args.save_dir,
                state=self.state, storage_dtype=self.args.torch_dtype, batch_size=batch_size, overwrite=overwrite,
                sample_train_batch=self.train_sampler, on_nonfinite=self.args.on_nonfinite,
                lock_timeout=self.args.lock_timeout,
            )  # fmt: skip
        self.config, self.checkpoints, self.train_rows = self.store.config, list(checkpoints), None
        return self

    # ---------------------------------------------------------------- scores
    def _target_features(self, targets, batch_size, data_collator) -> Tuple[List[torch.Tensor], int]:
        """(this process's contiguous share of the targets featurized at every checkpoint, each loaded once;
        the number of targets)."""
        self._require_store()
        source = self._source(targets, data_collator)
        scan = scan_split(source, self.task, self.model, "target", self.args.on_nonfinite, self.state.is_main_process)
        batch_size = self._batch_setting(batch_size) or batch_size_for(self.feature_map, scan.longest)
        with self.state.split_between_processes(list(range(len(source)))) as mine:
            rows = range(mine[0], mine[-1] + 1) if mine else range(0)
        with eval_mode(self.model):
            args = (self.train_sampler, self.state.is_main_process, self.args.on_nonfinite)
            features = target_features(self.feature_map, self.checkpoints, source, rows, batch_size, *args,
                                       state=self.state)  # fmt: skip
        return features, len(source)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[FeatureStore]:
        """The store, held with its shared lock while a call reads it (a featurization of it in another process
        is waited for, ``lock_timeout``), and checked not to have been featurized again since it was loaded."""
        store = self._require_store()
        with lock.reading(store.root, self.args.lock_timeout):
            store.check_unchanged()
            yield store

    def score(
        self,
        targets,
        batch_size: Optional[int] = None,
        data_collator: Optional[Callable] = None,
        out: Optional[np.ndarray] = None,
        target_block_size: Optional[int] = None,
    ) -> Optional[np.ndarray]:
        """TRAK scores, shape (len(train), len(targets)), float32 (NaN for excluded train rows).

        Train features are read one memory-mapped shard at a time; pass ``out`` (e.g. an
        ``np.memmap``) when the score matrix is larger than memory. With several processes,
        each scores a contiguous share of the targets and the main process returns the whole
        matrix (the others return None). With a train subset (``from_pretrained(...,
        train_subset=True)``) the rows are those of the subset.
        """
        block_size = self._positive_setting("target_block_size", target_block_size)
        num_rows = self.config.num_train_examples if self.train_rows is None else len(self.train_rows)
        if out is not None and (out.shape[0] != num_rows or out.ndim != 2):
            raise InvalidArgumentError(f"out has shape {out.shape}, expected ({num_rows}, number of targets).")
        with self._reading() as store, collectives(self.state):
            features, num_targets = self._target_features(targets, batch_size, data_collator)
            if out is not None and out.shape != (num_rows, num_targets):
                raise InvalidArgumentError(f"out has shape {out.shape}, expected {(num_rows, num_targets)}.")
            show = self.state.is_main_process
            if self.state.num_processes == 1 and self.train_rows is None:
                return scores(store, features, self.device, block_size, out, show_progress=show)
            parts = gather_to_main(self.state, scores(store, features, self.device, block_size, show_progress=show))
        if parts is None:
            return None
        full = np.concatenate(parts, axis=1)
        out = np.empty((num_rows, num_targets), dtype=np.float32) if out is None else out
        out[:] = full if self.train_rows is None else full[self.train_rows]
        return out

    def top_k(
        self,
        targets,
        k: int = 10,
        largest: bool = True,
        batch_size: Optional[int] = None,
        data_collator: Optional[Callable] = None,
        target_block_size: Optional[int] = None,
    ) -> Optional[TopK]:
        """The k proponents (``largest=True``) or opponents of each target, without the full score matrix
        (on the main process with several processes; None on the others). Excluded train rows
        (NaN scores) rank last."""
        check_positive_int("k", k)
        block_size = self._positive_setting("target_block_size", target_block_size)
        with self._reading() as store, collectives(self.state):
            features, _ = self._target_features(targets, batch_size, data_collator)
            show = self.state.is_main_process
            mine = top_k(store, features, self.device, block_size, k, largest, show, self.train_rows)
            parts = gather_to_main(self.state, mine)
        if parts is None:
            return None
        return TopK(*(np.concatenate([part[i] for part in parts]) for i in range(2)))

    def self_scores(self, on: str = "loss"):
        """Self-influence: each train example's influence on itself, shape (len(train),) float32 (NaN for excluded
        rows; the subset's rows with a train subset), from the stored features alone (no forward pass, O(n·k)).

        ``on="loss"``: on its own loss, τ(z_i, z_i) · Q̄_i (Q̄: the loss's derivative to f), like ∇ℓ_iᵀH⁻¹∇ℓ_i;
        ``on="output"``: on its own output f, the diagonal of ``score(train)``; ``"both"``: the pair (output, loss)."""
        if on not in ("loss", "output", "both"):
            raise InvalidArgumentError(f"on is 'loss', 'output' or 'both', not {on!r}.")
        with self._reading() as store:
            found = self_scores(store, self.device, show_progress=self.state.is_main_process)
        found = {
            name: values if self.train_rows is None else values[self.train_rows] for name, values in found.items()
        }
        return (found["output"], found["loss"]) if on == "both" else found[on]

    def score_tokens(
        self, target, train_rows: Optional[Sequence[int]] = None, k: int = 10, batch_size: Optional[int] = None,
        data_collator: Optional[Callable] = None, on: str = "output",
    ) -> List[TokenScores]:  # fmt: skip
        """One ``target``'s (a one-row split) scores of ``train_rows`` (default: its top-``k`` proponents), each split
        over the example's positions and the target's (``hf_trak.run.token_scores``; needs the factored projector
        and the train split). ``on="loss"``: weighted by the row's Q̄ whatever ``train_weight`` is (``self_scores``)."""
        self.feature_map.check_unsharded("Per-token scores")
        source = self._source(target, data_collator)
        if len(source) != 1:
            raise InvalidArgumentError(f"score_tokens takes one target (a one-row split), not {len(source)}.")
        if self.train_source is None:
            raise NotFeaturizedError("score_tokens needs the train split: pass train_dataset= to from_pretrained.")
        if train_rows is None:
            train_rows = self.top_k(target, k=k, batch_size=batch_size, data_collator=data_collator).indices[0]
        positions = [int(row) for row in train_rows]
        stored = positions if self.train_rows is None else [int(self.train_rows[row]) for row in positions]
        size = self._batch_setting(batch_size)
        with self._reading() as store, eval_mode(self.model):
            return token_scores(self.feature_map, store, self.checkpoints, self.train_source, positions, stored,
                                source.batch([0]), size, self.train_sampler, on)  # fmt: skip

    def save_scores(self, scores: np.ndarray, name: str, overwrite: bool = False) -> str:
        """Keep ``scores`` in the store as ``scores/<name>.arrow`` (pushed with the features); returns its path.
        Scores saved under ``name`` before are only replaced with ``overwrite``."""
        if self.train_rows is not None:
            raise InvalidArgumentError(
                "Scores of a train subset are not kept in the store (its rows are the full split's)."
            )
        path = self._require_store().save_scores(name, scores, overwrite=overwrite)
        write_dataset_card(self.store)
        return path

    def _batch_setting(self, value: Optional[int]) -> Optional[int]:  # None: hf_trak.run.memory's
        value = self.args.batch_size if value is None else value
        return None if value is None else check_positive_int("batch_size", value)

    def _positive_setting(self, name: str, value: Optional[int]) -> int:
        """``value``, or the ``args`` setting ``name`` when None; refused unless a positive integer (0 included)."""
        return check_positive_int(name, getattr(self.args, name) if value is None else value)

    def _require_store(self) -> FeatureStore:
        if self.store is None:
            raise NotFeaturizedError("No train features: call featurize(...) or TRAKer.from_pretrained(...) first.")
        return self.store

    # ------------------------------------------------------------- load/push
    @classmethod
    def from_pretrained(
        cls,
        save_dir: str,
        model: nn.Module,
        checkpoints: Optional[Sequence[Checkpoint]] = None,
        task: Union[None, str, AbstractModelOutput] = None,
        train_dataset=None,
        train_subset: bool = False,
        data_collator: Optional[Callable] = None,
        **settings,
    ) -> "TRAKer":
        """Score against the features in ``save_dir`` (written by ``featurize`` or downloaded).

        ``checkpoints``: those the features were made at; by default their recorded paths,
        or ``model`` itself for a single checkpoint. Each is loaded once, to check its
        weights against the recorded fingerprint; the model, task, parameters and projection
        must match the stored settings. ``train_dataset``: the split the features were made
        from, to pair scores with its rows (needed by tasks that sample training examples,
        CLIP); it is checked row by row against the store before any forward pass
        (``StoreMismatchError`` names the first differing row). ``train_subset=True`` accepts
        a subset of its rows instead, and scores then cover that subset. ``settings``: run
        settings (``device``, ``batch_size``...).
        """
        store = FeatureStore.load(save_dir)
        check_store(store)  # its files against its config, before anything the config sizes is allocated
        stored = store.config
        if stored.model_class not in ("", type(model).__name__):
            raise StoreMismatchError(
                f"The features in {save_dir} were made for a {stored.model_class} ({stored.name_or_path or 'no path'}"
                f" recorded), not a {type(model).__name__}: pass the model they were made with."
            )
        settings.setdefault("grad_wrt", stored.param_names)
        args = stored.settings(save_dir=save_dir)
        traker = cls(model, task, args=args, store_version=stored.store_version, **settings)
        if stored.block_shapes:  # the factored projector's sizes by spectrum, as featurize made them
            traker.config = traker.feature_map.reshaped(traker.config, stored.block_shapes)
        mismatches = stored.mismatches(traker.config)
        if mismatches:
            raise StoreMismatchError(
                f"The features in {save_dir} were made with other settings than this model and task: "
                + "; ".join(mismatches)
            )
        traker.store, traker.config = store, stored
        traker.feature_map.store = store  # its views use the store's principal factors
        if train_dataset is not None:  # the cheap check first: no checkpoint is loaded for a wrong split
            train_dataset = spooled(train_dataset, traker.args.stream_dir, save_dir, "train", traker.state)
            traker.train_source = traker._source(train_dataset, data_collator)
            scan = scan_split(traker.train_source, traker.task, model, "train", traker.args.on_nonfinite,
                              traker.state.is_main_process)  # fmt: skip
            traker.train_rows = split_rows(store, scan.row_hashes, subset=train_subset)
        elif train_subset:
            raise InvalidArgumentError("train_subset=True needs the subset as train_dataset.")
        traker.checkpoints = verify_checkpoints(traker.feature_map, store, checkpoints)
        return traker

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
