"""A checkpoint that looks like a local path is local: a missing one fails at
once with ``FileNotFoundError`` naming it, instead of being tried as a Hub repo id."""

import time

import pytest

import hf_trak
from hf_trak.cli import main
from hf_trak.hf.loading import load_model, load_processor, looks_like_local_path, resolve_model
from hf_trak.testing.datasets import digits
from hf_trak.testing.models import tiny_vit


@pytest.mark.parametrize(
    "name", ["./no_such_ckpt", "../no_such_ckpt", "~/no_such_ckpt", "/abs/no_such_ckpt", "out/missing/checkpoint-3",
             "existing/no_such_ckpt", "dir\\model"],
)  # fmt: skip
def test_missing_local_paths_fail_at_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    for load in (resolve_model, load_model, load_processor, lambda n: resolve_model([n])):
        started = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load(name)
        assert time.perf_counter() - started < 1.0
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_trak.attribute(name, train=digits(2), targets=digits(1))
    assert time.perf_counter() - started < 1.0


def test_hub_ids_are_not_taken_for_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("bert-base-uncased", "google/vit-base-patch16-224", "someone/my.model-v2"):
        assert not looks_like_local_path(hub_id)
    (tmp_path / "google").mkdir()  # a folder of that name makes "google/x" a local path
    assert looks_like_local_path("google/vit-base-patch16-224")


def test_the_cli_names_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["featurize", "--model", "./no_such_ckpt", "--dataset", "d", "--save-dir", "s"])
    assert done.value.code == 1
    assert (
        capsys.readouterr().err
        == "hf-trak: error: The model './no_such_ckpt' does not exist (no such file or folder).\n"
    )
    tiny_vit().save_pretrained("model")
    with pytest.raises(SystemExit) as done:
        main(["featurize", "--model", "model", "--dataset", "./no_such_data", "--save-dir", "s", "--no-processor"])
    assert done.value.code == 1 and "The dataset './no_such_data' does not exist" in capsys.readouterr().err
