"""Rows that cannot be attributed are named before any compute.

Labels must be integers the head accepts; model inputs and per-example gradients must be
finite (or, when asked, the row is excluded: its scores are NaN and every other score is
the clean run's); sequences must fit the model's positions.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_trak import TRAKer
from hf_trak.errors import InvalidInputError
from hf_trak.method.estimator import attention_input_parameters
from hf_trak.method.factored import factorable_parameter_names
from hf_trak.testing.datasets import digits, lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_gpt2, tiny_vit


def with_column(data: Dataset, name: str, values) -> Dataset:
    return data.remove_columns(name).add_column(name, list(values))


def with_pixels(data: Dataset, row: int, scale: float = None, value: float = None) -> Dataset:
    pixels = np.stack(data.with_format("numpy")["pixel_values"]).astype(np.float32)
    if scale is not None:
        pixels[row] *= scale
    if value is not None:
        pixels[row, 0, 3, 4] = value
    return Dataset.from_dict({"pixel_values": pixels, "labels": data["labels"]})


@pytest.mark.parametrize(
    "value, message",
    [
        (5, r"Column 'labels', row 4 of the train split: 5 is not a class of the model's head \(num_labels=3"),
        (-1, r"row 4 of the train split: -1 is not a class"),
        (-100, r"row 4 of the train split: -100 is not a class"),
        (0.5, r"row 4 of the train split: 0.5 is not an integer label \(the column holds float"),
    ],
)
def test_classification_labels_outside_the_head_are_named(value, message):
    model, data = tiny_bert(num_labels=3), token_sequences(8)
    labels = [value if i == 4 else label for i, label in enumerate(data["labels"])]
    with pytest.raises(InvalidInputError, match=message):
        TRAKer(model, proj_dim=8).featurize(with_column(data, "labels", labels), [model.state_dict()])


def test_float_labels_holding_integers_are_still_refused_with_the_cast_named():
    model, data = tiny_vit(), digits(6)
    as_float = with_column(data, "labels", np.asarray(data["labels"], dtype=np.float64))
    with pytest.raises(InvalidInputError, match=r"row 0 of the train split: 0.0 is not an integer.*cast_column"):
        TRAKer(model, proj_dim=8).featurize(as_float, [model.state_dict()])


def test_target_labels_are_checked_before_scoring():
    model, train = tiny_vit(num_labels=10), digits(10)
    traker = TRAKer(model, proj_dim=8).featurize(train, [model.state_dict()])
    targets = with_column(digits(4, offset=20), "labels", [1, 2, 10, 3])
    with pytest.raises(InvalidInputError, match=r"row 2 of the target split: 10 is not a class .*num_labels=10"):
        traker.score(targets)
    with pytest.raises(InvalidInputError, match="row 2 of the target split"):
        traker.top_k(targets, k=2)


def test_causal_lm_labels_are_token_ids_or_the_ignore_index():
    model, data = tiny_gpt2(), lm_sequences(6)
    vocab = model.config.vocab_size
    ignored = data.map(lambda row: {"labels": [-100] + row["labels"][1:]})
    TRAKer(model, proj_dim=8).featurize(ignored, [model.state_dict()])  # -100 masks a position
    beyond = data.map(lambda row, i: {"labels": row["labels"][:-1] + [vocab if i == 2 else 1]}, with_indices=True)
    with pytest.raises(InvalidInputError, match=rf"row 2 of the train split: {vocab} is not a token id .*vocab_size"):
        TRAKer(model, proj_dim=8).featurize(beyond, [model.state_dict()])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_input_is_named(value):
    model = tiny_vit()
    with pytest.raises(InvalidInputError, match=r"Column 'pixel_values', row 3 of the train split holds NaN or inf"):
        TRAKer(model, proj_dim=8).featurize(with_pixels(digits(8), 3, value=value), [model.state_dict()])
    traker = TRAKer(model, proj_dim=8).featurize(digits(8), [model.state_dict()])
    with pytest.raises(InvalidInputError, match=r"row 1 of the target split holds NaN or inf"):
        traker.score(with_pixels(digits(3, offset=30), 1, value=value))


def test_finite_inputs_with_non_finite_gradients_are_named():
    model = tiny_vit()
    overflowing = with_pixels(digits(8), 6, scale=3e38)  # finite, but the forward pass overflows
    with pytest.raises(InvalidInputError, match=r"Row 6 of the train split has non-finite gradients .*checkpoint 0"):
        TRAKer(model, proj_dim=8).featurize(overflowing, [model.state_dict()])


@pytest.mark.parametrize("projector", ["rademacher", "factored", "factored, with q/k/v"])
@pytest.mark.parametrize("bad", ["nan input", "overflow"])
def test_excluded_rows_score_nan_and_leave_every_other_score_as_the_clean_run(projector, bad):
    """With q/k/v: the ViT's class token is finite at the first attention's input for a NaN image, yet the row
    adds nothing to the mixed kernels' Kronecker factors or to the principal factors' sample."""
    model, train, targets = tiny_vit(), digits(14), digits(4, offset=40)
    poisoned = with_pixels(train, 9, value=float("nan")) if bad == "nan input" else with_pixels(train, 9, scale=3e38)
    kwargs = dict(proj_dim=64, projector=projector.split(",")[0], dtype=torch.float32, shard_size=5)
    if projector.endswith("q/k/v"):
        kwargs["grad_wrt"] = [name for name in factorable_parameter_names(model) if not name.endswith(".bias")]
        assert attention_input_parameters(model) & set(kwargs["grad_wrt"])
    excluded = TRAKer(model, on_nonfinite="exclude", **kwargs).featurize(poisoned, [model.state_dict()])
    assert excluded.store.config.excluded_rows == [9]
    scores = excluded.score(targets)
    assert np.isnan(scores[9]).all() and np.isfinite(np.delete(scores, 9, axis=0)).all()
    clean = TRAKer(model, **kwargs).featurize(train.select([i for i in range(14) if i != 9]), [model.state_dict()])
    expected = clean.score(targets)
    np.testing.assert_allclose(np.delete(scores, 9, axis=0), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    top = excluded.top_k(targets, k=13)
    assert 9 not in top.indices  # an excluded row ranks last: it is never among the 13 others
    bottom = excluded.top_k(targets, k=13, largest=False)
    assert 9 not in bottom.indices


def test_sequences_longer_than_the_model_are_named_with_the_truncation_option():
    model = tiny_bert()  # max_position_embeddings = 16
    data = token_sequences(5, min_len=3, max_len=9)
    long = data.map(lambda row, i: {key: row[key] * (5 if i == 3 else 1) for key in ("input_ids", "attention_mask",
                    "token_type_ids") if key in row}, with_indices=True)  # fmt: skip
    length = len(long[3]["input_ids"])
    assert length > 16
    with pytest.raises(
        InvalidInputError,
        match=rf"Row 3 of the train split has {length} tokens, more than the model's maximum of 16 "
        r"\(max_position_embeddings\): truncate .*max_length=16.*--max-length 16",
    ):
        TRAKer(model, proj_dim=8).featurize(long, [model.state_dict()])


def test_a_failed_check_writes_nothing(tmp_path):
    model, data = tiny_bert(num_labels=3), token_sequences(8)
    bad = with_column(data, "labels", [0, 1, 2, 3, 0, 1, 2, 0])
    with pytest.raises(InvalidInputError):
        TRAKer(model, proj_dim=8, save_dir=str(tmp_path / "store")).featurize(bad, [model.state_dict()])
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("loader", [False, True])
def test_batch_count_is_the_number_of_batches_yielded(loader):
    """``ExampleSource.batch_count`` (what an FSDP process plans its passes by, ``hf_trak.hf.sharding``) counts the
    batches ``batches`` yields for any range, a DataLoader's own batch size taking precedence."""
    from hf_trak.data.source import ExampleSource

    data = digits(11)
    data = torch.utils.data.DataLoader(data.with_format("torch"), batch_size=4) if loader else data
    source = ExampleSource(data, keep={"pixel_values"}, required=["labels"])
    for batch_size, start, stop in [(3, 0, 11), (3, 4, 8), (5, 8, 11), (2, 5, 5), (20, 0, None)]:
        assert source.batch_count(batch_size, start, stop) == len(list(source.batches(batch_size, start, stop)))
    assert source.batch_count(3, 0, 11) == (3 if loader else 4)


