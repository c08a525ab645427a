"""Stores from someone else: files that disagree with their config are refused with a named error when the store
is loaded for scoring, before anything the config sizes is allocated; an incomplete copy says so; the card is
never parsed."""

import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_trak import CorruptStoreError, IncompleteStoreError, TRAKer
from hf_trak.store.arrow_files import fixed_size_list, write_arrow
from hf_trak.testing.datasets import digits
from hf_trak.testing.models import tiny_vit

CONFIG = "trak_config.json"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A complete store of 20 digits in shards of 8 rows, one checkpoint, k = 32: (its folder, its scores)."""
    root = tmp_path_factory.mktemp("clean") / "store"
    model = tiny_vit()
    traker = TRAKer(model, proj_dim=32, save_dir=str(root), shard_size=8).featurize(digits(20), [model.state_dict()])
    return root, traker.score(digits(3, offset=40))


@pytest.fixture
def store(clean, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(clean[0], root)
    return root


def _edit_config(root, **changes):
    path = root / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _load(root):
    return TRAKer.from_pretrained(str(root), tiny_vit())


def test_the_clean_store_scores(clean, store):
    np.testing.assert_array_equal(_load(store).score(digits(3, offset=40)), clean[1])


def test_a_kernel_of_another_shape(store):
    path = store / "checkpoint-0" / "kernel.safetensors"
    tensors = load_file(str(path))
    tensors["kernel"] = tensors["kernel"][:-1, :-1].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(
        CorruptStoreError, match=r"kernel.safetensors holds kernel of shape \(31, 31\), not \(32, 32\)"
    ):
        _load(store)


def test_a_shard_of_another_width(store):
    path = store / "checkpoint-0" / "preconditioned-000000008-000000016.arrow"
    columns = {"index": pa.array(np.arange(8, 16)), "phi": fixed_size_list(np.zeros((8, 33), np.float16)),
               "out_to_loss": pa.array(np.ones(8, np.float32))}  # fmt: skip
    write_arrow(str(path), columns, {b"hf_trak.rows": b"8"})
    with pytest.raises(CorruptStoreError, match="preconditioned-000000008-000000016.arrow holds 33 features per row"):
        _load(store)


def test_shards_that_do_not_add_up_to_the_train_split(store):
    _edit_config(store, num_train_examples=28)  # one more shard of rows than the hashes and files hold
    with pytest.raises(CorruptStoreError, match="3 shard hashes for 4 shards of rows"):
        _load(store)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(projector_seed=-1), "projector_seed -1 is out of range"),
        (dict(projector_seed=2**70), "projector_seed 1180591620717411303424 is out of range"),
        (dict(kernel="per_module", kernel_blocks=[[0, 16], [20, 16]]), "do not tile 0..32"),
        (dict(kernel="per_module", kernel_blocks=[[0, 16], [16, 8]]), "cover 24 of the 32 features"),
        (dict(num_checkpoints=3), "1 checkpoint fingerprints for 3 checkpoints"),
    ],
)  # fmt: skip
def test_sizes_that_disagree_are_refused(store, changes, message):
    _edit_config(store, **changes)
    with pytest.raises(CorruptStoreError, match=message):
        _load(store)


def test_an_absurd_feature_dim_is_refused_before_any_allocation(store):
    _edit_config(store, feature_dim=10**9, proj_dim=10**9)  # a k × k kernel of 8 EB
    start = time.monotonic()
    with pytest.raises(CorruptStoreError, match="feature_dim 1000000000 is not in 1..1048576"):
        _load(store)
    assert time.monotonic() - start < 30


def test_a_copy_without_some_files_says_it_is_incomplete(store):
    os.remove(store / "checkpoint-0" / "features-000000016-000000020.arrow")
    with pytest.raises(IncompleteStoreError, match=r"1 file\(s\) missing: checkpoint-0/features-000000016-000000020"
                                                   r".*if you downloaded it.*download it again"):  # fmt: skip
        _load(store)


def test_a_card_with_a_yaml_bomb_is_never_parsed(clean, store):
    laughs = ["a: &a [" + ",".join(["lol"] * 9) + "]"]
    laughs += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    (store / "README.md").write_text("---\n" + "\n".join(laughs) + "\n---\n# card\n")
    start = time.monotonic()
    np.testing.assert_array_equal(_load(store).score(digits(3, offset=40)), clean[1])
    assert time.monotonic() - start < 60
    assert torch.isfinite(torch.from_numpy(clean[1])).all()
