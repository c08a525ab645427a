"""The checks of attribution on the user's task: LDS with a bootstrap interval, and the counterfactual check.

The plumbing is tested against a linear datamodel, whose outputs the scores predict exactly (closed form);
the retraining itself against a ``Trainer`` run by hand, and the whole against ``TRAKHFTrainer``.
"""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_trak import TRAKArguments, TRAKHFTrainer
from hf_trak.check.counterfactual import check_counterfactual
from hf_trak.check.lds_check import bootstrap_interval, check_lds
from hf_trak.check.retraining import Retrainer
from hf_trak.errors import InvalidArgumentError, NotFoundError
from hf_trak.evaluate import model_outputs
from hf_trak.method.model_outputs import CLIPModelOutput
from hf_trak.testing.datasets import clip_collator, clip_pairs, digits
from hf_trak.testing.models import tiny_clip, tiny_vit
from hf_trak.trainer import INITIAL_WEIGHTS_NAME


@dataclasses.dataclass
class LinearRetrainer(Retrainer):
    """f(targets; trained on rows) = Σ_{i in rows} W[i] (+ seeded noise): a linear datamodel with weights W."""

    weights: np.ndarray = None
    noise: float = 0.0
    trained: list = dataclasses.field(default_factory=list)
    settings_digest = "a linear datamodel"

    def _train_and_evaluate(self, rows, seed):
        self.trained.append(seed)
        return self.weights[rows].sum(0) + self.noise * np.random.default_rng(seed).normal(size=self.weights.shape[1])


def linear(tmp_path, n=60, targets=8, noise=0.0):
    weights = np.random.default_rng(7).normal(size=(n, targets))
    return LinearRetrainer(None, None, None, None, str(tmp_path / "runs"), weights=weights, noise=noise)


def test_exact_scores_have_lds_one_random_ones_about_zero_and_the_intervals_say_so(tmp_path):
    retrainer = linear(tmp_path, noise=0.5)
    exact = check_lds(retrainer.weights, retrainer, num_subsets=24)
    assert exact.lds > 0.95 and exact.interval[0] <= exact.lds <= exact.interval[1]
    assert abs(exact.random_lds) < 0.25 and exact.random_interval[1] < exact.interval[0]
    assert "LDS 0." in str(exact) and "random scores" in str(exact)
    reversed_scores = check_lds(-retrainer.weights, retrainer, num_subsets=24)
    assert reversed_scores.lds == pytest.approx(-exact.lds)


def test_a_check_resumes_from_the_kept_runs_and_more_subsets_extend_it(tmp_path):
    retrainer = linear(tmp_path)
    first = check_lds(retrainer.weights, retrainer, num_subsets=6)
    assert retrainer.trained == list(range(6))
    again = check_lds(retrainer.weights, retrainer, num_subsets=6)
    assert retrainer.trained == list(range(6)) and again.lds == first.lds  # nothing trained again
    check_lds(retrainer.weights, retrainer, num_subsets=9)
    assert retrainer.trained == list(range(9))  # the first 6 subsets are the same ones: only 3 more trained
    with pytest.raises(InvalidArgumentError, match="other rows or another seed"):
        check_lds(retrainer.weights, retrainer, num_subsets=6, fraction=0.3)  # other subsets, same files


def test_bootstrap_interval_of_a_constant_is_the_constant_and_widens_with_spread():
    assert bootstrap_interval(np.full(10, 0.4)) == pytest.approx((0.4, 0.4))
    low, high = bootstrap_interval(np.random.default_rng(0).normal(size=400))
    assert low < 0 < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.15)


