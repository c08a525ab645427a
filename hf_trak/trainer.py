"""TRAK inside ``transformers.Trainer``: featurize at the checkpoints training saves, attribute after.

``TRAKCallback`` records the ``checkpoint-N`` folders the Trainer saves and, when training
ends, featurizes the training set at them: the checkpoint ensemble TRAK needs, at no extra
training cost. It reads the Trainer's own train DataLoader through its dataset (columns
already removed by the Trainer) and collator, in dataset order, so no column handling or
collation is duplicated. ``TRAKHFTrainer`` is a ``Trainer`` with that callback, an
``attribute(eval_dataset)`` that scores through ``get_eval_dataloader``, and the two checks of
``hf_trak.check`` (``check_attribution``: LDS on the user's own task; ``check_counterfactual``), which
retrain the model from the weights training started from: the callback keeps the trained parameters'
starting values and the buffers in ``<output_dir>/trak_initial_weights.safetensors`` when training starts
(``keep_initial_weights``; the frozen parameters are the checkpoints').
"""

import copy
import dataclasses
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_trak.arguments import TRAKArguments
from hf_trak.check.counterfactual import CounterfactualCheck, check_counterfactual
from hf_trak.check.lds_check import LDSCheck, check_lds
from hf_trak.check.retraining import Retrainer
from hf_trak.data.streaming import is_stream
from hf_trak.errors import InvalidArgumentError, NotFeaturizedError, NotFoundError
from hf_trak.store.card import render_trainer_section
from hf_trak.traker import TRAKer

logger = logging.getLogger(__name__)

ARGUMENTS_NAME = "trak_arguments.json"
INITIAL_WEIGHTS_NAME = "trak_initial_weights.safetensors"


def initial_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What retraining needs beyond a checkpoint: the trainable parameters' values and the buffers, copied."""
    state = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach().cpu().clone() for name, b in model.named_buffers()})
    return state


def model_from_initial_weights(model: nn.Module, path: str):
    """``model_init`` for retraining: a copy of ``model`` (a checkpoint of the run: its frozen parameters are the
    starting ones) with the starting values in ``path`` (``INITIAL_WEIGHTS_NAME``) loaded."""
    if not os.path.isfile(path):
        raise NotFoundError(
            f"{path} is missing: the checks retrain the model from the weights training started from, which "
            "TRAKHFTrainer keeps there (keep_initial_weights=True); or give a model_init."
        )
    weights = load_file(path)
    known = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    unknown = sorted(set(weights) - known)
    if unknown:  # names of another model: loading would leave every weight as trained
        raise InvalidArgumentError(
            f"{path} holds weights this model does not have ({unknown[:3]}...): it was kept for another model. "
            "Check with the run's own model, or give a model_init."
        )

    def model_init():
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(weights, strict=False)  # a PEFT run keeps its trainable weights only
        return fresh.train()

    return model_init


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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trak_args.keep_initial_weights and state.is_world_process_zero and state.global_step == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            save_file(initial_state(model), os.path.join(args.output_dir, INITIAL_WEIGHTS_NAME))

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
        data = getattr(train_dataloader, "dataset", None)
        if is_stream(data):  # read once into <save_dir>-rows/train (hf_trak.data.streaming), batched by its collator
            self.traker.featurize(data, checkpoints, data_collator=train_dataloader.collate_fn)
        else:
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
        return self.traker.score(self._targets(eval_dataset))

    def _targets(self, eval_dataset):
        """``get_eval_dataloader(eval_dataset)``; with none given and several eval splits (a dict), which one is
        asked for, as ``evaluate`` names them."""
        if eval_dataset is None and isinstance(self.eval_dataset, dict):
            raise InvalidArgumentError(
                f"eval_dataset holds several splits ({sorted(self.eval_dataset)}): name one, e.g. "
                f"attribute({sorted(self.eval_dataset)[0]!r}), or pass a dataset."
            )
        return self.get_eval_dataloader(eval_dataset)

    def _retrainer(self, eval_dataset, folder: Optional[str], max_steps: Optional[int]) -> Retrainer:
        if self.model_init is not None:
            model_init = self.call_model_init
        else:
            initial = os.path.join(self.args.output_dir, INITIAL_WEIGHTS_NAME)
            model_init = model_from_initial_weights(self.model, initial)
        return Retrainer(
            model_init=model_init,
            training_args=self.args,
            train_dataset=self.train_dataset,
            targets=self._targets(eval_dataset),
            folder=folder or os.path.join(self.args.output_dir, "trak_check"),
            data_collator=self.data_collator,
            task=self.traker.task,
            max_steps=max_steps,
            contrast=self.traker.train_source.data,  # what featurize read: the Trainer's train DataLoader
        )

    def check_attribution(
        self,
        eval_dataset=None,
        num_subsets: int = 32,
        fraction: float = 0.5,
        max_steps: Optional[int] = None,
        folder: Optional[str] = None,
        scores: Optional[np.ndarray] = None,
    ) -> LDSCheck:
        """The LDS of the attributions on this run's own task (``hf_trak.check.lds_check``): the model trained
        again, with these ``TrainingArguments``, on ``num_subsets`` random subsets of ``fraction`` of the train
        split (``max_steps``: a cap per retraining, for a cheaper check), f evaluated on ``eval_dataset``; each
        retrained model's outputs are kept in ``folder`` (default ``<output_dir>/trak_check``), so a stopped check
        resumes. ``scores``: the attributions of ``eval_dataset`` if already computed."""
        scores = self.attribute(eval_dataset) if scores is None else scores
        return check_lds(scores, self._retrainer(eval_dataset, folder, max_steps), num_subsets, fraction,
                         seed=self.args.seed)  # fmt: skip

    def check_counterfactual(
        self,
        targets: Sequence[int],
        eval_dataset=None,
        k: int = 10,
        num_seeds: int = 3,
        max_steps: Optional[int] = None,
        folder: Optional[str] = None,
        scores: Optional[np.ndarray] = None,
    ) -> CounterfactualCheck:
        """For each of ``targets`` (rows of ``eval_dataset``): the change of f when the model is trained again
        without the target's top-``k`` proponents, against without ``k`` random rows, means over ``num_seeds``
        seeds (``hf_trak.check.counterfactual``); kept and resumed like ``check_attribution``."""
        scores = self.attribute(eval_dataset) if scores is None else scores
        return check_counterfactual(scores, self._retrainer(eval_dataset, folder, max_steps), targets, k, num_seeds,
                                    seed=self.args.seed)  # fmt: skip

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
