import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_trak import TRAKArguments, TRAKCallback, TRAKer, TRAKHFTrainer
from hf_trak.errors import InvalidArgumentError
from hf_trak.testing.datasets import clip_collator, clip_pairs, digits
from hf_trak.testing.models import tiny_clip, tiny_vit
from tests.hub_server import HubServer


def _training_args(output_dir, **kwargs):
    kwargs = {"num_train_epochs": 3, "save_strategy": "epoch", **kwargs}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )


def test_trak_trainer_featurizes_its_checkpoints_and_attributes(tmp_path):
    train, test = digits(40).add_column("note", ["x"] * 40), digits(6, offset=100)  # an unused column too
    trainer = TRAKHFTrainer(
        model=tiny_vit(),
        args=_training_args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        trak_args=TRAKArguments(proj_dim=64, dtype="float32", batch_size=7),
    )
    trainer.train()
    checkpoints = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert len(checkpoints) == 3 and trainer.traker.config.num_checkpoints == 3
    scores = trainer.attribute()
    assert scores.shape == (40, 6) and np.isfinite(scores).all()

    # Second path: TRAKer on the same data and checkpoint folders, outside the Trainer.
    reference = TRAKer(tiny_vit(), proj_dim=64, dtype=torch.float32, save_dir=None).featurize(
        digits(40), [os.path.join(tmp_path, c) for c in sorted(checkpoints, key=lambda c: int(c.split("-")[1]))]
    )
    np.testing.assert_allclose(scores, reference.score(test), rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    saved = json.load(open(os.path.join(tmp_path, "trak", "trak_arguments.json")))
    assert saved["proj_dim"] == 64 and saved["batch_size"] == 7


def test_a_streamed_train_dataset_is_featurized_as_the_materialized_one(tmp_path):
    train, test = digits(24), digits(4, offset=100)
    args = _training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer = TRAKHFTrainer(model=tiny_vit(), args=args, train_dataset=train.to_iterable_dataset(num_shards=2),
                            trak_args=TRAKArguments(proj_dim=32, dtype="float32"))  # fmt: skip
    trainer.train()
    assert os.path.isdir(tmp_path / "trak-rows" / "train") and trainer.traker.config.num_checkpoints == 2
    checkpoints = [str(tmp_path / f"checkpoint-{step}") for step in (3, 6)]
    reference = TRAKer(tiny_vit(), proj_dim=32, dtype=torch.float32).featurize(train, checkpoints)
    np.testing.assert_array_equal(trainer.attribute(test), reference.score(test))


def test_a_clip_trainer_with_a_return_loss_collator_is_featurized_as_its_split_by_hand(tmp_path):
    """CLIP's Trainer recipe collates ``return_loss=True`` into every batch; it is a flag, not a column: features
    and scores (f's contrast set from the train split) are those of TRAKer on the same rows and checkpoints."""
    train, test = clip_pairs(24), clip_pairs(4, seed=1)
    args = _training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    trainer = TRAKHFTrainer(model=tiny_clip(), args=args, train_dataset=train, data_collator=clip_collator,
                            trak_args=TRAKArguments(proj_dim=32, dtype="float32"))  # fmt: skip
    trainer.train()
    checkpoints = [str(tmp_path / f"checkpoint-{step}") for step in (3, 6)]
    reference = TRAKer(tiny_clip(), proj_dim=32, dtype=torch.float32).featurize(train, checkpoints)
    scores = trainer.attribute(test)
    np.testing.assert_allclose(scores, reference.score(test), rtol=1e-4, atol=1e-5 * np.abs(scores).max())


def test_several_eval_splits_are_scored_by_name_and_none_named_is_refused(tmp_path):
    """With ``eval_dataset={"a": ..., "b": ...}`` (as ``evaluate`` takes it), ``attribute("b")`` scores split b, and
    ``attribute()`` (which one?) names the splits instead of failing inside the DataLoader."""
    splits = {"a": digits(3, offset=20), "b": digits(2, offset=30)}
    args = _training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = TRAKHFTrainer(model=tiny_vit(), args=args, train_dataset=digits(16), eval_dataset=splits,
                            trak_args=TRAKArguments(proj_dim=8, dtype="float32"))  # fmt: skip
    trainer.train()
    np.testing.assert_array_equal(trainer.attribute("b"), trainer.traker.score(splits["b"]))
    for call in (trainer.attribute, lambda: trainer.check_attribution(num_subsets=2, max_steps=1)):
        with pytest.raises(InvalidArgumentError, match=r"several splits \(\['a', 'b'\]\): name one"):
            call()


def test_callback_works_with_a_plain_trainer_and_keeps_the_last_checkpoints(tmp_path):
    callback = TRAKCallback(TRAKArguments(proj_dim=32, max_checkpoints=2, save_dir=str(tmp_path / "features")))
    trainer = Trainer(
        model=tiny_vit(), args=_training_args(tmp_path / "out"), train_dataset=digits(24), callbacks=[callback]
    )
    trainer.train()
    assert callback.traker.config.num_checkpoints == 2
    assert callback.traker.config.checkpoint_sources == [os.path.abspath(p) for p in callback.saved_checkpoints[-2:]]
    assert callback.traker.score(digits(3, offset=50)).shape == (24, 3)


def test_attribute_before_training_explains_the_fix(tmp_path):
    trainer = TRAKHFTrainer(model=tiny_vit(), args=_training_args(tmp_path), train_dataset=digits(8))
    with pytest.raises(RuntimeError, match="save_strategy"):
        trainer.attribute(digits(2))


PUSH_FEATURES = textwrap.dedent("""
    import sys
    from transformers import TrainingArguments
    from hf_trak import TRAKArguments, TRAKHFTrainer
    from hf_trak.testing.datasets import digits
    from hf_trak.testing.models import tiny_vit
    args = TrainingArguments(output_dir=sys.argv[1], num_train_epochs=2, save_strategy="epoch", report_to=[],
                             use_cpu=True, logging_strategy="no", disable_tqdm=True)
    trainer = TRAKHFTrainer(model=tiny_vit(), args=args, train_dataset=digits(16),
                            trak_args=TRAKArguments(proj_dim=16))
    trainer.train()
    print(trainer.push_trak_features("someone/vit-trak"))
    trainer.create_model_card(model_name="vit-digits")
""")


@pytest.mark.slow
def test_pushed_features_are_linked_from_the_model_card(tmp_path):
    with HubServer() as hub:
        env = hub.client_env(tmp_path / "home")
        done = subprocess.run([sys.executable, "-c", PUSH_FEATURES, str(tmp_path / "out")], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        pushed = hub.state.repos["someone/vit-trak"]["files"]
    assert "/datasets/someone/vit-trak/commit/" in done.stdout and "trak_config.json" in pushed
    card = open(tmp_path / "out" / "README.md").read()
    assert "vit-digits" in card  # the Trainer's own card, kept
    assert "## Data attribution" in card and "https://huggingface.co/datasets/someone/vit-trak" in card
    assert "2 checkpoint(s)" in card and "checkpoints=checkpoints" in card