def test_the_counterfactual_check_of_a_linear_datamodel_is_minus_the_removed_scores(tmp_path):
    retrainer = linear(tmp_path)
    weights, k = retrainer.weights, 5
    found = check_counterfactual(weights, retrainer, targets=[1, 4], k=k, num_seeds=2)
    top = np.argsort(-weights, axis=0)[:k]
    np.testing.assert_allclose(found.full, weights.sum(0)[[1, 4]])
    np.testing.assert_allclose(found.removed_top, [-weights[top[:, 1], 1].sum(), -weights[top[:, 4], 4].sum()])
    randoms = [np.random.default_rng(seed).choice(len(weights), size=k, replace=False) for seed in (0, 1)]
    expected = np.mean([-weights[rows][:, [1, 4]].sum(0) for rows in randoms], axis=0)
    np.testing.assert_allclose(found.removed_random, expected)
    assert (found.removed_top < found.removed_random).all() and len(retrainer.trained) == 2 * (2 + 2)
    with pytest.raises(InvalidArgumentError, match="rows of the target split, 0 to 7"):
        check_counterfactual(weights, retrainer, targets=[8])
    with pytest.raises(InvalidArgumentError, match="whole train split"):
        check_counterfactual(weights, retrainer, targets=[0], k=60)


def _training_args(output_dir, **kwargs):
    return TrainingArguments(output_dir=str(output_dir), num_train_epochs=2, save_strategy="epoch",
                             per_device_train_batch_size=8, learning_rate=5e-3, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, **kwargs)  # fmt: skip


def test_a_retraining_is_the_trainer_run_by_hand_with_the_same_arguments(tmp_path):
    train, targets = digits(40), digits(6, offset=50)
    args = _training_args(tmp_path / "run", seed=3)
    retrainer = Retrainer(lambda: tiny_vit(0), args, train, targets, str(tmp_path / "kept"))
    rows = np.arange(0, 40, 2)
    outputs = retrainer.outputs("half", rows, seed=5)
    assert not (tmp_path / "run").exists()  # a retraining writes nothing in the run's output_dir
    model = tiny_vit(0)
    by_hand = Trainer(model=model, args=dataclasses.replace(args, seed=5, save_strategy="no"),
                      train_dataset=train.select(rows))  # fmt: skip
    by_hand.train()
    np.testing.assert_allclose(outputs, model_outputs(model.eval(), targets), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "kept" / "half.npz")["outputs"], outputs)
    for changed in ({"max_steps": 1}, {"targets": digits(6, offset=51)}, {"training_args": _training_args("x")}):
        other = dataclasses.replace(retrainer, **changed)
        with pytest.raises(InvalidArgumentError, match="other training arguments, max_steps or targets"):
            other.outputs("half", rows, seed=5)
    moved = dataclasses.replace(retrainer, training_args=dataclasses.replace(args, output_dir=str(tmp_path / "else")))
    np.testing.assert_array_equal(moved.outputs("half", rows, seed=5), outputs)  # where it writes does not count


def test_a_clip_retraining_evaluates_f_against_the_train_split_as_the_attributions_do(tmp_path):
    """CLIP's f contrasts each target with train rows (``TRAKer``'s train sampler); a retrained model's f must too,
    not with the targets. A kept run is refused when f's settings change."""
    train, targets = clip_pairs(24), clip_pairs(5, seed=1)
    args = _training_args(tmp_path / "run", seed=3)
    retrainer = Retrainer(lambda: tiny_clip(0), args, train, targets, str(tmp_path / "kept"),
                          data_collator=clip_collator)  # fmt: skip
    rows = np.arange(0, 24, 2)
    outputs = retrainer.outputs("half", rows, seed=5)
    model = tiny_clip(0)
    by_hand = Trainer(model=model, args=dataclasses.replace(args, seed=5, save_strategy="no"),
                      train_dataset=train.select(rows), data_collator=clip_collator)  # fmt: skip
    by_hand.train()
    model.eval()
    np.testing.assert_allclose(outputs, model_outputs(model, targets, contrast=train), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs, model_outputs(model, targets), rtol=1e-2)  # the targets' own contrast set
    other = dataclasses.replace(retrainer, task=CLIPModelOutput(num_contrast=8))
    with pytest.raises(InvalidArgumentError, match="other training arguments, max_steps or targets"):
        other.outputs("half", rows, seed=5)


