"""Batches of model inputs from a ``datasets.Dataset`` or a ``torch`` DataLoader.

A dataset row holds the model's inputs (the named arguments of ``model.forward``) plus
what the model output function needs (``labels``); other columns (raw text, ids) are
dropped, as the Trainer does. ``label`` is renamed ``labels`` as in
``transformers.default_data_collator``. Ragged columns are right-padded: ``input_ids``
with the model's pad token, ``labels`` with −100, everything else with 0. A DataLoader is
read through its dataset and ``collate_fn`` in dataset order (its sampler is not used:
TRAK needs a fixed row order), ``batch_size`` rows at a time. A dataset with a transform
(``with_transform``/``set_transform``: the HF image recipes make ``pixel_values`` so) is read
through it: its rows are what the transform returns.
"""

import inspect
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from hf_trak.errors import InvalidArgumentError, InvalidInputError
from hf_trak.hf.adapters import head_model

Collator = Callable[[list], dict]


def model_input_names(model: nn.Module) -> set:
    """Named arguments of ``model.forward`` (what the Trainer keeps as signature columns); for a PEFT
    model, those of the model it wraps, as the Trainer does."""
    return {
        name
        for name, parameter in inspect.signature(head_model(model).forward).parameters.items()
        if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
    }


class ExampleSource:
    """The examples of one split, read in batches of tensors.

    Args:
        data: a ``datasets.Dataset`` or a ``torch.utils.data.DataLoader`` of dict batches.
        keep: column names to keep (model inputs and the task's columns).
        required: columns that must be present.
        pad_token_id: padding of ragged ``input_ids``.
        data_collator: optional ``list of row dicts -> dict batch`` (e.g.
            ``DataCollatorWithPadding``); default: stack, padding ragged columns.
    """

    def __init__(
        self, data, keep: set, required: Sequence[str], pad_token_id: int = 0, data_collator: Optional[Collator] = None
    ):
        self.data, self.keep, self.required = data, set(keep) | set(required), tuple(required)
        self.pad_token_id, self.data_collator = pad_token_id, data_collator
        if self.is_dataloader:
            if not (hasattr(data.dataset, "__len__") and hasattr(data.dataset, "__getitem__")):
                raise InvalidArgumentError("A DataLoader must wrap a map-style dataset with a length.")
        elif not hasattr(data, "column_names") or not hasattr(data, "__len__"):
            raise InvalidArgumentError(
                f"Expected a datasets.Dataset or a torch DataLoader of dict batches, got {type(data).__name__}. "
                "A stream (IterableDataset) is taken as the train split of featurize and attribute, which keep its "
                "rows on disk; elsewhere read it first: hf_trak.spool_stream(stream, folder)."
            )
        if len(self) == 0:
            raise InvalidInputError("The dataset is empty: there are no examples to featurize or score.")
        self.is_transformed = not self.is_dataloader and data.format.get("type") == "custom"
        if self.is_transformed:  # indexing applies the user's transform; rows are read as it returns them
            self._formatted = self._numpy = data
            self._check_columns(self._wanted(data[:1]))
        elif not self.is_dataloader:
            if "label" in data.column_names and "labels" not in data.column_names:
                data = data.rename_column("label", "labels")
            self._check_columns(data.column_names)
            wanted = [name for name in data.column_names if name in self.keep]
            self._formatted = data.with_format("torch" if data_collator is None else None, columns=wanted)
            self._numpy = data.with_format("numpy", columns=wanted)

    @classmethod
    def for_model(cls, data, model: nn.Module, task, data_collator: Optional[Collator] = None) -> "ExampleSource":
        """The examples of ``data`` that ``model`` and the model output function ``task`` read."""
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        return cls(
            data,
            keep=model_input_names(model),
            required=task.required_columns,
            pad_token_id=pad_token_id,
            data_collator=data_collator,
        )

    @property
    def is_dataloader(self) -> bool:
        return isinstance(self.data, torch.utils.data.DataLoader)

    def __len__(self) -> int:
        return len(self.data.dataset) if self.is_dataloader else len(self.data)

    def _check_columns(self, columns) -> None:
        missing = [name for name in self.required if name not in columns]
        if missing:
            raise InvalidInputError(
                f"The dataset has no {missing} column(s), which the model output function needs "
                f"(columns found: {sorted(columns)}). Add them, e.g. dataset.rename_column('my_label', 'labels')."
            )

    def _select(self, batch: dict) -> dict:
        """The batch's columns that are model inputs or the task's; flags a collator adds for the Trainer
        (``return_loss=True`` for CLIP) are left out: they are not columns, and f asks for no loss."""
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        self._check_columns(batch)
        return {name: value for name, value in batch.items() if name in self.keep and not isinstance(value, bool)}

    def _wanted(self, rows: Mapping) -> dict:
        """The columns of ``rows`` (name -> values) that are kept (``label`` as ``labels``)."""
        rows = dict(rows)
        if "label" in rows and "labels" not in rows:
            rows["labels"] = rows.pop("label")
        return {name: values for name, values in rows.items() if name in self.keep}

    def _collate(self, rows: dict) -> dict:
        if self.data_collator is not None:
            count = len(next(iter(rows.values())))
            return dict(self.data_collator([{name: rows[name][i] for name in rows} for i in range(count)]))
        return {name: self._stack(name, values) for name, values in rows.items()}

    def _stack(self, name: str, values) -> Tensor:
        if isinstance(values, Tensor):
            return values
        values = [torch.as_tensor(value) for value in values]
        if all(value.shape == values[0].shape for value in values):
            return torch.stack(values)
        padding = {"input_ids": self.pad_token_id, "labels": -100}.get(name, 0)
        return pad_sequence(values, batch_first=True, padding_value=padding)

    def batch(self, indices) -> dict:
        """The examples at ``indices`` (a slice or a list of row numbers) as one batch of tensors."""
        if self.is_transformed:
            return self._select(self._collate(self._wanted(self._formatted[indices])))
        if not self.is_dataloader:
            return self._select(self._collate(self._formatted[indices]))
        rows = range(len(self))[indices] if isinstance(indices, slice) else indices
        batch = self.data.collate_fn([self.data.dataset[i] for i in rows])
        if not isinstance(batch, Mapping):
            raise InvalidInputError(
                f"The DataLoader must yield dict batches (column -> tensor), got {type(batch).__name__}."
            )
        return self._select(dict(batch))

    @property
    def fingerprint(self) -> str:
        """The ``datasets`` fingerprint of the split (what its rows are), or its size if it has none."""
        data = self.data.dataset if self.is_dataloader else self.data
        return getattr(data, "_fingerprint", None) or f"{type(data).__name__}-{len(self)}"

    def rows(self, start: int = 0, stop: Optional[int] = None, chunk_size: int = 1024) -> Iterator[dict]:
        """Rows ``[start, stop)`` one at a time as ``{column: numpy array}``, unpadded: the values
        batches are made of (``hf_trak.data.inputs`` checks and hashes them)."""
        stop = len(self) if stop is None else stop
        for begin in range(start, stop, chunk_size):
            end = min(begin + chunk_size, stop)
            if self.is_dataloader:
                for i in range(begin, end):
                    row = self.data.dataset[i]
                    if not isinstance(row, Mapping):
                        raise InvalidInputError(
                            f"The DataLoader must yield dict batches (column -> tensor); its dataset gives "
                            f"{type(row).__name__} rows."
                        )
                    yield {name: np.asarray(value) for name, value in self._wanted(row).items()}
                continue
            chunk = self._wanted(self._numpy[begin:end]) if self.is_transformed else self._numpy[begin:end]
            for i in range(end - begin):
                yield {name: np.asarray(values[i]) for name, values in chunk.items()}

    def batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
        """Batches of tensors of rows ``[start, stop)``, in dataset order (a DataLoader: its own batch size)."""
        stop = len(self) if stop is None else stop
        size = (self.data.batch_size or batch_size) if self.is_dataloader else batch_size
        for begin in range(start, stop, size):
            yield self.batch(slice(begin, min(begin + size, stop)))

    def batch_count(self, batch_size: int, start: int = 0, stop: Optional[int] = None) -> int:
        """How many batches ``batches`` yields."""
        stop = len(self) if stop is None else stop
        return len(range(start, stop, (self.data.batch_size or batch_size) if self.is_dataloader else batch_size))

    def sample(self, num_examples: int, seed: int) -> dict:
        """``num_examples`` examples drawn without replacement with ``seed``, as one batch."""
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(self), generator=generator)[: min(num_examples, len(self))].tolist()
        return self.batch(indices)
