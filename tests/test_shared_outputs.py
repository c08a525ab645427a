"""One forward pass per featurized batch: Q reuses the outputs of the features' forward (``shared_outputs``)."""

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.method.model_outputs import call_model
from hf_trak.method.shared_outputs import keeping_outputs, shared_outputs
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2


def counted(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_a_kept_output_is_reused_for_the_same_tensors_only():
    model = tiny_gpt2()
    weights = dict(model.named_parameters())
    inputs = {"input_ids": torch.tensor([[3, 4, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    calls = counted(model)
    with shared_outputs():
        with keeping_outputs():
            kept = call_model(model, weights, {}, inputs)
        again = call_model(model, weights, {}, dict(inputs))  # another dict, the same tensors
        other = call_model(model, weights, {}, {name: value.clone() for name, value in inputs.items()})
    assert len(calls) == 2 and again.logits is not kept.logits and not again.logits.requires_grad
    torch.testing.assert_close(again.logits, kept.logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(other.logits, kept.logits.detach())
    call_model(model, weights, {}, inputs)  # outside the scope: nothing is reused
    assert len(calls) == 3


@pytest.mark.parametrize("make_model, data", [(tiny_gpt2, lm_sequences), (tiny_bert, token_sequences)])
def test_the_stored_q_is_the_one_a_fresh_forward_gives(make_model, data):
    model, split = make_model(), data(12)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1, scale=0.2)]
    traker = TRAKer(model, proj_dim=32, dtype="float32").featurize(split, checkpoints, batch_size=5)
    source = ExampleSource.for_model(split, model, traker.task)
    for model_id, checkpoint in enumerate(checkpoints):
        view = traker.feature_map.at(checkpoint, model_id)
        fresh = torch.cat([view.out_to_loss(view.prepare(batch)) for batch in source.batches(5)]).numpy()
        stored = np.concatenate([q for _, _, q in traker.store.shards(model_id)])
        np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-7)