def test_trak_trainer_checks_clip_against_the_contrast_set_it_featurized_from(tmp_path):
    """The HF image recipes make ``pixel_values`` on access (``with_transform``) and keep the raw columns
    (``remove_unused_columns=False``): the Trainer's check draws f's contrast set from what featurize read (its
    train DataLoader), so the retrained f is the one of the rows as they were made, not of the raw columns."""
    raw = clip_pairs(24)
    train = raw.rename_column("pixel_values", "image").with_transform(
        lambda batch: {**batch, "pixel_values": [torch.tensor(image) for image in batch["image"]]}
    )

    def collator(rows):
        return clip_collator([{**row, "pixel_values": torch.as_tensor(row["pixel_values"]).tolist()} for row in rows])

    args = _training_args(tmp_path / "out", remove_unused_columns=False)
    trainer = TRAKHFTrainer(model=tiny_clip(0), args=args, train_dataset=train, data_collator=collator,
                            trak_args=TRAKArguments(proj_dim=16, dtype="float32"))  # fmt: skip
    trainer.train()
    targets = clip_pairs(4, seed=1)
    retrainer = trainer._retrainer(targets, str(tmp_path / "kept"), max_steps=2)
    rows = np.arange(0, 24, 2)
    outputs = retrainer.outputs("half", rows, seed=5)
    model = tiny_clip(0)  # the weights the run started from
    by_hand = Trainer(model=model, args=dataclasses.replace(retrainer.training_args, seed=5, max_steps=2,
                      save_strategy="no", output_dir=str(tmp_path / "by_hand")), train_dataset=raw.select(rows),
                      data_collator=clip_collator)  # fmt: skip
    by_hand.train()
    model.eval()
    np.testing.assert_allclose(outputs, model_outputs(model, targets, contrast=raw), rtol=1e-5, atol=1e-6)
    assert trainer.check_attribution(targets, num_subsets=2, max_steps=1).num_subsets == 2


def test_trak_trainer_checks_its_own_run_from_its_initial_weights(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(0)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = TRAKHFTrainer(model=model, args=_training_args(tmp_path / "out"), train_dataset=digits(48),
                            eval_dataset=digits(6, offset=60), trak_args=TRAKArguments(proj_dim=32))  # fmt: skip
    trainer.train()
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "out" / INITIAL_WEIGHTS_NAME))
    assert set(kept) == {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert all(torch.equal(kept[name], start[name]) for name in kept)
    assert not torch.equal(model.state_dict()["classifier.weight"], start["classifier.weight"])  # it trained

    result = trainer.check_attribution(num_subsets=3, max_steps=2)
    assert result.num_subsets == 3 and len(result.per_target) == 6 and -1 <= result.lds <= 1
    assert sorted(p.name for p in (tmp_path / "out" / "trak_check").iterdir()) == [
        f"subset-000{i}.npz" for i in range(3)
    ]
    counterfactual = trainer.check_counterfactual([0], k=4, num_seeds=1, max_steps=2)
    assert counterfactual.removed_top.shape == (1,) and np.isfinite(counterfactual.removed_random).all()

    from safetensors.torch import save_file

    save_file({f"other.{name}": value for name, value in kept.items()}, str(tmp_path / "out" / INITIAL_WEIGHTS_NAME))
    with pytest.raises(InvalidArgumentError, match="it was kept for another model"):
        trainer.check_attribution(num_subsets=3, folder=str(tmp_path / "renamed"))
    (tmp_path / "out" / INITIAL_WEIGHTS_NAME).unlink()
    with pytest.raises(NotFoundError, match="keep_initial_weights"):
        trainer.check_attribution(num_subsets=3, folder=str(tmp_path / "other"))
