import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file, save_file

from hf_trak import TRAKer
from hf_trak.errors import CorruptStoreError, InvalidArgumentError
from hf_trak.store.card import render_trainer_section
from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.integrity import check_store
from hf_trak.store.versions import STORE_VERSION
from hf_trak.testing.datasets import digits
from hf_trak.testing.models import perturbed_state_dict, tiny_vit
from hf_trak.testing.processes import subprocess_env


def _featurized(tmp_path, **kwargs):
    model = tiny_vit()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=32, save_dir=str(tmp_path / "store"), shard_size=8, **kwargs)
    return traker.featurize(digits(20), checkpoints, batch_size=4), model, checkpoints


def test_layout_is_arrow_safetensors_and_json_only(tmp_path):
    traker, _, _ = _featurized(tmp_path)
    files = sorted(
        os.path.relpath(os.path.join(d, f), traker.save_dir) for d, _, fs in os.walk(traker.save_dir) for f in fs
    )
    assert files == [
        ".trak.lock",  # the featurization's lock, which records its last owner (not pushed)
        "README.md",
        "checkpoint-0/features-000000000-000000008.arrow",
        "checkpoint-0/features-000000008-000000016.arrow",
        "checkpoint-0/features-000000016-000000020.arrow",
        "checkpoint-0/kernel.safetensors",
        "checkpoint-0/preconditioned-000000000-000000008.arrow",
        "checkpoint-0/preconditioned-000000008-000000016.arrow",
        "checkpoint-0/preconditioned-000000016-000000020.arrow",
        "checkpoint-1/features-000000000-000000008.arrow",
        "checkpoint-1/features-000000008-000000016.arrow",
        "checkpoint-1/features-000000016-000000020.arrow",
        "checkpoint-1/kernel.safetensors",
        "checkpoint-1/preconditioned-000000000-000000008.arrow",
        "checkpoint-1/preconditioned-000000008-000000016.arrow",
        "checkpoint-1/preconditioned-000000016-000000020.arrow",
        "train_rows.arrow",
        "trak_config.json",
    ]
    config = FeatureStore.load(traker.save_dir).config
    assert (config.num_train_examples, config.num_checkpoints, config.feature_dim) == (20, 2, 32)
    assert config.train_fingerprint == digits(20)._fingerprint and len(config.checkpoint_fingerprints) == 2


def test_load_dataset_reads_each_checkpoint_as_a_config(tmp_path):
    traker, _, _ = _featurized(tmp_path)
    for m in range(2):
        rows = load_dataset(
            traker.save_dir, f"checkpoint-{m}", split="train", cache_dir=str(tmp_path / "cache")
        ).with_format("numpy")
        assert rows.features["features"].feature.dtype == "float16"
        np.testing.assert_array_equal(rows["index"], np.arange(20))
        np.testing.assert_array_equal(np.stack(rows["features"]), traker.store.features(m))
        np.testing.assert_array_equal(rows["out_to_loss"], traker.store.out_to_loss(m))


def test_shards_are_read_zero_copy(tmp_path):
    traker, _, _ = _featurized(tmp_path)
    _, features, _ = next(traker.store.shards(0))
    assert not features.flags.owndata and not features.flags.writeable  # a view of the memory map


def test_saved_scores_round_trip_and_appear_in_the_card(tmp_path):
    traker, _, _ = _featurized(tmp_path)
    scores = traker.score(digits(3, offset=50))
    traker.save_scores(scores, "test-digits")
    np.testing.assert_array_equal(traker.store.load_scores("test-digits"), scores)
    rows = load_dataset(
        traker.save_dir, "scores-test-digits", split="train", cache_dir=str(tmp_path / "cache")
    ).with_format("numpy")
    np.testing.assert_array_equal(np.stack(rows["scores"]).T, scores)
    card = open(os.path.join(traker.save_dir, "README.md")).read()
    assert "config_name: scores-test-digits" in card and "config_name: checkpoint-1" in card
    assert "Park, Sung Min" in card  # TRAK citation


