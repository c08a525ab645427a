"""``Explorer``: one target at a time against a feature store, the engine of ``hf-trak explore``.

A target is a raw example with the train split's columns (text, image, label): a row of a
target split, a train row, or a new input. ``Explorer.query`` featurizes it at each of the
store's M checkpoints (each loaded once, when the explorer starts) and ranks the train rows
by their score, without touching the kernel: one pass over the stored Φ (``hf_trak.run.scoring``)
or one search of a faiss index (``hf_trak.explore.index``). With t_m the target's features,

    τ   = Q̄ ⊙ (1/M) Σ_m Φ_m t_m     (the ensemble's score, what ``attribute`` gives)
    τ_m = Q̄ ⊙ Φ_m t_m               (checkpoint m's share)

are found in the same pass (the targets [t, t·1(m=1), …, t·1(m=M)]); the agreement of
checkpoint m is |top-k(τ_m) ∩ top-k(τ)| / k over the proponents.

Classification targets are attributed for a label: the row's own, or for a new input the
model's prediction (``label=None``) unless another is chosen. The prediction is that of the
last checkpoint.
"""

import contextlib
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Union

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features
from torch import nn
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import ImageProcessingMixin

from hf_trak.data.inputs import max_positions, scan_split
from hf_trak.data.processing import LABEL_COLUMNS, image_column, prepare_split, text_columns
from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidArgumentError, InvalidInputError, check_positive_int
from hf_trak.explore.results import Neighbor, Query
from hf_trak.hf.loading import local_or_hub, looks_like_local_path, processor_for, resolve_store_model
from hf_trak.method.factored import FactoredGradientProjector
from hf_trak.method.kernel import merge_top_k
from hf_trak.method.model_outputs import (
    AutoModelOutput,
    CausalLMModelOutput,
    ClassificationModelOutput,
    CLIPModelOutput,
    call_model,
    eval_mode,
    without_labels,
)
from hf_trak.run.scoring import scores as store_scores
from hf_trak.run.token_scores import TokenScores, token_scores
from hf_trak.self_influence import suspicion
from hf_trak.store import lock
from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.hub import download_store
from hf_trak.traker import TRAKer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _without_progress_bars():
    """``datasets``' progress bars off (a one-row ``map`` per query), restored on exit."""
    enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


