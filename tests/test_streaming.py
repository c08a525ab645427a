"""Streamed splits (``IterableDataset``): read once into Arrow files, resumed by position after a kill, and
scored exactly as the same rows materialized."""

import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset

import hf_trak
from hf_trak import TRAKer
from hf_trak.data.streaming import MANIFEST_NAME, spool_stream
from hf_trak.errors import InvalidArgumentError, InvalidInputError, OutputExistsError
from hf_trak.testing.datasets import token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, word_tokenizer

SETTINGS = dict(proj_dim=32, dtype=torch.float32)


class Killed(Exception):
    """The stream (the process reading it) stops here."""


def numbered(n=25, stop_at=None, offset=0):
    for i in range(n):
        if i == stop_at:
            raise Killed()
        yield {"x": i + offset, "text": f"row {i + offset}"}


def stream_of(**kwargs):
    return IterableDataset.from_generator(numbered, gen_kwargs=kwargs)


def files_of(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)
            if name.endswith(".arrow")}  # fmt: skip


def test_the_spool_holds_the_rows_in_order_in_chunk_files(tmp_path):
    split = token_sequences(25)
    rows = spool_stream(split.to_iterable_dataset(num_shards=3), str(tmp_path / "rows"), chunk_size=4)
    assert isinstance(rows, Dataset) and rows.to_dict() == split.to_dict()
    assert rows.features == split.features
    assert sorted(files_of(tmp_path / "rows")) == [
        f"rows-{a:012d}-{min(a + 4, 25):012d}.arrow" for a in range(0, 25, 4)
    ]
    again = spool_stream(split.to_iterable_dataset(num_shards=3), str(tmp_path / "rows"), chunk_size=4)
    assert again.to_dict() == split.to_dict()  # a complete spool is read back, not streamed again


def test_a_killed_spool_resumes_at_the_first_row_not_kept(tmp_path):
    folder = str(tmp_path / "rows")
    with pytest.raises(Killed):
        spool_stream(stream_of(stop_at=10), folder, chunk_size=4)
    kept = files_of(folder)
    assert sorted(kept) == ["rows-000000000000-000000000004.arrow", "rows-000000000004-000000000008.arrow"]
    with open(os.path.join(folder, MANIFEST_NAME)) as file:
        assert json.load(file)["rows"] == 8
    # A chunk written after the last record (killed between the two writes) is redone, not trusted.
    Dataset.from_dict({"x": [-1] * 4, "text": ["bad"] * 4}).to_parquet(os.path.join(folder, "x.parquet"))
    os.replace(os.path.join(folder, "x.parquet"), os.path.join(folder, "rows-000000000008-000000000012.arrow"))

    rows = spool_stream(stream_of(), folder, chunk_size=4)
    assert rows["x"][:] == list(range(25)) and rows["text"][:] == [f"row {i}" for i in range(25)]
    after = files_of(folder)
    assert {name: after[name] for name in kept} == kept  # the rows kept before the kill were not written again
    assert len(after) == 7


def test_another_stream_is_refused_and_replaced_only_when_asked(tmp_path):
    folder = str(tmp_path / "rows")
    spool_stream(stream_of(n=6), folder, chunk_size=4)
    before = files_of(folder)
    with pytest.raises(OutputExistsError, match="another stream"):
        spool_stream(stream_of(n=6, offset=100), folder, chunk_size=4)
    assert files_of(folder) == before
    with pytest.raises(OutputExistsError, match="another stream"):
        spool_stream(stream_of(n=6), folder, chunk_size=3)
    rows = spool_stream(stream_of(n=6, offset=100), folder, chunk_size=4, overwrite=True)
    assert rows["x"][:] == list(range(100, 106))
    for overwrite in (False, True):  # the same stream: its kept rows are read back, not streamed again
        assert spool_stream(stream_of(n=9, offset=100), folder, chunk_size=4, overwrite=overwrite)["x"][:] == list(
            range(100, 106)
        )
    two_shards = token_sequences(6).to_iterable_dataset(num_shards=2)
    spool_stream(token_sequences(6).to_iterable_dataset(num_shards=1), str(tmp_path / "shards"))
    with pytest.raises(OutputExistsError, match="number of shards"):
        spool_stream(two_shards, str(tmp_path / "shards"))
    with pytest.raises(InvalidInputError, match="no rows"):
        spool_stream(stream_of(n=0), str(tmp_path / "empty"))
    with pytest.raises(InvalidArgumentError, match="IterableDataset"):
        spool_stream(token_sequences(3), folder)
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        spool_stream(stream_of(), folder, chunk_size=0)


def test_a_streamed_train_split_scores_as_the_materialized_one(tmp_path):
    train, targets = token_sequences(30), token_sequences(5, seed=1)
    checkpoints = [tiny_bert().state_dict(), perturbed_state_dict(tiny_bert(), seed=1)]
    expected = TRAKer(tiny_bert(), **SETTINGS).featurize(train, checkpoints).score(targets)

    save_dir = str(tmp_path / "feats")
    streamed = TRAKer(tiny_bert(), save_dir=save_dir, **SETTINGS)
    streamed.featurize(train.to_iterable_dataset(num_shards=4), checkpoints)
    np.testing.assert_array_equal(streamed.score(targets), expected)
    assert os.path.isfile(os.path.join(save_dir + "-rows", "train", MANIFEST_NAME))

    stream = train.to_iterable_dataset(num_shards=4)
    loaded = TRAKer.from_pretrained(save_dir, tiny_bert(), checkpoints, train_dataset=stream)
    np.testing.assert_array_equal(loaded.score(targets), expected)
    with pytest.raises(InvalidArgumentError, match="stream_dir"):
        TRAKer(tiny_bert(), **SETTINGS).featurize(train.to_iterable_dataset(), checkpoints)


def test_attribute_reads_a_raw_stream_and_shows_its_rows(tmp_path):
    """The default (factored projector, principal factors from a sample of the rows) on a causal LM."""
    texts = Dataset.from_dict({"text": [" ".join(map(str, row)) for row in token_sequences(20)["input_ids"]]})
    targets = Dataset.from_dict({"text": texts["text"][:3]})
    common = dict(processor=word_tokenizer(), k=3, proj_dim=32)
    expected = hf_trak.attribute(tiny_gpt2(), texts, targets, **common)
    places = dict(save_dir=str(tmp_path / "feats"), stream_dir=str(tmp_path / "rows"))
    streamed = hf_trak.attribute(tiny_gpt2(), texts.to_iterable_dataset(num_shards=2), targets, **places, **common)
    np.testing.assert_array_equal(streamed.scores, expected.scores)
    assert streamed.top_k.to_dict() == expected.top_k.to_dict()
    assert os.path.isdir(tmp_path / "rows" / "train") and not os.path.exists(tmp_path / "feats-rows")