def test_other_settings_are_refused_and_nothing_is_overwritten(tmp_path):
    traker, model, checkpoints = _featurized(tmp_path)
    before = {
        name: open(os.path.join(traker.save_dir, "checkpoint-0", name), "rb").read()
        for name in os.listdir(os.path.join(traker.save_dir, "checkpoint-0"))
    }
    with pytest.raises(FileExistsError, match="projector_seed"):
        TRAKer(model, proj_dim=32, projector_seed=1, save_dir=traker.save_dir, shard_size=8).featurize(
            digits(20), checkpoints, batch_size=4
        )
    with pytest.raises(FileExistsError, match="another train split: 20 rows given, 20 stored, first differing row 0"):
        TRAKer(model, proj_dim=32, save_dir=traker.save_dir, shard_size=8).featurize(digits(20, offset=1), checkpoints)
    after = {name: open(os.path.join(traker.save_dir, "checkpoint-0", name), "rb").read() for name in before}
    assert after == before
    replaced = TRAKer(model, proj_dim=32, projector_seed=1, save_dir=traker.save_dir, shard_size=8).featurize(
        digits(20), checkpoints, batch_size=4, overwrite=True
    )
    assert replaced.store.config.projector_seed == 1


def test_incomplete_store_is_refused_by_from_pretrained(tmp_path):
    traker, model, checkpoints = _featurized(tmp_path)
    os.remove(os.path.join(traker.save_dir, "checkpoint-1", "kernel.safetensors"))
    with pytest.raises(ValueError, match="incomplete.*resume"):
        TRAKer.from_pretrained(traker.save_dir, model, checkpoints)


def test_trainer_section_links_the_features_repo():
    section = render_trainer_section("user/model-trak", num_checkpoints=3)
    assert "datasets/user/model-trak" in section and "3 checkpoint(s)" in section


FEATURIZE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import digits
    from hf_trak.testing.models import perturbed_state_dict, tiny_vit
    model = tiny_vit()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    TRAKer(model, proj_dim=32, save_dir=sys.argv[1], shard_size=10).featurize(digits(600), checkpoints, batch_size=5)
