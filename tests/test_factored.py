import logging

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.errors import OutputExistsError
from hf_trak.method.factored import FactoredGradientProjector, factorable_parameter_names
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.gradients import PerExampleGradients, select_parameters
from hf_trak.method.model_outputs import AutoModelOutput
from hf_trak.testing.datasets import clip_pairs, digits, lm_sequences, token_sequences
from hf_trak.testing.lds import digits_lds
from hf_trak.testing.models import tiny_bert, tiny_clip, tiny_gpt2, tiny_llama, tiny_vit

CASES = {
    "vit": (tiny_vit, lambda: digits(7)),
    "bert": (tiny_bert, lambda: token_sequences(7)),
    "gpt2": (tiny_gpt2, lambda: lm_sequences(7)),
    "llama": (tiny_llama, lambda: lm_sequences(7)),
    "clip": (tiny_clip, lambda: clip_pairs(7)),
}


def _prepared(make_model, make_data):
    """(model, task at its weights, weights, buffers, one prepared batch of all the data), via a checkpoint view."""
    model, data = make_model(), make_data()
    task = AutoModelOutput.from_model(model)
    source = ExampleSource.for_model(data, model, task)
    view = FeatureMap(model, task, None, "cpu").at(model, 0, source.sample)
    return model, view.task, view.weights, view.buffers, view.prepare(next(source.batches(len(data))))


