"""The checkpoint view: each checkpoint loaded once per call, features equal to the stored ones, no task state."""

import collections

import numpy as np
import pytest
import torch

import hf_trak.method.feature_map
from hf_trak import TRAKer
from hf_trak.testing.datasets import clip_pairs, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_clip


@pytest.fixture
def load_counts(monkeypatch):
    """Counts the loads of each checkpoint (by source) through the checkpoint view, the one place that loads."""
    counts = collections.Counter()
    load = hf_trak.method.feature_map.load_checkpoint

    def counting(checkpoint, model, device):
        counts[str(checkpoint)] += 1
        return load(checkpoint, model, device)

    monkeypatch.setattr(hf_trak.method.feature_map, "load_checkpoint", counting)
    return counts


def test_each_call_loads_each_checkpoint_once(tmp_path, load_counts):
    model = tiny_bert()
    folders = []
    for seed in range(3):
        other = tiny_bert()
        other.load_state_dict(perturbed_state_dict(model, seed=seed))
        other.save_pretrained(tmp_path / f"checkpoint-{seed}")
        folders.append(str(tmp_path / f"checkpoint-{seed}"))
    train, targets = token_sequences(10), token_sequences(7, seed=1)

    traker = TRAKer(model, proj_dim=16, save_dir=str(tmp_path / "trak"), shard_size=4)
    traker.featurize(train, folders, batch_size=3)  # 3 shards per checkpoint
    assert load_counts == {folder: 1 for folder in folders}
    load_counts.clear()
    traker.score(targets, batch_size=2, target_block_size=2)  # 4 blocks of targets
    assert load_counts == {folder: 1 for folder in folders}
    load_counts.clear()
    loaded = TRAKer.from_pretrained(str(tmp_path / "trak"), tiny_bert(seed=5))  # the recorded folders
    assert load_counts == {folder: 1 for folder in folders}
    load_counts.clear()
    loaded.top_k(targets, k=2, target_block_size=3)
    assert load_counts == {folder: 1 for folder in folders}


def test_view_features_equal_the_stored_features():
    model, data = tiny_bert(), token_sequences(9)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=24, dtype=torch.float32, save_dir=None).featurize(data, checkpoints, batch_size=4)
    source = traker._source(data, None)
    for model_id, checkpoint in enumerate(checkpoints):
        view = traker.feature_map.at(checkpoint, model_id)
        features, prepared = view.features(next(source.batches(9)))  # one batch of 9, not 4 + 4 + 1
        np.testing.assert_allclose(features.numpy(), traker.store.features(model_id), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(view.out_to_loss(prepared).numpy(), traker.store.out_to_loss(model_id), rtol=1e-6)


def test_model_outputs_keep_no_state_between_checkpoints():
    """CLIP's contrast set belongs to a checkpoint: the task instance given to TRAKer is never changed."""
    model, data = tiny_clip(), clip_pairs(12)
    traker = TRAKer(model, proj_dim=16, save_dir=None)
    task = traker.task
    traker.featurize(data, [model.state_dict(), perturbed_state_dict(model, seed=1)], batch_size=4)
    traker.score(clip_pairs(3, seed=1))
    assert task.contrast_image_embeds is None and task.contrast_text_embeds is None
    views = [traker.feature_map.at(c, m, traker.train_source.sample) for m, c in enumerate(traker.checkpoints)]
    bound = [view.task for view in views]
    assert bound[0] is not task and bound[0] is not bound[1]
    assert not torch.equal(bound[0].contrast_image_embeds, bound[1].contrast_image_embeds)


def test_clip_scoring_from_a_store_needs_the_train_split_and_then_matches(tmp_path):
    model, train, targets = tiny_clip(), clip_pairs(12), clip_pairs(3, seed=1)
    traker = TRAKer(model, proj_dim=16, save_dir=str(tmp_path / "trak")).featurize(train, [model.state_dict()])
    with pytest.raises(RuntimeError, match="needs training examples.*train_dataset="):
        TRAKer.from_pretrained(str(tmp_path / "trak"), model).score(targets)
    loaded = TRAKer.from_pretrained(str(tmp_path / "trak"), model, train_dataset=train)
    np.testing.assert_array_equal(loaded.score(targets), traker.score(targets))