""")


@pytest.mark.slow
def test_featurize_killed_with_sigkill_resumes_to_identical_features(tmp_path):
    root = str(tmp_path / "killed")
    env = subprocess_env()
    process = subprocess.Popen([sys.executable, "-c", FEATURIZE_SCRIPT, root], env=env)
    shard_dir = os.path.join(root, "checkpoint-0")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(shard_dir) and len([f for f in os.listdir(shard_dir) if f.endswith(".arrow")]) >= 5:
            break
        time.sleep(0.01)
    assert process.poll() is None, "featurize finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = FeatureStore.load(root)
    assert not interrupted.is_complete()
    written = len([f for f in os.listdir(shard_dir) if f.endswith(".arrow")])
    assert 5 <= written < 60

    subprocess.run([sys.executable, "-c", FEATURIZE_SCRIPT, root], env=env, check=True)  # resume
    reference = str(tmp_path / "uninterrupted")
    subprocess.run([sys.executable, "-c", FEATURIZE_SCRIPT, reference], env=env, check=True)
    resumed, complete = FeatureStore.load(root), FeatureStore.load(reference)
    assert resumed.is_complete()
    for m in range(2):
        indices = load_dataset(root, f"checkpoint-{m}", split="train", cache_dir=str(tmp_path / "cache"))["index"]
        np.testing.assert_array_equal(np.asarray(indices), np.arange(600))  # no row lost, none duplicated
        np.testing.assert_array_equal(resumed.features(m), complete.features(m))
        np.testing.assert_array_equal(resumed.out_to_loss(m), complete.out_to_loss(m))
        torch.testing.assert_close(resumed.load_kernel(m)["kernel"], complete.load_kernel(m)["kernel"], rtol=0, atol=0)
    leftovers = [f for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]
    assert all(not f.endswith(".arrow") for f in leftovers)


def test_a_version_1_store_loads_and_scores_as_before(tmp_path):
    """Stores written by hf_trak 0.1.0 lack the version-2 fields and hold float32 kernels."""
    import json

    from safetensors.torch import load_file, save_file

    model, train, targets = tiny_vit(), digits(12), digits(4, offset=50)
    root = str(tmp_path / "store")
    current = TRAKer(model, proj_dim=16, save_dir=root, dtype=torch.float32).featurize(train, [model.state_dict()])
    expected = current.score(targets)
    config = json.load(open(os.path.join(root, "trak_config.json")))
    assert config["store_version"] == STORE_VERSION
    for field in ("store_version", "lambda_scale", "adapter_config", "base_model", "base_fingerprint", "train_hashes",
                  "excluded_rows", "projector_reason"):  # fmt: skip
        del config[field]
    os.remove(os.path.join(root, "train_rows.arrow"))
    for name in os.listdir(os.path.join(root, "checkpoint-0")):
        if name.startswith("preconditioned-"):  # version 1 and 2 stores hold no Φ: scoring forms it
            os.remove(os.path.join(root, "checkpoint-0", name))
    with open(os.path.join(root, "trak_config.json"), "w") as file:
        json.dump(config, file)
    kernel_path = os.path.join(root, "checkpoint-0", "kernel.safetensors")
    tensors = load_file(kernel_path)
    save_file({name: t.float() if name != "lambda_reg" else t for name, t in tensors.items()}, kernel_path)

    loaded = TRAKer.from_pretrained(root, model)
    assert loaded.config.store_version == 1 and loaded.config.lambda_scale == 0.1
    np.testing.assert_allclose(loaded.score(targets), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_resume_with_another_checkpoint_is_refused_or_redoes_only_that_checkpoint(tmp_path):
    traker, model, checkpoints = _featurized(tmp_path)
    root = traker.save_dir

    def files(model_id):
        folder = os.path.join(root, f"checkpoint-{model_id}")
        return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}

    before = [files(0), files(1)]
    other = [checkpoints[0], perturbed_state_dict(model, seed=7)]
    with pytest.raises(FileExistsError, match="another checkpoint 1 than state_dict .*overwrite=True"):
        TRAKer(model, proj_dim=32, save_dir=root, shard_size=8).featurize(digits(20), other, batch_size=4)
    assert [files(0), files(1)] == before  # nothing was written
    redone = TRAKer(model, proj_dim=32, save_dir=root, shard_size=8).featurize(
        digits(20), other, batch_size=4, overwrite=True
    )
    assert files(0) == before[0] and files(1) != before[1]  # checkpoint 0 kept, checkpoint 1 redone
    fresh = TRAKer(model, proj_dim=32, save_dir=str(tmp_path / "fresh"), shard_size=8).featurize(
        digits(20), other, batch_size=4
    )
    for m in range(2):
        np.testing.assert_array_equal(redone.store.features(m), fresh.store.features(m))
    assert redone.store.config.checkpoint_fingerprints == fresh.store.config.checkpoint_fingerprints


def test_a_block_diagonal_kernel_is_kept_as_its_blocks_and_read_as_the_whole_matrix(tmp_path):
    """A per-module K_m's file (version 7 on) holds K_m's and XᵀX_m's diagonal blocks one after another (Σ_b k_b²
    values each, not k²), read back as the k × k block-diagonal matrices: a version-6 store's K and XᵀX on the
    blocks, 0 off them; or as the list of the blocks (``as_blocks``, what featurize makes and applies them as), with
    the same Φ = XK as the version-6 store's from its whole K. A packed file of another size is named as corrupt."""
    settings = dict(projector="factored", kernel="per_module", kernel_from="examples", dtype=torch.float32)
    new, _, _ = _featurized(tmp_path / "v7", **settings)
    old, _, _ = _featurized(tmp_path / "v6", store_version=6, **settings)
    blocks, k = new.config.kernel_blocks, new.config.feature_dim
    path = os.path.join(new.store.checkpoint_dir(0), "kernel.safetensors")
    packed = load_file(path)
    assert sorted(packed) == ["kernel_blocks", "lambda_reg", "phi_scale", "xtx_blocks"]
    assert packed["kernel_blocks"].shape == packed["xtx_blocks"].shape == (sum(n * n for _, n in blocks),)
    assert len(blocks) > 1 and os.path.getsize(path) < os.path.getsize(path.replace("v7", "v6"))
    on_blocks = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for _, n in blocks])
    whole, read = old.store.load_kernel(0), new.store.load_kernel(0)
    assert (whole["xtx"][~on_blocks] != 0).any()  # version 6 keeps XᵀX whole
    for name in ("xtx", "kernel"):
        assert read[name].shape == (k, k) and (read[name][~on_blocks] == 0).all()
        np.testing.assert_allclose(read[name][on_blocks], whole[name][on_blocks], rtol=1e-9, atol=0)
    pieces = new.store.load_kernel(0, ["xtx", "kernel"], as_blocks=True)
    for name in ("xtx", "kernel"):
        assert [tuple(piece.shape) for piece in pieces[name]] == [(n, n) for _, n in blocks]
        assert torch.equal(torch.block_diag(*pieces[name]), read[name])
    for m in range(2):
        phi_new, phi_old = (t.store.shard(m, 0, 8, kind="preconditioned")[0] for t in (new, old))
        np.testing.assert_allclose(phi_new, phi_old, rtol=1e-5, atol=1e-6)
    check_store(new.store)
    save_file({**packed, "kernel_blocks": packed["kernel_blocks"][1:]}, path)
    with pytest.raises(CorruptStoreError, match="kernel_blocks of shape"):
        check_store(new.store)
    with pytest.raises(CorruptStoreError, match="kernel_blocks of shape"):
        new.store.load_kernel(0)


