"""Self-influence: ``TRAKer.self_scores`` against the diagonal of the train split scored as its own targets."""

import copy
import re

import numpy as np
import pytest
import torch
from datasets import ClassLabel
from PIL import Image as PILImage
from scipy.stats import rankdata
from transformers import ViTImageProcessor

from hf_trak import InvalidArgumentError, TRAKer, prepare_split
from hf_trak.method.model_outputs import AutoModelOutput
from hf_trak.report import CAPTION, CELL, write_self_influence_report
from hf_trak.self_influence import self_influence_dataset
from hf_trak.testing.datasets import digit_images, digits, lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, tiny_vit

SETTINGS = {
    "default": {"dtype": "float32"},
    "trak": {"estimator": "trak", "dtype": "float32"},
    "normalized ensemble": {"ensemble": "normalized", "dtype": "float32"},
    "mean ensemble": {"ensemble": "mean", "dtype": "float32"},
    "default, float16 store": {},
}
MODELS = {
    "image": (tiny_vit, lambda: digits(24)),
    "text": (tiny_bert, lambda: token_sequences(24)),
    "causal_lm": (tiny_gpt2, lambda: lm_sequences(24)),
}


def featurized(model_name, tmp_path, **settings):
    make_model, make_data = MODELS[model_name]
    model, train = make_model(0), make_data()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=64, save_dir=str(tmp_path / "store"), **settings)
    return traker.featurize(train, checkpoints, batch_size=8), train


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_self_scores_are_the_diagonal_of_the_train_split_scored_as_targets(model_name, setting, tmp_path):
    """A second path: scoring the train split as targets recomputes every target feature by a forward and a
    backward pass; its diagonal is τ(z_i, z_i), times Q̄_i (the mean over checkpoints of the stored Q) where the
    scores leave Q out (``train_weight="none"``, the default estimator's). A float16 store (the default) rounds
    the train features that self_scores reads and the target pass does not: its tolerance is float16's (measured:
    2e-4 relative)."""
    traker, train = featurized(model_name, tmp_path, **SETTINGS[setting])
    diagonal = np.diag(traker.score(train, batch_size=8))
    q = np.mean([traker.store.out_to_loss(m) for m in range(2)], axis=0)
    on_loss = diagonal * q if traker.config.train_weight == "none" else diagonal
    assert (traker.config.train_weight == "none") == (setting != "trak")
    rtol = 2e-3 if "float16" in setting else 1e-5
    for on, expected in (("output", diagonal), ("loss", on_loss)):
        values = traker.self_scores(on=on)
        assert values.shape == (len(train),) and values.dtype == np.float32
        np.testing.assert_allclose(values, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    both = traker.self_scores(on="both")  # one read of the store gives the two
    np.testing.assert_array_equal(both[0], traker.self_scores(on="output"))
    np.testing.assert_array_equal(both[1], traker.self_scores(on="loss"))
    with pytest.raises(InvalidArgumentError, match="'loss', 'output' or 'both'"):
        traker.self_scores(on="outputs")


def test_self_scores_of_a_train_subset_and_of_a_loaded_store(tmp_path):
    traker, train = featurized("text", tmp_path)
    values = traker.self_scores()
    loaded = TRAKer.from_pretrained(traker.save_dir, tiny_bert(0), checkpoints=traker.checkpoints)
    np.testing.assert_array_equal(loaded.self_scores(), values)
    rows = [20, 3, 7]
    subset = TRAKer.from_pretrained(
        traker.save_dir, tiny_bert(0), checkpoints=traker.checkpoints, train_dataset=train.select(rows),
        train_subset=True,
    )  # fmt: skip
    np.testing.assert_array_equal(subset.self_scores(), values[rows])


def test_an_excluded_row_has_a_nan_self_score_and_the_others_are_the_clean_runs():
    model, train = tiny_vit(), digits(14)
    nan_row = {"pixel_values": np.full((1, 8, 8), np.nan, dtype=np.float32).tolist()}
    poisoned = train.map(lambda row, i: nan_row if i == 9 else row, with_indices=True)
    kwargs = dict(proj_dim=64, shard_size=5, dtype="float32")
    values = TRAKer(model, on_nonfinite="exclude", **kwargs).featurize(poisoned, [model.state_dict()]).self_scores()
    clean = TRAKer(model, **kwargs).featurize(train.select([i for i in range(14) if i != 9]), [model.state_dict()])
    assert np.isnan(values[9])
    np.testing.assert_allclose(np.delete(values, 9), clean.self_scores(), rtol=1e-5)


def test_the_ranking_lists_the_highest_self_scores_with_the_last_checkpoints_prediction_and_loss(tmp_path):
    """Second paths: the order of ``self_scores``; the prediction and the loss of the model loaded with the last
    checkpoint's weights, called directly; the report shows each listed row, in order, red where they differ."""
    raw = digit_images(40).cast_column("label", ClassLabel(names=[f"digit {i}" for i in range(10)]))
    model = tiny_vit(0)
    last = perturbed_state_dict(model, seed=3)
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False, image_mean=[0], image_std=[1])
    prepared = prepare_split(raw, model, AutoModelOutput.resolve(model), processor)
    traker = TRAKer(model, proj_dim=32, save_dir=str(tmp_path / "s")).featurize(
        prepared, [model.state_dict(), last], batch_size=8
    )
    ranking = self_influence_dataset(traker, raw, prepared, k=7)
    values, on_output = traker.self_scores(), traker.self_scores(on="output")
    mean_rank = (rankdata(values) + rankdata(on_output)) / (2 * len(values))
    assert ranking["train_index"] == np.argsort(-mean_rank, kind="stable")[:7].tolist()
    np.testing.assert_allclose(ranking["suspicion"], mean_rank[ranking["train_index"]], rtol=1e-6)
    np.testing.assert_array_equal(ranking["score"], values[ranking["train_index"]])
    np.testing.assert_array_equal(ranking["score_on_output"], on_output[ranking["train_index"]])
    assert ranking["rank"] == list(range(7)) and ranking.features["prediction"] == raw.features["label"]
    checked = copy.deepcopy(model)
    checked.load_state_dict(last)
    with torch.no_grad():
        batch = prepared.with_format("torch")[ranking["train_index"]]
        logits = checked.eval()(pixel_values=batch["pixel_values"]).logits
    assert ranking["prediction"] == logits.argmax(-1).tolist()
    expected = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none").numpy()
    np.testing.assert_allclose(ranking["loss"], expected, rtol=1e-4)
    assert ranking["label"] == [raw["label"][i] for i in ranking["train_index"]]

    page = open(write_self_influence_report(ranking, str(tmp_path / "self.html"))).read()
    shown = [int(row) for row in re.findall(r'<td class="number">#(\d+)</td>', page)]
    assert shown == ranking["train_index"]
    differs = sum(p != y for p, y in zip(ranking["prediction"], ranking["label"]))
    assert page.count('class="differs"') == differs
    grid = PILImage.open(write_self_influence_report(ranking, str(tmp_path / "self.png"), k=3))
    assert grid.size == (3 * CELL, 20 + CELL + CAPTION)


