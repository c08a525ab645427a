"""A bf16 model featurizes and scores with float32 features and float64 kernels: its scores are the float32
model's up to bf16's rounding of the forward and backward passes."""

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_gpt2


@pytest.mark.parametrize("projector", ["factored", "rademacher"])
@pytest.mark.parametrize("head", ["causal_lm", "text_classification"])
def test_a_bf16_model_scores_as_the_float32_one_to_bf16_precision(head, projector):
    make_model, data = (tiny_gpt2, lm_sequences) if head == "causal_lm" else (tiny_bert, token_sequences)
    settings = dict(proj_dim=64, projector=projector, dtype="float32")
    model = make_model(0)
    expected = TRAKer(model, **settings).featurize(data(16), [model.state_dict()]).score(data(4, seed=3))
    half = make_model(0).to(torch.bfloat16)
    traker = TRAKer(half, **settings).featurize(data(16), [half.state_dict()])
    found = traker.score(data(4, seed=3))
    assert found.dtype == np.float32 and traker.store.features(0).dtype == np.float32
    assert traker.store.load_kernel(0)["kernel"].dtype == torch.float64
    # bf16 keeps 8 bits of mantissa (relative rounding 4e-3): the scores agree to about 1e-2 of their largest
    assert np.abs(found - expected).max() < 5e-2 * np.abs(expected).max()
    assert np.corrcoef(found.ravel(), expected.ravel())[0, 1] > 0.999
