"""The demo (``make demo``, ``hf-trak demo``): attribute a small ViT's digit predictions, offline.

1. Trains a ``ViTForImageClassification`` on 600 of scikit-learn's 8×8 digits with
   ``TRAKHFTrainer``, saving a checkpoint every 4 of 20 epochs: TRAK featurizes the train
   split at those 5 checkpoints when training ends.
2. ``trainer.attribute`` scores 200 test digits; prints each target's top proponents and
   writes ``report.png`` (targets, top proponents, top opponents).
3. Checks that the attributions mean something with the linear datamodeling score
   (``hf_trak.evaluate``): retrains the model on random half subsets and correlates the
   outputs the scores predict with the ones the retrained models give (random scores: ~0).
"""

import contextlib
import logging
import os

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    PrinterCallback,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.utils import logging as transformers_logging

from hf_trak.arguments import TRAKArguments
from hf_trak.attribute import top_k_dataset
from hf_trak.data.processing import prepare_split
from hf_trak.demo.digits import load_digits
from hf_trak.evaluate import lds, make_subsets, model_outputs
from hf_trak.report import write_report
from hf_trak.trainer import TRAKHFTrainer

logger = logging.getLogger(__name__)

NUM_TRAIN, NUM_TEST, EPOCHS, SAVE_EVERY_EPOCHS, BATCH_SIZE, LEARNING_RATE = 600, 200, 20, 4, 32, 5e-3


def make_model(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10, attn_implementation="eager",
    )  # fmt: skip
    return ViTForImageClassification(config)


def training_arguments(output_dir: str, num_examples: int, seed: int, save: bool) -> TrainingArguments:
    steps_per_epoch = -(-num_examples // BATCH_SIZE)
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        save_strategy="steps" if save else "no",
        save_steps=SAVE_EVERY_EPOCHS * steps_per_epoch,
        seed=seed,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=not save,  # a progress bar for the main run, none for the retrained subset models
    )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off (TRAK's own bars stay), restored on exit."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def run_demo(output_dir: str = "trak_demo", num_subsets: int = 24, proj_dim: int = 1024) -> dict:
    """Run the demo; returns its figures (accuracy, label agreement of top proponents, LDS, random LDS)."""
    with quiet_transformers():
        return _run_demo(output_dir, num_subsets, proj_dim)


def _run_demo(output_dir: str, num_subsets: int, proj_dim: int) -> dict:
    train_raw, test_raw = load_digits(0, NUM_TRAIN), load_digits(NUM_TRAIN, NUM_TRAIN + NUM_TEST)
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model = make_model(seed=0)
    train, test = (prepare_split(split, model, None, processor) for split in (train_raw, test_raw))

    trainer = TRAKHFTrainer(
        model=model,
        args=training_arguments(output_dir, len(train), seed=0, save=True),
        train_dataset=train,
        eval_dataset=test,
        processing_class=processor,
        trak_args=TRAKArguments(  # overwrite: each run retrains, so an earlier run's features are stale
            proj_dim=proj_dim, save_dir=os.path.join(output_dir, "trak"), batch_size=50, overwrite=True
        ),
    )
    trainer.train()
    accuracy = float((trainer.predict(test).predictions.argmax(-1) == np.array(test["label"])).mean())
    print(f"Trained a ViT ({model.num_parameters()} parameters) on {len(train)} digits: test accuracy {accuracy:.2f}")
    print(f"TRAK features of {trainer.traker.config.num_checkpoints} checkpoints in {trainer.traker.save_dir}")

    scores = trainer.attribute(test)
    top = top_k_dataset(scores, train_raw, test_raw, k=5)
    table = top.select_columns(["target", "kind", "train_index", "score", "label", "target_label"]).to_pandas()
    proponents = table[table["kind"] == "proponent"]
    for target, rows in list(proponents.groupby("target"))[:4]:
        shown = ", ".join(f"#{row.train_index} (a {row.label}, {row.score:+.3f})" for row in rows.itertuples())
        print(f"Test digit {target} (a {rows.target_label.iloc[0]}): top proponents {shown}")
    agreement = float((proponents["label"] == proponents["target_label"]).mean())
    print(f"Top-5 proponents with the target's label: {agreement:.2f} (random attribution: about 0.10)")
    print(f"Report: {write_report(top, os.path.join(output_dir, 'report.png'), num_targets=8)}")

    masks = make_subsets(len(train), num_subsets, seed=0)
    retraining = tqdm(list(enumerate(masks, 1)), desc="LDS: retraining on half subsets", unit="model")
    outputs = np.stack([subset_outputs(train, test, mask, seed, output_dir) for seed, mask in retraining])
    figure = lds(scores, masks, outputs).mean
    random = lds(np.random.default_rng(0).normal(size=scores.shape), masks, outputs).mean
    print(f"LDS over {num_subsets} retrained half-subset models: {figure:.2f} (random scores: {random:.2f})")
    return {"accuracy": accuracy, "agreement": agreement, "lds": figure, "random_lds": random}


def subset_outputs(train: Dataset, test: Dataset, mask: np.ndarray, seed: int, output_dir: str) -> np.ndarray:
    """f(z; θ_S) of each test example z for a model trained as above on the train examples in ``mask``."""
    model = make_model(seed)
    args = training_arguments(os.path.join(output_dir, "subsets"), int(mask.sum()), seed, save=False)
    trainer = Trainer(model=model, args=args, train_dataset=train.select(np.flatnonzero(mask)))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model_outputs(model.eval(), test)