def test_a_causal_lm_ranking_has_losses_and_no_prediction(tmp_path):
    model, train = tiny_gpt2(0), lm_sequences(12)
    traker = TRAKer(model, proj_dim=32, save_dir=str(tmp_path / "s")).featurize(train, [model.state_dict()])
    ranking = self_influence_dataset(traker, train, train, k=3)
    assert "prediction" not in ranking.column_names
    with torch.no_grad():
        row = train.with_format("torch")[ranking["train_index"][0]]
        loss = model.eval()(**{name: value[None] for name, value in row.items() if name != "text"}).loss
    np.testing.assert_allclose(ranking["loss"][0], float(loss), rtol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"estimator": "trak", "projector": "factored"}], ids=["default", "trak"])
def test_a_rows_self_influence_splits_over_its_tokens(settings, tmp_path):
    """Each listed row's token shares (with its pooled share) sum to ``self_scores``' value, Q̄ included whether
    or not the scores weigh by Q; the ranking's ``tokens`` are the row's ids and the HTML report shades them."""
    from hf_trak.self_influence import self_influence_tokens

    model, train = tiny_gpt2(0), lm_sequences(16)
    traker = TRAKer(model, proj_dim=48, dtype="float32", save_dir=str(tmp_path / "s"), **settings)
    traker.featurize(train, [model.state_dict(), perturbed_state_dict(model, seed=2, scale=0.2)])
    values = traker.self_scores()
    for row, tokens in zip([3, 11], self_influence_tokens(traker, train, [3, 11])):
        assert tokens.train_tokens.sum() + tokens.train_pooled == pytest.approx(values[row], rel=1e-4)
        assert tokens.target_tokens.sum() + tokens.target_pooled == pytest.approx(values[row], rel=1e-4)
    ranking = self_influence_dataset(traker, train, train, k=2, per_token=True)
    assert set(ranking["train_index"]) <= set(range(16))
    for row in ranking:
        assert row["tokens"] == [str(i) for i in train[row["train_index"]]["input_ids"]]
        assert sum(row["token_scores"]) == pytest.approx(row["score"], rel=1e-4)
    page = open(write_self_influence_report(ranking, str(tmp_path / "self.html"))).read()
    assert page.count('<span class="token"') == sum(len(row["tokens"]) for row in ranking)
