"""``projector="auto"`` (the default): dense for small p·k, factored beyond it when the factorable layers hold
the parameters; the choice and its reason are recorded in the store."""

import numpy as np
import pytest
import torch
from torch import nn

from hf_trak import TRAKArguments, TRAKer
from hf_trak.method import estimator
from hf_trak.method.estimator import choose_projector
from hf_trak.testing.datasets import digits, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_vit


def test_auto_is_the_default_everywhere():
    assert TRAKArguments().projector == "auto"
    from hf_trak.cli import build_parser

    args = build_parser().parse_args(["featurize", "--model", "m", "--dataset", "d", "--save-dir", "s"])
    assert args.projector == "auto"


def test_small_models_get_the_dense_projector_and_the_store_says_why():
    model = tiny_vit()
    traker = TRAKer(model, proj_dim=64).featurize(digits(6), [model.state_dict()])
    assert traker.config.projector == "rademacher"
    assert (
        "≤ 2^28 elements" in traker.config.projector_reason
        and f"{traker.num_params:,}·64" in traker.config.projector_reason
    )
    explicit = TRAKer(model, proj_dim=64, projector="rademacher", dtype=torch.float32)
    auto = TRAKer(model, proj_dim=64, dtype=torch.float32)
    data = digits(6)
    np.testing.assert_array_equal(
        auto.featurize(data, [model.state_dict()]).store.features(0),
        explicit.featurize(data, [model.state_dict()]).store.features(0),
    )


def test_large_p_k_gets_the_factored_projector(monkeypatch, tmp_path):
    monkeypatch.setattr(estimator, "AUTO_DENSE_MAX_ELEMENTS", 1000)  # as if the model were large
    model, data = tiny_bert(), token_sequences(8)
    auto = TRAKer(model, proj_dim=64, save_dir=str(tmp_path / "s"), dtype=torch.float32).featurize(
        data, [model.state_dict()]
    )
    assert (
        auto.config.projector == "factored" and "Linear/Conv1D/Embedding layers hold" in auto.config.projector_reason
    )
    explicit = TRAKer(model, proj_dim=64, projector="factored", dtype=torch.float32).featurize(
        data, [model.state_dict()]
    )
    np.testing.assert_array_equal(auto.store.features(0), explicit.store.features(0))
    assert auto.param_names == explicit.param_names
    loaded = TRAKer.from_pretrained(str(tmp_path / "s"), model, train_dataset=data)  # the store says "factored"
    np.testing.assert_array_equal(loaded.score(token_sequences(2, seed=1)), auto.score(token_sequences(2, seed=1)))


class MostlyConvolution(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 64, 3)
        self.head = nn.Linear(64, 10)

    def forward(self, pixel_values):
        return self.head(self.conv(pixel_values).mean((2, 3)))


def test_large_p_k_without_factorable_layers_stays_dense_and_says_so(monkeypatch):
    monkeypatch.setattr(estimator, "AUTO_DENSE_MAX_ELEMENTS", 1000)
    kind, reason = choose_projector(MostlyConvolution(), TRAKArguments(proj_dim=64))
    assert kind == "rademacher" and "hold only" in reason and "grad_wrt" in reason


@pytest.mark.parametrize("projector", ["rademacher", "normal", "identity", "factored"])
def test_explicit_choices_are_kept(projector):
    kind, reason = choose_projector(tiny_bert(), TRAKArguments(projector=projector, proj_dim=32))
    assert kind == projector and "asked for" in reason
