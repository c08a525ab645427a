"""The 4D attention mask that stands for a model's 2D one (``hf_trak.method.masks``)."""

import pytest
import torch

from hf_trak.data.source import ExampleSource
from hf_trak.method.masks import BIDIRECTIONAL, CAUSAL, AttentionMaskAdapter, to_4d_attention_mask
from hf_trak.method.model_outputs import AutoModelOutput
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "make_model, data, kind",
    [
        (tiny_gpt2, lm_sequences, CAUSAL),
        (tiny_llama, lm_sequences, CAUSAL),
        (tiny_bert, token_sequences, BIDIRECTIONAL),
    ],
)
def test_the_kind_is_found_from_two_examples_and_holds_for_the_whole_batch(make_model, data, kind):
    model = make_model()
    split = data(12)
    batch = ExampleSource.for_model(split, model, AutoModelOutput.resolve(model)).batch(slice(0, 12))
    assert (batch["attention_mask"] == 0).any()  # ragged: padded positions are compared too
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    calls = []

    def forward(b):
        calls.append(len(b["input_ids"]))
        return model(**b)

    adapter = AttentionMaskAdapter(torch.float32)
    prepared = adapter(batch, forward)
    assert adapter.kind == kind and calls == [2, 2, 2][: len(calls)] and len(calls) >= 2
    other = to_4d_attention_mask(batch["attention_mask"], BIDIRECTIONAL if kind == CAUSAL else CAUSAL, torch.float32)
    with torch.no_grad():  # the chosen mask gives the 2D mask's outputs on every example, not only the two

        def hidden(mask):
            return model(**dict(inputs, attention_mask=mask), output_hidden_states=True).hidden_states[-1]

        expected, found, wrong = hidden(batch["attention_mask"]), hidden(prepared["attention_mask"]), hidden(other)
    attended = batch["attention_mask"].bool()  # padded positions' states are whatever the mask makes them
    torch.testing.assert_close(found[attended], expected[attended], rtol=1e-4, atol=1e-5)
    assert (wrong[attended] - expected[attended]).abs().max() > 1e-3  # far above float error (1e-6)
