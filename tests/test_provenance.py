"""Stored features are only paired with the split they were made from.

Scoring, top-k and ``from_pretrained`` check the train split's rows (content hashes of its
model inputs) against the store before any forward pass; a subset is accepted only when
asked for, and is then verified and scored as that subset.
"""

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.data.inputs import row_hash
from hf_trak.errors import OutputExistsError, StoreMismatchError
from hf_trak.testing.datasets import digits, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_vit


@pytest.fixture(scope="module")
def featurized(tmp_path_factory):
    model, train, targets = tiny_vit(), digits(24), digits(5, offset=60)
    root = str(tmp_path_factory.mktemp("store") / "store")
    traker = TRAKer(model, proj_dim=32, save_dir=root, shard_size=10, dtype=torch.float32)
    traker.featurize(train, [model.state_dict()], batch_size=8)
    return model, train, targets, root, traker.score(targets)


@pytest.mark.parametrize(
    "variant, message",
    [
        ("shuffled", r"row 0 is not the featurized row 0 \(\d+ of 24 rows differ"),
        ("fewer", r"has 20 rows but the features .* were made from 24.*train_subset=True"),
        ("more", r"has 30 rows but the features .* were made from 24"),
        ("another dataset", r"row 0 is not the featurized row 0 \(24 of 24 rows differ"),
        ("one row changed", r"row 17 is not the featurized row 17 \(1 of 24 rows differ"),
        ("swapped labels", r"row 3 is not the featurized row 3"),
    ],
)
def test_another_train_split_is_refused_before_any_checkpoint_is_loaded(featurized, variant, message):
    model, train, _, root, _ = featurized
    given = {
        "shuffled": lambda: train.shuffle(seed=0),
        "fewer": lambda: train.select(range(20)),
        "more": lambda: digits(30),
        "another dataset": lambda: digits(24, offset=100),
        "one row changed": lambda: train.map(
            lambda row, i: {"pixel_values": np.asarray(row["pixel_values"]) * (1.5 if i == 17 else 1.0)},
            with_indices=True,
        ),
        "swapped labels": lambda: train.map(
            lambda row, i: {"labels": (row["labels"] + (i == 3)) % 10}, with_indices=True
        ),  # fmt: skip
    }[variant]()

    class Unloadable(dict):
        """A checkpoint that fails if anything reads it: the split check comes first."""

        def items(self):
            raise AssertionError("a checkpoint was read before the train split was checked")

        keys = values = __iter__ = __getitem__ = items

    with pytest.raises(StoreMismatchError, match=message):
        TRAKer.from_pretrained(root, model, checkpoints=[Unloadable()], train_dataset=given)


def test_the_same_rows_in_another_format_or_container_are_accepted(featurized):
    model, train, targets, root, expected = featurized
    for same in (train.with_format("numpy"), train.with_format("torch"), train.rename_column("labels", "label"),
                 torch.utils.data.DataLoader(train.with_format("torch"), batch_size=5)):  # fmt: skip
        traker = TRAKer.from_pretrained(root, model, train_dataset=same)
        assert traker.train_rows is None
    np.testing.assert_array_equal(traker.score(targets), expected)


def test_a_subset_is_scored_as_that_subset_only_when_asked(featurized):
    model, train, targets, root, expected = featurized
    rows = [21, 3, 7, 0, 15]
    with pytest.raises(StoreMismatchError, match="train_subset=True"):
        TRAKer.from_pretrained(root, model, train_dataset=train.select(rows))
    traker = TRAKer.from_pretrained(root, model, train_dataset=train.select(rows), train_subset=True)
    np.testing.assert_array_equal(traker.train_rows, rows)
    scores = traker.score(targets)
    np.testing.assert_array_equal(scores, expected[rows])
    top = traker.top_k(targets, k=2)
    np.testing.assert_array_equal(top.indices, np.argsort(-scores, axis=0, kind="stable")[:2].T)
    with pytest.raises(ValueError, match="subset"):
        traker.save_scores(scores, "subset")
    with pytest.raises(StoreMismatchError, match="Row 1 of the train subset is not a row"):
        TRAKer.from_pretrained(root, model, train_dataset=digits(30).select([0, 29]), train_subset=True)


def test_a_resume_with_other_rows_names_the_first_differing_row(tmp_path):
    model, train = tiny_vit(), digits(20)
    root = str(tmp_path / "store")
    TRAKer(model, proj_dim=16, save_dir=root, shard_size=8).featurize(train, [model.state_dict()])
    swapped = train.select([0, 1, 2, 3, 4, 6, 5] + list(range(7, 20)))
    with pytest.raises(OutputExistsError, match="first differing row 5"):
        TRAKer(model, proj_dim=16, save_dir=root, shard_size=8).featurize(swapped, [model.state_dict()])
    # the same rows in another format resume (datasets' own fingerprint changes with the format)
    resumed = TRAKer(model, proj_dim=16, save_dir=root, shard_size=8).featurize(
        train.with_format("numpy"), [model.state_dict()]
    )
    assert resumed.store.is_complete()


def test_row_hashes_see_the_model_inputs_and_labels_not_their_format():
    data = token_sequences(3)
    rows = [dict(row) for row in data.select_columns(["input_ids", "labels"])]
    as_lists = [row_hash(row) for row in rows]
    as_arrays = [row_hash({name: np.asarray(value, dtype=np.int32) for name, value in row.items()}) for row in rows]
    as_tensors = [row_hash({name: torch.tensor(value) for name, value in row.items()}) for row in rows]
    assert as_lists == as_arrays == as_tensors and len(set(as_lists)) == 3
    changed = dict(rows[0], labels=rows[0]["labels"] + 1)
    assert row_hash(changed) != as_lists[0]


def test_text_features_are_checked_with_the_tokens_fed_to_the_model(tmp_path):
    model, train = tiny_bert(), token_sequences(12)
    root = str(tmp_path / "store")
    TRAKer(model, proj_dim=16, save_dir=root).featurize(train, [model.state_dict()])
    retokenized = train.map(
        lambda row: {"input_ids": row["input_ids"][:-1], "attention_mask": row["attention_mask"][:-1]}
    )
    with pytest.raises(StoreMismatchError, match="row 0 is not the featurized row 0"):
        TRAKer.from_pretrained(root, model, train_dataset=retokenized)
