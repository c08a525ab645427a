"""Resuming is robust.

A model is its weights, not how its path is spelled; a run that wrote no features never
blocks a corrected rerun; a corrupt shard or kernel is redone on resume (with a warning
naming it) and named by scoring.
"""

import logging
import os

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.cli import main
from hf_trak.errors import CorruptStoreError, InvalidArgumentError
from hf_trak.store.feature_store import FeatureStore
from hf_trak.testing.datasets import digits
from hf_trak.testing.models import tiny_vit


def featurize(root, data=None, checkpoints=None, **settings):
    model = tiny_vit()
    kwargs = dict(proj_dim=16, save_dir=str(root), shard_size=5, dtype=torch.float32, **settings)
    return TRAKer(model, **kwargs).featurize(data or digits(12), checkpoints or [model.state_dict()], batch_size=4)


def read_all(root) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_a_model_path_spelled_otherwise_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny_vit().save_pretrained("out/model")
    from datasets import DatasetDict

    DatasetDict(train=digits(10), test=digits(3, offset=20)).save_to_disk("splits")
    spellings = ["out/model", "./out/model", str(tmp_path / "out" / "model"), "out/../out/model"]
    for spelling in spellings:
        try:
            main(["featurize", "--model", spelling, "--dataset", "splits", "--save-dir", "feats", "--proj-dim", "8",
                  "--no-processor"])  # fmt: skip
        except SystemExit as done:
            pytest.fail(f"{spelling}: {capsys.readouterr().err}") if done.code else None
        if spelling == spellings[0]:
            first = read_all("feats/checkpoint-0")
    assert read_all("feats/checkpoint-0") == first  # resumed every time: nothing recomputed


def test_a_run_that_wrote_no_features_never_blocks_the_corrected_rerun(tmp_path):
    model = tiny_vit()
    root = tmp_path / "store"
    wrong = {name: t for name, t in model.state_dict().items() if not name.startswith("classifier")}
    with pytest.raises(InvalidArgumentError):  # fails at the checkpoint, after the store's settings were written
        featurize(root, checkpoints=[wrong], projector_seed=5)
    assert os.path.isfile(root / "trak_config.json")
    fixed = featurize(root)  # other settings (seed 0): accepted, the empty store is replaced
    assert fixed.store.is_complete() and fixed.store.config.projector_seed == 0


def corrupt(path, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "emptied":
        data = b""
    else:  # one flipped byte inside the features
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    open(path, "wb").write(data)


@pytest.mark.parametrize("kind", ["features", "preconditioned"])
@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped"])
def test_a_corrupt_shard_is_named_and_redone_by_a_resume(tmp_path, kind, how, caplog):
    clean = featurize(tmp_path / "clean")
    expected = clean.score(digits(3, offset=30))
    featurize(tmp_path / "store")
    shard = tmp_path / "store" / "checkpoint-0" / f"{kind}-000000005-000000010.arrow"
    corrupt(shard, how)
    with pytest.raises(CorruptStoreError, match=rf"Shard {shard} .*run featurize again"):
        FeatureStore.load(str(tmp_path / "store")).verify()  # every row count and checksum
    if how != "flipped":  # loading for scoring checks every file's structure (not its CRC, which costs a read)
        with pytest.raises(CorruptStoreError, match=rf"Shard {shard} .*run featurize again"):
            TRAKer.from_pretrained(str(tmp_path / "store"), tiny_vit()).score(digits(3, offset=30))
    with caplog.at_level(logging.WARNING, logger="hf_trak"):
        resumed = featurize(tmp_path / "store")
    assert any(str(shard) in record.getMessage() and "Redoing" in record.getMessage() for record in caplog.records)
    FeatureStore.load(str(tmp_path / "store")).verify()
    np.testing.assert_array_equal(resumed.score(digits(3, offset=30)), expected)


def test_a_corrupt_kernel_is_named_and_redone(tmp_path, caplog):
    featurize(tmp_path / "store")
    expected = read_all(tmp_path / "store" / "checkpoint-0")
    kernel = tmp_path / "store" / "checkpoint-0" / "kernel.safetensors"
    corrupt(kernel, "truncated")
    with pytest.raises(CorruptStoreError, match=rf"{kernel} is corrupt"):
        FeatureStore.load(str(tmp_path / "store")).verify()
    with caplog.at_level(logging.WARNING, logger="hf_trak"):
        featurize(tmp_path / "store")
    assert any(str(kernel) in record.getMessage() for record in caplog.records)
    assert read_all(tmp_path / "store" / "checkpoint-0") == expected


def test_corrupt_kernel_statistics_are_redone_with_their_shard(tmp_path, caplog):
    kwargs = dict(projector="factored", kernel="per_module", kernel_from="tokens")
    expected = featurize(tmp_path / "clean", **kwargs).score(digits(3, offset=30))
    featurize(tmp_path / "store", **kwargs)
    statistics = tmp_path / "store" / "checkpoint-0" / "kernel-statistics-000000005-000000010.safetensors"
    corrupt(statistics, "truncated")
    os.remove(tmp_path / "store" / "checkpoint-0" / "kernel.safetensors")  # the kernel is made from them
    with caplog.at_level(logging.WARNING, logger="hf_trak"):
        resumed = featurize(tmp_path / "store", **kwargs)
    assert any(
        str(statistics) in record.getMessage() and "Redoing" in record.getMessage() for record in caplog.records
    )
    np.testing.assert_array_equal(resumed.score(digits(3, offset=30)), expected)
