"""The batch size left to hf_trak (``batch_size=None``) follows the free memory and the sequence length."""

import logging

import numpy as np
import pytest
import torch

from hf_trak import InvalidArgumentError, TRAKer
from hf_trak.run import memory
from hf_trak.testing.datasets import lm_sequences
from hf_trak.testing.models import tiny_gpt2


def test_the_estimate_grows_with_length_width_and_vocabulary():
    from transformers import GPT2Config, GPT2LMHeadModel

    small = tiny_gpt2(0)
    assert memory.example_bytes(small, 64) > 2 * memory.example_bytes(small, 32)  # the attention term: faster
    assert memory.example_bytes(small, 32, output_size=50000) > memory.example_bytes(small, 32, output_size=10)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=16))
    per_token = memory.example_bytes(gpt2, 1, output_size=50257)
    # 12 layers × (20·768 + 3·12) floats + 3·50257 logits floats: between 0.8 and 1.6 MB per token
    assert 0.8e6 < per_token < 1.6e6


def test_batch_size_none_fits_the_free_memory_and_gives_the_same_features(monkeypatch, caplog):
    model, train = tiny_gpt2(0), lm_sequences(12)
    explicit = TRAKer(model, proj_dim=32, dtype="float32").featurize(train, [model.state_dict()], batch_size=5)
    chosen = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2.5 * chosen[-1] / memory.MEMORY_SHARE)
    original = memory.example_bytes
    monkeypatch.setattr(memory, "example_bytes", lambda *args: chosen.append(original(*args)) or chosen[-1])
    traker = TRAKer(model, proj_dim=32, dtype="float32")
    with caplog.at_level(logging.INFO, logger="hf_trak.run.memory"):
        traker.featurize(train, [model.state_dict()])
    longest = max(len(ids) for ids in train["input_ids"])
    assert "batch_size=2: " in caplog.text and f"of {longest} tokens" in caplog.text
    np.testing.assert_allclose(traker.store.features(0), explicit.store.features(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(traker.score(train), explicit.score(train), rtol=1e-4, atol=1e-6)


def test_the_bounds_and_an_explicit_batch_size(monkeypatch):
    model, device = tiny_gpt2(0), torch.device("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**50)
    assert memory.auto_batch_size(model, 8, device) == memory.MAX_BATCH
    assert memory.auto_batch_size(model, 512, device) == memory.MAX_CPU_TOKENS // 512  # a CPU: tokens per batch
    assert memory.auto_batch_size(model, 512, torch.device("cuda")) == memory.MAX_BATCH  # a GPU: memory alone
    assert memory.auto_batch_size(model, 10**6, device) == 1
    monkeypatch.setattr(memory, "available_bytes", lambda device: 0)
    assert memory.auto_batch_size(model, 8, device) == 1

    def refuse(*args):
        raise AssertionError("an explicit batch size is used as given")

    monkeypatch.setattr(memory, "batch_size_for", refuse)
    monkeypatch.setattr("hf_trak.run.featurize.batch_size_for", refuse)
    monkeypatch.setattr("hf_trak.traker.batch_size_for", refuse)
    traker = TRAKer(model, proj_dim=16, batch_size=4).featurize(lm_sequences(6), [model.state_dict()])
    assert traker.score(lm_sequences(2, seed=1)).shape == (6, 2)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        TRAKer(model, batch_size=0)