class Explorer:
    """Top-k proponents and opponents of one target at a time (see the module docstring).

    Args:
        traker: a ``TRAKer`` on a store (``from_pretrained``/``from_hub``) with ``train_dataset`` given.
        train: the raw train split the store was made from (shown, and drawn from as targets).
        processor: what turns raw examples into model inputs (``hf_trak.data.processing``).
        targets: an optional raw target split to pick targets from.
        index: None (each query reads the stored Φ), ``"exact"`` or a faiss factory string
            (``"IVF1024,Flat"``, approximate): a ``FeatureIndex`` built once, in memory.
        k: proponents and opponents shown per target.

    Each checkpoint's tensors are loaded once and kept (M × the model's size in memory), and so are the store's
    XᵀX_m and K_m (2·M·k² float64) where its ensemble is normalized.
    """

    def __init__(
        self,
        traker: TRAKer,
        train: Dataset,
        processor=None,
        targets: Optional[Dataset] = None,
        text_column=None,
        image_column_name: Optional[str] = None,
        max_length: Optional[int] = None,
        index: Optional[str] = None,
        k: int = 10,
    ):
        self.traker, self.train, self.targets, self.processor = traker, train, targets, processor
        self.text_column, self.image_column_name, self.max_length = text_column, image_column_name, max_length
        self.k = check_positive_int("k", k)
        self.model, self.task, self.store = traker.model, traker.task, traker.store
        self.store.keep_kernels = True  # every query needs them with ensemble="normalized" (hf_trak.run.scoring)
        self._lock = threading.Lock()
        self.index = None
        if index is not None:
            from hf_trak.explore.index import EXACT, FeatureIndex

            if traker.train_rows is not None:
                raise InvalidArgumentError(
                    "A faiss index covers the whole featurized split, not a subset of it: leave the index out "
                    "(--index) to explore a train subset."
                )
            self.index = FeatureIndex(self.store, EXACT if index == "exact" else index)
        self._suspicion = None  # read from the store on the first self_influence call
        with eval_mode(self.model):
            self.views = [
                traker.feature_map.at(checkpoint, model_id, traker.train_sampler)
                for model_id, checkpoint in enumerate(traker.checkpoints)
            ]

    @classmethod
    def from_store(
        cls,
        store: str,
        train: Dataset,
        model: Union[None, str, nn.Module] = None,
        processor: Union[None, str, Any] = "auto",
        targets: Optional[Dataset] = None,
        checkpoints: Optional[list] = None,
        base_model: Optional[str] = None,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        text_column=None,
        image_column_name: Optional[str] = None,
        max_length: Optional[int] = None,
        index: Optional[str] = None,
        k: int = 10,
        **settings,
    ) -> "Explorer":
        """An explorer of the store in folder ``store`` or pushed to the Hub as ``store`` (a repo id).

        ``model``: default, the model the store records; ``checkpoints``: default, the store's
        recorded checkpoints (or ``model`` for one). ``processor``: ``"auto"`` (the one saved
        with the model), a folder or Hub id, a processor object, or None (the split holds model
        inputs). The train split is checked row by row against the store before any checkpoint
        is loaded (``StoreMismatchError``), and the model against the stored settings.
        """
        if not (looks_like_local_path(store) or os.path.isdir(store)):
            store = download_store(store, revision, token)
        root = local_or_hub(store, "feature store")
        config = FeatureStore.load(root).config
        model, model_path, found = resolve_store_model(config, model, base_model, root)
        checkpoints = checkpoints or found
        if isinstance(processor, str):
            processor = processor_for(model_path, None if processor == "auto" else processor, base_model)
        task = AutoModelOutput.resolve(model, settings.pop("task", None))
        prepared = prepare_split(train, model, task, processor, text_column, image_column_name, max_length)
        traker = TRAKer.from_pretrained(root, model, checkpoints=checkpoints, task=task, train_dataset=prepared,
                                        **settings)  # fmt: skip
        return cls(traker, train, processor, targets, text_column, image_column_name, max_length, index, k)

    @property
    def checkpoint_names(self) -> List[str]:
        """A name per checkpoint for the page: its folder's name (``checkpoint-500``), else ``checkpoint <m>``."""
        sources = self.store.config.checkpoint_sources
        names = [os.path.basename(os.path.normpath(source)) if os.sep in source or source.startswith("checkpoint")
                 else "" for source in sources]  # fmt: skip
        unique = len(set(names)) == len(names) and all(names)
        return names if unique else [f"checkpoint {m}" for m in range(len(sources))]

    @property
    def has_token_scores(self) -> bool:  # ``token_scores`` needs text inputs and the factored projector
        return bool(self.text_columns) and isinstance(self.traker.feature_map.projector, FactoredGradientProjector)

    # ------------------------------------------------------------------ inputs
    @property
    def text_columns(self) -> List[str]:
        """The raw text columns a new input fills: those a tokenizer or multimodal processor reads, or for a
        processor function the ``text_column`` given (none otherwise)."""
        if not isinstance(self.processor, (PreTrainedTokenizerBase, ProcessorMixin)):
            return text_columns(self.train, self.text_column) if self.processor and self.text_column else []
        try:
            return text_columns(self.train, self.text_column)
        except ValueError:
            return []

    @property
    def image_column(self) -> Optional[str]:
        """The raw image column a new input fills: the one an image or multimodal processor reads, or for a
        processor function the ``image_column_name`` given (None otherwise)."""
        if not isinstance(self.processor, (ImageProcessingMixin, ProcessorMixin)):
            return (
                image_column(self.train, self.image_column_name) if self.processor and self.image_column_name else None
            )
        try:
            return image_column(self.train, self.image_column_name)
        except ValueError:
            return None

    @property
    def label_column(self) -> Optional[str]:
        if not isinstance(self.task, ClassificationModelOutput):
            return None
        return next((name for name in LABEL_COLUMNS if name in self.train.column_names), None)

    @property
    def label_names(self) -> List[str]:
        """Names of the labels (the split's ``ClassLabel`` names, else the model's ``id2label``)."""
        feature = self.train.features.get(self.label_column) if self.label_column else None
        if isinstance(feature, ClassLabel):
            return list(feature.names)
        num_labels = getattr(self.model.config, "num_labels", 0)
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(i, i)) for i in range(num_labels)]

    def label_name(self, label: Optional[int]) -> str:
        """The name of label ``label`` (``label_names``), its number if it has none, "" for None."""
        names = self.label_names
        if label is None:
            return ""
        return names[label] if 0 <= label < len(names) else str(label)

    def new_example(self, text: Union[None, str, List[str]] = None, image=None) -> Dict[str, Any]:
        """A raw example from a new input: ``text`` (one string per text column) and/or ``image``.
        Classifiers attribute the predicted label unless ``query(label=...)`` chooses another."""
        example = {}
        texts = [text] if isinstance(text, str) or text is None else list(text)
        for name, value in zip(self.text_columns, texts + [None] * len(self.text_columns)):
            if value is None or not str(value).strip():
                raise InvalidInputError(f"Enter a text ({name!r} is empty).")
            example[name] = str(value)
        if self.image_column is not None:
            if image is None:
                raise InvalidInputError("Upload an image.")
            self._check_image_size(image)
            example[self.image_column] = image
        if not example:
            raise InvalidInputError(
                "This model's store has no processor for new inputs: pick a row of the train or target split."
            )
        return example

    def _check_image_size(self, image) -> None:
        """Refuse an image of another size than the model takes when its processor does not resize."""
        processor = getattr(self.processor, "image_processor", self.processor)
        config = getattr(self.model.config, "vision_config", self.model.config)
        size = getattr(config, "image_size", None)
        if getattr(processor, "do_resize", True) or not isinstance(size, int) or not hasattr(image, "size"):
            return
        if tuple(image.size) != (size, size):
            width, height = image.size
            raise InvalidInputError(
                f"The image is {width}×{height} pixels; this model takes {size}×{size} and its processor does not "
                f"resize: upload an image of {size}×{size} pixels."
            )

    def _one_row(self, example: Dict[str, Any], label: Optional[int]) -> Dataset:
        """``example`` as a one-row raw split with the train split's column types, labelled ``label``."""
        columns = {name: value for name, value in example.items() if name in self.train.column_names}
        if self.label_column is not None:
            columns[self.label_column] = label
        features = Features({name: self.train.features[name] for name in columns})
        return Dataset.from_dict({name: [value] for name, value in columns.items()}, features=features)

    # ------------------------------------------------------------------ query
    def _batch(self, raw: Dataset) -> dict:
        """The model inputs of a one-row raw split, checked like any target; text longer than the model
        takes is truncated (train rows never are: featurize refused them)."""
        limit = self.max_length or (max_positions(self.model) or (None,))[0]
        with _without_progress_bars():
            prepared = prepare_split(raw, self.model, self.task, self.processor, self.text_column,
                                     self.image_column_name, limit)  # fmt: skip
        source = ExampleSource.for_model(prepared, self.model, self.task)
        scan_split(source, self.task, self.model, "target", "error", show_progress=False)
        return next(source.batches(1))

    @torch.no_grad()
    def predict(self, batch: dict) -> tuple:
        """``(what the last checkpoint predicts, as text; the predicted label for classifiers, else None)``."""
        last = self.views[-1]
        inputs = {name: value.to(self.traker.device) for name, value in batch.items()}
        inputs = inputs if isinstance(self.task, CausalLMModelOutput) else without_labels(inputs)
        output = call_model(self.model, last.weights, last.buffers, inputs)
        if isinstance(self.task, ClassificationModelOutput):
            probabilities = output.logits.float().softmax(-1)[0]
            label = int(probabilities.argmax())
            return f"{self.label_name(label)} (p = {float(probabilities[label]):.2f})", label
        if isinstance(self.task, CausalLMModelOutput):
            return (
                f"mean token log-probability {-float(output.loss):.3f} (perplexity {float(output.loss.exp()):.1f})",
                None,
            )
        if isinstance(self.task, CLIPModelOutput):
            return f"image–text logit {float(output.logits_per_image.reshape(-1)[0]):.2f}", None
        return "", None

    def target_features(self, example: Dict[str, Any], label: Optional[int] = None) -> tuple:
        """``([t_m, (1, k) at each checkpoint], the prediction as text, the label attributed)`` of a raw row.

        ``label`` (classifiers): default the example's own, else the model's prediction."""
        if label is None and self.label_column is not None:
            label = example.get(self.label_column)
        predicting = self.label_column is not None and label is None  # the prediction becomes the label
        with eval_mode(self.model):
            batch = self._batch(self._one_row(example, 0 if predicting else label))  # 0: a placeholder
            prediction, predicted = self.predict(batch)
            if predicting:
                label = predicted
                batch["labels"] = torch.full_like(batch["labels"], predicted)
            features = [view.features(batch)[0].cpu() for view in self.views]
        if not all(torch.isfinite(t).all() for t in features):
            raise InvalidInputError("This target's gradients are not finite (NaN/inf): check the input.")
        return features, prediction, label if self.label_column is not None else None

    def rank(self, features: List[torch.Tensor], k: int) -> tuple:
        """``(proponent rows, their scores, opponent rows, their scores, agreement)`` of one target's features:
        one pass over the stored Φ (or two index searches) for the ensemble and every checkpoint's share."""
        targets = self._with_shares(features)
        if self.index is not None:
            queries = self.index.queries(targets)  # once: σ of a normalized ensemble is its cost
            best = self.index.search_queries(queries, k, largest=True)
            worst = self.index.search_queries(queries, k, largest=False)
            top, bottom = best.indices, worst.indices
            top_scores, bottom_scores = best.scores[0], worst.scores[0]
        else:
            matrix = store_scores(self.store, targets, self.traker.device, len(targets[0]), show_progress=False)
            if self.traker.train_rows is not None:  # a train subset: its rows, in its order
                matrix = matrix[self.traker.train_rows]
            matrix = torch.from_numpy(np.ascontiguousarray(matrix))
            top_scores, top = merge_top_k(None, matrix, 0, k, largest=True)
            bottom_scores, bottom = merge_top_k(None, matrix, 0, k, largest=False)
            top, bottom = top.T.numpy(), bottom.T.numpy()
            top_scores, bottom_scores = top_scores[:, 0].numpy(), bottom_scores[:, 0].numpy()
        agreement = [len(set(top[0]) & set(top[1 + m])) / k for m in range(len(features))] if len(features) > 1 else []
        return top[0], top_scores, bottom[0], bottom_scores, agreement

    def query(self, example: Dict[str, Any], label: Optional[int] = None, k: Optional[int] = None) -> Query:
        """Top-k proponents and opponents of ``example`` (a raw row; see the module docstring).

        ``label``: the label to attribute (classifiers): default the example's own, else the prediction."""
        k = min(check_positive_int("k", self.k if k is None else k), len(self.train))
        with self._lock, lock.reading(self.store.root):  # one query at a time; a featurization of the store waited for
            self.store.check_unchanged()
            features, prediction, label = self.target_features(example, label)
            top, top_scores, bottom, bottom_scores, agreement = self.rank(features, k)
        return Query(
            target=example,
            prediction=prediction,
            label=label,
            proponents=self._neighbors(top, top_scores),
            opponents=self._neighbors(bottom, bottom_scores),
            agreement=agreement,
        )

    def token_scores(self, example: Dict[str, Any], label: Optional[int], rows: List[int]) -> List[TokenScores]:
        """The scores of train ``rows`` on ``example`` (attributed for ``label``) split by position, theirs and the
        target's (``hf_trak.run.token_scores``): a forward and backward of each, per checkpoint."""
        traker = self.traker
        stored = rows if traker.train_rows is None else [int(traker.train_rows[r]) for r in rows]
        with self._lock, lock.reading(self.store.root), eval_mode(self.model):
            self.store.check_unchanged()
            batch = self._batch(self._one_row(example, label if self.label_column is not None else None))
            return token_scores(traker.feature_map, self.store, traker.checkpoints, traker.train_source, rows, stored,
                                batch, traker.args.batch_size, traker.train_sampler)  # fmt: skip

    def self_influence(self, k: Optional[int] = None) -> List[Neighbor]:
        """The ``k`` most suspect train rows (``hf_trak.self_influence.suspicion``), scored by their self-influence
        on their loss: read from the store once, on the first call."""
        k = min(check_positive_int("k", self.k if k is None else k), len(self.train))
        with self._lock:
            self._suspicion = self._suspicion or suspicion(self.traker)  # under the store's shared lock
            ranks, _, on_loss = self._suspicion
        rows = np.argsort(-ranks, kind="stable")[:k]
        return self._neighbors(rows, on_loss[rows])

    @staticmethod
    def _with_shares(features: List[torch.Tensor]) -> List[torch.Tensor]:
        """[T_m]: per checkpoint, the target t_m, then t_m in row 1 + m and zeros in the others' rows."""
        num = len(features)
        if num == 1:
            return features
        eye = torch.eye(num)
        return [torch.cat([t, eye[:, m : m + 1] * t]) for m, t in enumerate(features)]

    def _neighbors(self, rows: np.ndarray, scores: np.ndarray) -> List[Neighbor]:
        return [Neighbor(int(row), float(score), self.train[int(row)]) for row, score in zip(rows, scores) if row >= 0]

    def train_example(self, row: int) -> Dict[str, Any]:
        return self.train[int(row)]

    def target_example(self, row: int) -> Dict[str, Any]:
        if self.targets is None:
            raise InvalidInputError("No target split was given.")
        if not 0 <= int(row) < len(self.targets):
            raise InvalidInputError(f"Target rows are 0 to {len(self.targets) - 1}, not {row}.")
        return self.targets[int(row)]