@pytest.mark.parametrize("case", list(CASES))
def test_identity_factors_give_the_exact_per_example_gradients(case):
    model, task, weights, buffers, batch = _prepared(*CASES[case])
    names = select_parameters(model, "all")
    factored = FactoredGradientProjector(model, names, proj_dim=1, seed=0, device="cpu", kind="identity")
    assert factored.targets and factored.fallback_gradients is not None  # both paths are exercised
    got = factored(task, weights, buffers, batch, model_id=0)
    grads = {}
    for chunk in PerExampleGradients(model, names)(task, weights, buffers, batch):
        grads.update(chunk)
    order = [target.name for target in factored.targets] + factored.fallback_gradients.chunks[0]
    assert sorted(order) == sorted(names)
    expected = torch.cat([grads[name] for name in order], dim=1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_tied_embeddings_and_conv1d_are_factored():
    model = tiny_gpt2()
    names = factorable_parameter_names(model)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied: one parameter
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.0.ln_1.weight" not in names


@pytest.mark.slow
@pytest.mark.parametrize("sizing", ["fill", "square"])
def test_random_factors_preserve_inner_products_in_expectation(sizing):
    model, task, weights, buffers, batch = _prepared(tiny_bert, lambda: token_sequences(3))
    names = factorable_parameter_names(model)
    grads = {}
    for chunk in PerExampleGradients(model, names)(task, weights, buffers, batch):
        grads.update(chunk)
    flat = torch.cat([grads[name] for name in names], dim=1).double()
    exact = flat @ flat.T
    estimates = []
    for seed in range(1000):
        factored = FactoredGradientProjector(model, names, proj_dim=256, seed=seed, device="cpu", sizing=sizing)
        features = factored(task, weights, buffers, batch, model_id=0).double()
        estimates.append(features @ features.T / factored.proj_dim)
    mean = torch.stack(estimates).mean(0)
    scale = exact.diagonal().sqrt()
    # One draw's relative std is ~0.9 here (the 3-element classifier bias gets one dimension), so the
    # mean of 1000 draws is within ~0.03 of exact; a wrong scale or a missing term is off by far more.
    assert ((mean - exact).abs() / (scale[:, None] * scale[None])).max() < 0.1
    single = estimates[0]
    assert ((single - exact).abs() / (scale[:, None] * scale[None])).max() > 0.01  # one draw is not exact


def test_factored_traker_end_to_end_and_dimension_budget():
    model, data = tiny_gpt2(), lm_sequences(12)
    names = factorable_parameter_names(model)
    default = TRAKer(model, projector="factored", proj_dim=300, save_dir=None)
    weights = [name for name in names if not name.endswith(".bias") and ".c_attn." not in name]
    assert default.param_names == weights  # hf_trak: weights, without the attention's query/key/value (c_attn)
    traker = TRAKer(model, projector="factored", proj_dim=300, save_dir=None, grad_wrt=names)
    assert traker.feature_map.projector.proj_dim == 300 and traker.config.feature_dim == 300
    scores = traker.featurize(data, [model.state_dict()], batch_size=5).score(lm_sequences(4, seed=1))
    assert scores.shape == (12, 4) and np.isfinite(scores).all()
    blocks = len(traker.feature_map.projector.targets)
    with pytest.raises(
        ValueError, match=f"proj_dim=3 is too small for {blocks} factored blocks .*proj_dim >= {blocks}"
    ):
        TRAKer(model, projector="factored", proj_dim=3, save_dir=None, grad_wrt=names)
    smallest = TRAKer(model, projector="factored", proj_dim=blocks, save_dir=None, grad_wrt=names)
    assert smallest.feature_map.projector.proj_dim == blocks


def test_a_factored_k_a_few_dimensions_short_is_logged_as_info_and_a_larger_shortfall_warned(caplog):
    """Without bias vectors the fill can end a few dimensions short of proj_dim (no step of k_r or k_c fits
    the rest): routine, so info; k far below proj_dim (every matrix at full size) is a warning."""
    model = tiny_gpt2()
    names = [name for name in factorable_parameter_names(model) if not name.endswith(".bias")]
    total = sum(dict(model.named_parameters())[name].numel() for name in names)
    short = [k for k in range(200, 400) if FactoredGradientProjector(model, names, k, 0, "cpu").proj_dim < k]
    assert short, "no proj_dim in 200..399 ends short: pick another range"
    for k, expected in ((short[0], logging.INFO), (2 * total, logging.WARNING)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_trak.method.factored"):
            made = FactoredGradientProjector(model, names, k, 0, "cpu").proj_dim
        (record,) = [r for r in caplog.records if "features for proj_dim" in r.message]
        assert record.levelno == expected and f"k={made} features for proj_dim={k}" in record.message
        assert (made >= 0.99 * k) == (expected == logging.INFO)


@pytest.mark.parametrize("fallback", [False, True])
def test_factored_gives_the_proj_dim_asked_on_a_small_hidden_big_vocab_bert(fallback):
    """A BERT with hidden 32 and a 30k vocabulary (many small matrices beside one large one) gets every proj_dim
    from its minimum up, exactly: 2048 features for 2048."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)  # fmt: skip
    model = BertForSequenceClassification(config)
    names = factorable_parameter_names(model)
    if fallback:  # LayerNorms go through the dense fallback block
        names = names + [name for name, _ in model.named_parameters() if "LayerNorm" in name]
    minimum = None
    for proj_dim in [40, 64, 100, 256, 300, 777, 1024, 1965, 1972, 2048, 4096, 8192]:
        projector = FactoredGradientProjector(model, names, proj_dim, seed=0, device="cpu")
        assert projector.proj_dim == proj_dim
        sizes = [t.size for t in projector.targets]
        assert min(sizes) >= 1 and sum(sizes) + (projector.fallback_projector.proj_dim if fallback else 0) == proj_dim
        biggest = max(projector.targets, key=lambda t: t.rows * t.cols)
        assert biggest.name.endswith("word_embeddings.weight") and biggest.size == max(sizes)
    with pytest.raises(ValueError, match=r"use proj_dim >= (\d+)") as error:
        FactoredGradientProjector(model, names, 10, seed=0, device="cpu")
    minimum = int(str(error.value).split(">= ")[1].rstrip("."))
    assert minimum == len(projector.targets) + fallback
    assert FactoredGradientProjector(model, names, minimum, seed=0, device="cpu").proj_dim == minimum


def test_stores_made_before_version_3_keep_their_factored_sizes(tmp_path):
    model, data, targets = tiny_bert(), token_sequences(10), token_sequences(3, seed=1)
    old = TRAKer(model, projector="factored", proj_dim=100, save_dir=str(tmp_path / "v2"), store_version=2)
    assert old.feature_map.projector.proj_dim < 100  # the old sizes: at most proj_dim
    expected = old.featurize(data, [model.state_dict()]).score(targets)
    loaded = TRAKer.from_pretrained(str(tmp_path / "v2"), model, train_dataset=data)
    assert loaded.feature_map.projector.proj_dim == old.feature_map.projector.proj_dim
    np.testing.assert_array_equal(loaded.score(targets), expected)


def test_per_token_kernels_factor_each_matrix_with_equal_sides_from_store_version_4(tmp_path):
    """kernel_from="tokens" (the causal-LM default): k_r ≈ k_c ≈ √b_l where the matrix allows it; kernels from the
    examples keep k_r:k_c ≈ r:c; a version-3 store keeps r:c for its token kernels, and reloads and scores as made."""
    from hf_trak.store.versions import STORE_VERSION

    model, data, targets = tiny_gpt2(), lm_sequences(10), lm_sequences(3, seed=1)
    tokens = TRAKer(model, proj_dim=512)
    assert (tokens.config.kernel_from, tokens.config.store_version) == ("tokens", STORE_VERSION) and STORE_VERSION >= 4
    examples = TRAKer(model, proj_dim=512, kernel_from="examples")
    for square, proportional in zip(tokens.feature_map.projector.targets, examples.feature_map.projector.targets):
        assert square.name == proportional.name
        if square.rows != square.cols and min(square.k_rows, square.k_cols) < min(square.rows, square.cols):
            assert abs(square.k_rows - square.k_cols) <= 1, square
            assert (proportional.k_rows < proportional.k_cols) == (proportional.rows < proportional.cols), proportional
    assert 0.99 * 512 <= sum(t.size for t in tokens.feature_map.projector.targets) <= 512
    old = TRAKer(model, proj_dim=512, save_dir=str(tmp_path / "v3"), store_version=3, dtype=torch.float32)
    assert [(t.k_rows, t.k_cols) for t in old.feature_map.projector.targets] == [
        (t.k_rows, t.k_cols) for t in examples.feature_map.projector.targets
    ]
    expected = old.featurize(data, [model.state_dict()]).score(targets)
    loaded = TRAKer.from_pretrained(str(tmp_path / "v3"), model, train_dataset=data)
    assert loaded.config.kernel_from == "tokens" and loaded.config.store_version == 3
    assert [(t.k_rows, t.k_cols) for t in loaded.feature_map.projector.targets] == [
        (t.k_rows, t.k_cols) for t in old.feature_map.projector.targets
    ]
    np.testing.assert_array_equal(loaded.score(targets), expected)
    with pytest.raises(OutputExistsError, match=f"store_version: stored 3, given {STORE_VERSION}"):  # no resume
        TRAKer(model, proj_dim=512, save_dir=str(tmp_path / "v3"), dtype=torch.float32).featurize(
            data, [model.state_dict()]
        )


def test_factored_features_do_not_depend_on_batch_size():
    model, data = tiny_bert(), token_sequences(9)
    one = TRAKer(model, projector="factored", proj_dim=128, save_dir=None, dtype=torch.float32)
    many = TRAKer(model, projector="factored", proj_dim=128, save_dir=None, dtype=torch.float32)
    a = one.featurize(data, [model.state_dict()], batch_size=1).store.features(0)
    b = many.featurize(data, [model.state_dict()], batch_size=9).store.features(0)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


@pytest.mark.slow
@pytest.mark.parametrize("proj_dim", [256, 1024])
def test_factored_lds_on_digits_is_within_noise_of_dense(proj_dim):
    """Seed-to-seed std of LDS here is 0.002-0.007 (benchmarks/factored.py); 0.03 is several of them."""
    setup = digits_lds()
    factored = setup.lds_of(proj_dim=proj_dim, projector="factored")
    dense = setup.lds_of(proj_dim=proj_dim)
    assert factored > 0.6
    assert abs(factored - dense) < 0.03


GPT2_SMALL_SCRIPT = """
import resource, numpy as np, torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from hf_trak import TRAKer
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config()).eval()
ids = torch.randint(0, 50257, (8, 64)).tolist()
data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 64] * 8, "labels": ids})
traker = TRAKer(model, projector="factored", proj_dim=2048, save_dir=None)
traker.featurize(data, [model.state_dict()], batch_size=8)
assert traker.store.features(0).shape == (8, traker.feature_map.projector.proj_dim)
assert np.isfinite(traker.store.features(0)).all()
print("peak GiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


@pytest.mark.slow
def test_gpt2_small_featurizes_in_factored_mode_within_memory():
    """124M parameters, batch 8: well inside the 24 GiB of the target machine."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", GPT2_SMALL_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = float(result.stdout.split("peak GiB")[-1])
    assert peak < 12, f"peak memory {peak:.1f} GiB"


def test_an_embedding_s_per_token_gram_grouped_by_id_is_the_sum_over_its_tokens(monkeypatch):
    """``token_gram`` groups an embedding's tokens by id (Σ_id (a aᵀ) ⊗ C_id, C_id = Σ v_t v_tᵀ over the id's tokens,
    formed a few tokens at a time): it equals Σ_t (u_t ⊗ v_t)(u_t ⊗ v_t)ᵀ summed here in float64, the padding id's
    tokens and a token with a NaN left out; with as many ids as tokens it takes the rows' product, the same sum."""
    from hf_trak.method import token_vectors

    generator = torch.Generator().manual_seed(0)
    embedding, factor = torch.nn.Embedding(60, 8, padding_idx=0), torch.randn(60, 3, generator=generator)
    v = torch.randn(4, 12, 5, generator=generator)
    v[1, 3, 2] = float("nan")

    def expected(ids):
        u = factor[ids] * (ids != 0).unsqueeze(-1)
        rows = torch.einsum("btr,btc->btrc", u, v).reshape(-1, 15).double()
        rows = rows[torch.isfinite(rows).all(dim=1)]
        return (rows.T @ rows).numpy(), u

    few = torch.randint(0, 6, (4, 12), generator=generator)  # 6 ids (the padding id among them) over 48 tokens
    reference, u = expected(few)
    monkeypatch.setattr(token_vectors, "GROUPED_CHUNK", 50)  # two tokens' v_t v_tᵀ at a time
    with monkeypatch.context() as patched:  # grouped: the rows' product is not formed
        patched.setattr(token_vectors, "finite_gram", lambda rows: pytest.fail("not grouped by id"))
        grouped = token_vectors.token_gram(embedding, few, u, v)
    np.testing.assert_allclose(grouped.double().numpy(), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    many = torch.arange(48).reshape(4, 12) + 1  # every token its own id: not grouped
    reference, u = expected(many)
    ungrouped = token_vectors.token_gram(embedding, many, u, v)
    np.testing.assert_allclose(ungrouped.double().numpy(), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
