"""TRAK inside ``transformers.Trainer``: featurize at the checkpoints training saves, attribute after.

``TRAKCallback`` records the ``checkpoint-N`` folders the Trainer saves and, when training
ends, featurizes the training set at them: the checkpoint ensemble TRAK needs, at no extra
training cost. It reads the Trainer's own train DataLoader through its dataset (columns
already removed by the Trainer) and collator, in dataset order, so no column handling or
collation is duplicated. ``TRAKHFTrainer`` is a ``Trainer`` with that callback and an
``attribute(eval_dataset)`` that scores through ``get_eval_dataloader``.
"""

import dataclasses
import logging
import os
from typing import List, Optional

import numpy as np
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_trak.arguments import TRAKArguments
from hf_trak.errors import NotFeaturizedError
from hf_trak.store.card import render_trainer_section
from hf_trak.traker import TRAKer

logger = logging.getLogger(__name__)

ARGUMENTS_NAME = "trak_arguments.json"


def make_traker(trak_args: TRAKArguments, model, output_dir: str) -> TRAKer:
    """The ``TRAKer`` of a training run: ``trak_args``, with the store in ``<output_dir>/trak`` by default."""
    return TRAKer(
        model, args=dataclasses.replace(trak_args, save_dir=trak_args.save_dir or os.path.join(output_dir, "trak"))
    )


class TRAKCallback(TrainerCallback):
    """Featurizes the training set at the checkpoints a ``Trainer`` saved, when training ends.

    Add it to any Trainer (``trainer.add_callback(TRAKCallback(TRAKArguments(...)))``); after
    ``train()``, ``callback.traker`` scores targets. Checkpoints come from ``save_strategy``;
    ones removed by ``save_total_limit`` before the end are skipped with a warning.
    """

    def __init__(self, trak_args: Optional[TRAKArguments] = None):
        self.trak_args = trak_args or TRAKArguments()
        self.saved_checkpoints: List[str] = []
        self.traker: Optional[TRAKer] = None

    def on_save(self, args, state, control, **kwargs):
        self.saved_checkpoints.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        checkpoints = [path for path in self.saved_checkpoints if os.path.isdir(path)]
        removed = sorted(set(self.saved_checkpoints) - set(checkpoints))
        if removed:
            logger.warning(
                "TRAK skips %d checkpoint(s) deleted during training (save_total_limit?): %s", len(removed), removed
            )
        if self.trak_args.max_checkpoints:
            checkpoints = checkpoints[-self.trak_args.max_checkpoints :]
        if not checkpoints:
            logger.warning(
                "No checkpoint was saved, so there is nothing to featurize: set save_strategy "
                "(e.g. 'epoch') in TrainingArguments."
            )
            return
        self.traker = make_traker(self.trak_args, model, args.output_dir)
        self.traker.featurize(train_dataloader, checkpoints)
        if self.traker.state.is_main_process:
            with open(os.path.join(self.traker.save_dir, ARGUMENTS_NAME), "w") as file:
                file.write(self.trak_args.to_json_string())


class TRAKHFTrainer(Trainer):
    """A ``transformers.Trainer`` that featurizes its training set for TRAK as it trains.

    Same constructor as ``Trainer`` plus ``trak_args``; after ``train()``,
    ``attribute(eval_dataset)`` returns TRAK scores of shape (len(train_dataset), len(eval_dataset)).
    """

    def __init__(self, *args, trak_args: Optional[TRAKArguments] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trak_callback = TRAKCallback(trak_args)
        self.add_callback(self.trak_callback)
        self.trak_features_repo: Optional[str] = None

    @property
    def traker(self) -> TRAKer:
        if self.trak_callback.traker is None:
            raise NotFeaturizedError("No TRAK features yet: call train() with a save_strategy that saves checkpoints.")
        return self.trak_callback.traker

    def attribute(self, eval_dataset=None) -> Optional[np.ndarray]:
        """TRAK scores of the training set for ``eval_dataset`` (default: the Trainer's), read through
        ``get_eval_dataloader`` (the Trainer's column removal and collator)."""
        return self.traker.score(self.get_eval_dataloader(eval_dataset))

    def push_trak_features(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None) -> str:
        """Upload the TRAK features as the dataset repo ``repo_id``; the model card that ``push_to_hub``
        (``create_model_card``) writes afterwards gets a "Data attribution" section linking it."""
        url = self.traker.push_to_hub(repo_id, private=private, token=token)
        self.trak_features_repo = repo_id
        return url

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.trak_features_repo is None or not self.is_world_process_zero():
            return
        section = render_trainer_section(self.trak_features_repo, self.traker.config.num_checkpoints)
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
            card.write("\n" + section)
