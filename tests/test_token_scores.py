"""Token-level scores: each side sums to the score, the score is ``TRAKer.score``'s, and a position's part of the
features is the projection of the gradient through that position alone, computed directly."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_trak import TRAKer
from hf_trak.errors import InvalidArgumentError
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, tiny_llama

SETTINGS = {
    "default": {},
    "trak estimator, factored": {"estimator": "trak", "projector": "factored"},
    "mean ensemble, examples kernel": {"ensemble": "mean", "kernel_from": "examples", "principal_share": 0.0},
}


def featurized(make_model, data, **settings):
    model = make_model(0)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1, scale=0.2)]
    traker = TRAKer(model, proj_dim=48, dtype="float32", save_dir=None, **settings)
    return traker.featurize(data, checkpoints, batch_size=8)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("head", ["causal_lm", "causal_lm_llama", "text_classification"])
def test_each_side_sums_to_the_score_and_the_score_is_the_stored_one(setting, head, monkeypatch):
    """Exact splits (float64 sums of float32 parts), and the score ``score`` reads from the float32 Φ; where the store
    keeps K_m as its diagonal blocks, they are used as such (no k × k matrix is assembled)."""
    make_model = {"causal_lm": tiny_gpt2, "causal_lm_llama": tiny_llama, "text_classification": tiny_bert}[head]
    head = "causal_lm" if head.startswith("causal_lm") else head
    data = lm_sequences(20) if head == "causal_lm" else token_sequences(20)
    traker = featurized(make_model, data, **SETTINGS[setting])
    target = (lm_sequences if head == "causal_lm" else token_sequences)(3, seed=5).select([1])
    expected = traker.score(target)[:, 0]
    if traker.store.kernel_layout:

        def assembled(*blocks):
            raise AssertionError("a k × k matrix was assembled from the blocks")

        monkeypatch.setattr(torch, "block_diag", assembled)
    found = traker.score_tokens(target, k=4)
    assert [t.train_index for t in found] == traker.top_k(target, k=4).indices[0].tolist()
    for tokens in found:
        scale = float(np.abs(expected).max())
        assert tokens.train_tokens.sum() + tokens.train_pooled == pytest.approx(tokens.score, abs=1e-9 * scale)
        assert tokens.target_tokens.sum() + tokens.target_pooled == pytest.approx(tokens.score, abs=1e-9 * scale)
        assert tokens.score == pytest.approx(expected[tokens.train_index], abs=2e-5 * scale)
        row = data[tokens.train_index]
        attended = [i for i, keep in zip(row["input_ids"], row["attention_mask"]) if keep]
        assert tokens.train_ids.tolist() == attended and len(tokens.train_tokens) == len(attended)
        assert tokens.target_ids.tolist() == target[0]["input_ids"]
        if head == "causal_lm":
            assert tokens.train_pooled == 0 and tokens.target_pooled == 0  # every LM layer sees positions
        else:
            assert tokens.train_pooled != 0  # BERT's pooler and classifier read the [CLS] vector only


def direct_position_gradients(model, view, example):
    """{weight name: (T, *W.shape)}: ∂f/∂W through each position alone, by autograd: every factorable layer adds a
    zero perturbation Δ_t that acts at position t only (x_t Δ_t for Conv1D, Δ_t x_t for Linear, row id_t of Δ_t
    for Embedding), so that ∂f/∂Δ_t is that position's gradient (summed over the uses of a tied weight); no
    hf_trak projection code is used."""
    length = example["input_ids"].shape[1]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    perturbations, handles = [], []
    for module in model.modules():
        if not isinstance(module, (Conv1D, nn.Linear, nn.Embedding)):
            continue
        name = names.get(id(module.weight))
        if name not in view.map.param_names:
            continue
        delta = torch.zeros(length, *module.weight.shape, requires_grad=True)
        perturbations.append((name, delta))

        def add(module, inputs, output, delta=delta):
            x = inputs[0]
            if isinstance(module, nn.Embedding):
                return output + delta[torch.arange(x.shape[-1]), x.reshape(-1, x.shape[-1])[0]][None]
            if isinstance(module, Conv1D):
                return output + torch.einsum("bti,tio->bto", x, delta)
            return output + torch.einsum("bti,toi->bto", x, delta)

        handles.append(module.register_forward_hook(add))
    try:
        weights = {name: value.detach() for name, value in view.weights.items()}
        total = view.task.get_output(model, weights, view.buffers, example).sum()
        grads = torch.autograd.grad(total, [delta for _, delta in perturbations])
    finally:
        for handle in handles:
            handle.remove()
    summed = {}
    for (name, _), grad in zip(perturbations, grads):
        summed[name] = summed[name] + grad if name in summed else grad
    return summed


def test_a_positions_features_are_its_own_gradient_projected():
    traker = featurized(tiny_gpt2, lm_sequences(12))
    model, projector = traker.model, traker.feature_map.projector
    view = traker.feature_map.at(traker.checkpoints[1], 1)
    example = {name: torch.tensor([value]) for name, value in lm_sequences(12)[4].items()}
    found = view.token_features(example)[0]  # (T + 1) × k
    gradients = direct_position_gradients(model.eval(), view, example)
    expected = torch.zeros_like(found)
    for target in projector.targets:
        rows, cols = projector.factor(1, target, "rows"), projector.factor(1, target, "cols")
        blocks = torch.einsum("ar,tab,bc->trc", rows.double(), gradients[target.name].double(), cols.double())
        expected[:-1, target.offset : target.offset + target.size] = blocks.reshape(len(blocks), -1).float()
    expected *= math.sqrt(projector.proj_dim) / math.sqrt(traker.num_params)
    scale = float(expected.abs().max())
    torch.testing.assert_close(found, expected, atol=1e-5 * scale, rtol=1e-4)
    assert set(gradients) == {target.name for target in projector.targets}
    assert (found[:-1].abs().sum(1) > 0).sum() > 1  # several positions carry a part


def test_token_scores_need_the_factored_projector_and_one_target():
    traker = featurized(tiny_gpt2, lm_sequences(12), estimator="trak", projector="rademacher")
    with pytest.raises(InvalidArgumentError, match="factored projector"):
        traker.score_tokens(lm_sequences(1, seed=3), k=2)
    with pytest.raises(InvalidArgumentError, match="one target"):
        traker.score_tokens(lm_sequences(2, seed=3), k=2)
    factored = featurized(tiny_gpt2, lm_sequences(12))
    with pytest.raises(InvalidArgumentError, match="'output' or 'loss'"):
        factored.score_tokens(lm_sequences(1, seed=3), k=2, on="losses")


def test_attribute_per_token_adds_the_splits_and_the_report_shades_them(tmp_path):
    """``attribute(per_token=True)``: every listed row's token shares sum (with the pooled share) to its score, the
    tokens are the tokenizer's, and the HTML report shades each token of each listed example once."""
    import re

    from hf_trak import attribute
    from hf_trak.testing.models import word_tokenizer

    train, targets = token_sequences(24), token_sequences(3, seed=4)
    raw_train, raw_targets = (split.select_columns(["text", "labels"]) for split in (train, targets))
    result = attribute(tiny_bert(0), raw_train, raw_targets, processor=word_tokenizer(), k=3, per_token=True,
                       projector="factored", proj_dim=64, dtype="float32")  # fmt: skip
    top = result.top_k
    assert len(top) == 3 * 2 * 3
    for row in top:
        total = sum(row["train_token_scores"]) + row["train_pooled"]
        assert total == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert sum(row["target_token_scores"]) + row["target_pooled"] == pytest.approx(total, rel=1e-4, abs=1e-6)
        text = raw_train[row["train_index"]]["text"]
        assert [t for t in row["train_tokens"] if t not in ("[CLS]", "[SEP]")] == text.split()
    page = open(result.save_report(str(tmp_path / "r.html"), num_targets=1)).read()
    section = page.split("<section>")[1]
    expected = len(top[0]["target_tokens"]) + sum(len(row["train_tokens"]) for row in top.select(range(6)))
    assert len(re.findall(r'<span class="token"', section)) == expected
    assert "rgba(34, 139, 34, 0.750)" in section  # the largest positive share of some example, fully shaded