def made_on_access(data: Dataset, labels: str = "label") -> Dataset:
    """``data`` as the HF image recipes keep it: raw pixels, and ``pixel_values`` made by a transform on access."""

    def transform(batch):
        made = {"pixel_values": [torch.tensor(np.asarray(pixels)) for pixels in batch["pixels"]]}
        return {**made, labels: batch["labels"]} if labels else made

    return data.rename_column("pixel_values", "pixels").with_transform(transform)


def test_a_split_with_a_transform_is_read_through_it_and_scored_as_the_rows_it_makes():
    """A dataset whose ``pixel_values`` a ``with_transform`` makes (and whose ``label`` is renamed) gives the
    features and scores of the same rows kept as columns; a transform that drops a needed column is named."""
    train, targets = digits(20), digits(3, offset=30)
    kept = TRAKer(tiny_vit(0), proj_dim=16, dtype="float32").featurize(train, [tiny_vit(0).state_dict()])
    made = TRAKer(tiny_vit(0), proj_dim=16, dtype="float32").featurize(
        made_on_access(train), [tiny_vit(0).state_dict()]
    )
    np.testing.assert_array_equal(made.score(made_on_access(targets)), kept.score(targets))
    with pytest.raises(InvalidInputError, match=r"no \['labels'\] column"):
        TRAKer(tiny_vit(0), proj_dim=16).featurize(made_on_access(train, labels=None), [tiny_vit(0).state_dict()])
