"""Training the user's model again on part of its train split, with its own ``TrainingArguments``.

Both checks of ``hf_trak.check`` compare what the scores predict with what retraining does. A ``Retrainer``
trains a fresh model (``model_init()``: the weights training started from) with a copy of the run's
``TrainingArguments`` (nothing saved, logged or pushed; ``seed`` and, if given, ``max_steps`` replaced) on
the rows it is given, and evaluates the model output function f of each target (a task with a contrast set,
CLIP's, draws it from ``contrast``, the split the attributions' f drew it from). Each run's outputs are kept in
``folder`` as ``<name>.npz`` with the rows it was trained on, its seed and a digest of what else decides them (the
training arguments, ``max_steps``, the targets' rows; for f that reads the train split, f's settings and that it
does): a check that is stopped resumes where it was, and a kept run made otherwise is refused rather than reused.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, Optional

import numpy as np
from torch import nn
from transformers import PrinterCallback, Trainer, TrainingArguments

from hf_trak.data.inputs import scan_split
from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidArgumentError
from hf_trak.evaluate import model_outputs
from hf_trak.method.model_outputs import AbstractModelOutput, AutoModelOutput
from hf_trak.store.files import atomic_write

logger = logging.getLogger(__name__)


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()


@dataclasses.dataclass
class Retrainer:
    """Fresh models of the run, trained on chosen rows of ``train_dataset`` (see the module docstring).

    ``targets``: what f is evaluated on (model inputs, or a DataLoader of them); ``task``: f's task (default: the
    model head's); ``max_steps``: None keeps the run's length (its epochs or steps), a number caps every retraining
    at it (a cheaper, rougher check); ``contrast``: the split f's contrast set is drawn from, as the attributions
    were featurized from it (a dataset or a DataLoader; default: ``train_dataset``, batched by ``data_collator``).
    """

    model_init: Callable[[], nn.Module]
    training_args: TrainingArguments
    train_dataset: object
    targets: object
    folder: str
    data_collator: Optional[Callable] = None
    task: object = None
    max_steps: Optional[int] = None
    contrast: object = None

    def outputs(self, name: str, rows: np.ndarray, seed: int) -> np.ndarray:
        """f of every target (T,) for a model trained with ``seed`` on ``rows``: read from ``<folder>/<name>.npz``
        when an earlier call kept it, else trained, evaluated and kept."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        path = os.path.join(self.folder, f"{name}.npz")
        if os.path.isfile(path):
            kept = np.load(path)
            if str(kept["rows_digest"]) != rows_digest(rows) or int(kept["seed"]) != seed:
                raise InvalidArgumentError(
                    f"{path} holds a retraining on other rows or another seed (a check with other settings): "
                    "pass another folder, or delete it to start over."
                )
            if str(kept["settings_digest"]) != self.settings_digest:
                raise InvalidArgumentError(
                    f"{path} holds a retraining with other training arguments, max_steps or targets: pass another "
                    "folder, or delete it to start over."
                )
            return kept["outputs"]
        outputs = self._train_and_evaluate(rows, seed)
        os.makedirs(self.folder, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as file:
                np.savez(file, outputs=outputs, rows_digest=rows_digest(rows), seed=seed, num_rows=len(rows),
                         settings_digest=self.settings_digest)  # fmt: skip

        atomic_write(path, write)
        return outputs

    @functools.cached_property
    def settings_digest(self) -> str:
        """A digest of the training arguments (but where they write), ``max_steps`` and the targets' rows, and for
        f that reads the train split (it overrides ``at_checkpoint``: CLIP's contrast set), f and its settings."""
        settings = {key: value for key, value in self.training_args.to_dict().items()
                    if not key.endswith("_dir") and "hub" not in key}  # fmt: skip
        model = self.model_init()
        task = AutoModelOutput.resolve(model, self.task)
        source = ExampleSource.for_model(self.targets, model, task)
        hashes = scan_split(source, task, model, "target", "exclude", show_progress=False).row_hashes
        decided = [settings, self.max_steps, hashlib.sha256(hashes.tobytes()).hexdigest()]
        if type(task).at_checkpoint is not AbstractModelOutput.at_checkpoint:
            decided.append({"f": type(task).__name__, "settings": task.settings(), "contrast": "train_dataset"})
        return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()

    def _train_and_evaluate(self, rows: np.ndarray, seed: int) -> np.ndarray:
        model = self.model_init()
        with tempfile.TemporaryDirectory() as scratch:
            args = dataclasses.replace(
                self.training_args,
                output_dir=scratch,
                seed=seed,
                max_steps=self.max_steps if self.max_steps is not None else self.training_args.max_steps,
                save_strategy="no",
                eval_strategy="no",
                load_best_model_at_end=False,
                logging_strategy="no",
                report_to=[],
                push_to_hub=False,
                disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=args, train_dataset=self.train_dataset.select(rows),
                              data_collator=self.data_collator)  # fmt: skip
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        contrast = self.train_dataset if self.contrast is None else self.contrast
        return model_outputs(model.eval(), self.targets, task=self.task, contrast=contrast,
                             data_collator=self.data_collator)  # fmt: skip