def test_a_normalized_ensemble_scores_from_the_kernel_blocks_without_forming_k_by_k_matrices(tmp_path, monkeypatch):
    """Where the file keeps XᵀX_m and K_m as their diagonal blocks, the queries of a normalized ensemble read and use
    the blocks (Σ_b k_b² values, not k²: at k = 34,752 the k × k pair takes 18 GiB): σ_j is the same as from the
    block-diagonal matrices, and scoring never assembles one."""
    from hf_trak.method.kernel import target_rms

    traker, _, _ = _featurized(tmp_path, projector="factored")
    store, targets = traker.store, digits(3, offset=20)
    assert store.config.ensemble == "normalized" and store.keeps_kernel_blocks
    expected = traker.score(targets)
    xtx, kernel = store.gram_and_kernel(0)
    assert isinstance(kernel, list) and store.kernel_layout == store.config.kernel_blocks
    dense = store.load_kernel(0, ["xtx", "kernel"])
    np.testing.assert_array_equal(torch.block_diag(*kernel).numpy(), dense["kernel"].double().numpy())
    t = torch.randn(5, store.config.feature_dim, dtype=torch.float64)
    np.testing.assert_allclose(target_rms(xtx, kernel, t, 20, store.kernel_layout).numpy(),
                               target_rms(dense["xtx"], dense["kernel"], t, 20).numpy(), rtol=1e-10)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="pass the store's kernel_layout"):
        target_rms(xtx, kernel, t, 20)  # blocks without their layout would be read as one block

    def assembled(*blocks):
        raise AssertionError("a k × k matrix was assembled from the blocks")

    monkeypatch.setattr(torch, "block_diag", assembled)
    np.testing.assert_allclose(traker.score(targets), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_the_kernel_kept_for_queries_follows_its_file(tmp_path):
    """With ``keep_kernels``, ``gram_and_kernel`` keeps XᵀX_m and K_m in memory for the queries of a normalized
    ensemble, and reads them again once K_m's file is rewritten (by this store object or another process)."""
    traker, _, _ = _featurized(tmp_path)
    store = traker.store
    assert store.gram_and_kernel(0)[1] is not store.gram_and_kernel(0)[1]  # read per call by default
    store.keep_kernels = True  # as the explorer and FeatureIndex set it
    xtx, kernel = store.gram_and_kernel(0)
    again = store.gram_and_kernel(0)
    assert again[0] is xtx and again[1] is kernel  # kept, not read again
    np.testing.assert_array_equal(kernel.numpy(), store.load_kernel(0)["kernel"].double().numpy())
    other = FeatureStore.load(traker.save_dir)  # another process rewrites the file
    saved = other.load_kernel(0)
    other.save_kernel(0, saved["xtx"], 2 * saved["kernel"], float(saved["lambda_reg"]), saved["phi_scale"])
    np.testing.assert_array_equal(store.gram_and_kernel(0)[1].numpy(), 2 * kernel.numpy())
