"""Principal factors (``principal_share``) and per-token kernels shrunk toward K-FAC (``kernel_shrinkage``):
hf_trak's default for causal LMs, checked against eigh, an identity projection, exact gradients and numpy."""

import json
import os

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.errors import InvalidArgumentError, OutputExistsError, StoreMismatchError
from hf_trak.method.estimator import KERNEL_SHRINKAGE, PRINCIPAL_SHARE
from hf_trak.method.factored import FactoredGradientProjector
from hf_trak.method.gradients import PerExampleGradients
from hf_trak.method.principal import leading_eigenpairs, principal_factor
from hf_trak.method.token_vectors import finite_rows, reaching_tokens
from hf_trak.store.config import CONFIG_NAME
from hf_trak.store.feature_store import PRINCIPAL_FACTORS_NAME, FeatureStore
from hf_trak.store.versions import STORE_VERSION
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2

SETTINGS = dict(proj_dim=128, dtype=torch.float32, shard_size=5)


def _view_and_batch(traker, checkpoint, model_id, data):
    view = traker.feature_map.at(checkpoint, model_id)
    source = traker._source(data, None)
    return view, source, view.prepare(source.batch(list(range(len(data)))))


def test_leading_eigenpairs_span_the_leading_eigenspace():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=torch.float64))[0]
    spectrum = 0.7 ** torch.arange(200, dtype=torch.float64)
    matrix = (basis * spectrum) @ basis.T  # eigenvalues 0.7^i
    for count in (1, 12, 195):  # 195: count + 8 ≥ d, eigh
        values, found = leading_eigenpairs(matrix, count, torch.Generator().manual_seed(1))
        exact = basis[:, :count]
        torch.testing.assert_close(found.T @ found, torch.eye(count, dtype=torch.float64))
        torch.testing.assert_close(found @ found.T, exact @ exact.T, atol=1e-8, rtol=0) if count < 20 else None
        torch.testing.assert_close(values, spectrum[:count], atol=1e-12, rtol=1e-8)
    values, found = leading_eigenpairs(matrix, 0, generator)
    assert values.shape == (0,) and found.shape == (200, 0)


def test_principal_factor_reuses_leading_eigenvectors_found_before():
    """Given F's leading eigenvectors (from the block sizes' pass), P's first a columns are those, and P equals
    the factor found by its own eigensolve up to the eigenvectors' signs and the Rademacher draw's order."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 50, generator=generator, dtype=torch.float64))[0]
    moment = (basis * 0.7 ** torch.arange(50, dtype=torch.float64)) @ basis.T
    leading = -basis[:, :6].float()  # other signs than eigh's: the given vectors are taken as they are
    factor = principal_factor(moment, 50, 10, 0.5, torch.Generator().manual_seed(2), leading)
    torch.testing.assert_close(factor[:, :5], leading[:, :5])
    rest = factor[:, 5:].double()
    torch.testing.assert_close(basis[:, :5].T @ rest, torch.zeros(5, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.all((rest.abs() > 0).sum(0) > 0)
    own = principal_factor(moment, 50, 10, 0.5, torch.Generator().manual_seed(2))  # too few given: its own eigensolve
    too_few = principal_factor(moment, 50, 10, 0.5, torch.Generator().manual_seed(2), leading[:, :4])
    torch.testing.assert_close(own, too_few)
    torch.testing.assert_close((own[:, :5].T @ leading[:, :5]).abs(), torch.eye(5), atol=1e-5, rtol=0)


def test_principal_factors_keep_the_leading_directions_and_project_the_rest_without_bias():
    """P = [V_a, (I − V_a V_aᵀ) R]: its first a columns are the moment's leading eigenvectors, the others are
    orthogonal to them, and E[P Pᵀ] = I over the seeds of R (a wrong scale or a missing part is off by far more)."""
    model = tiny_gpt2()
    projector = FactoredGradientProjector(model, ["transformer.wte.weight"], 24, 0, "cpu", principal_share=0.5)
    (target, side), *_ = projector.principal_sides()
    dim, k = target.side(side)
    leading = round(0.5 * k)
    assert 0 < leading < k < dim
    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    moment = (basis * 2.0 ** -torch.arange(dim, dtype=torch.float64)) @ basis.T
    name = f"{target.name}/{side}"
    draws = []
    for seed in range(400):
        projector.seed = seed
        factor = projector.principal_factors(0, {name: moment})[name].double()
        assert factor.shape == (dim, k)
        top, rest = factor[:, :leading], factor[:, leading:]
        torch.testing.assert_close(top @ top.T, basis[:, :leading] @ basis[:, :leading].T, atol=1e-5, rtol=0)
        assert (top.T @ rest).abs().max() < 1e-5
        draws.append(factor @ factor.T)
    mean = torch.stack(draws).mean(0)
    assert (mean - torch.eye(dim, dtype=torch.float64)).abs().max() < 0.1
    assert (draws[0] - torch.eye(dim, dtype=torch.float64)).abs().max() > 0.3  # one draw is not I (k < d)


def test_side_samples_moments_are_the_kronecker_factors_of_an_identity_projection():
    """Σ_t u_t u_tᵀ and Σ_t v_t v_tᵀ of every principal side (an embedding's one-hot side from id counts; the tied
    head adds its own tokens) equal the "ekfac" statistics of the identity projector (the exact-gradient path)."""
    model, data = tiny_gpt2(), lm_sequences(6)
    traker = TRAKer(model, **SETTINGS)
    projector = traker.feature_map.projector
    view, _, batch = _view_and_batch(traker, model.state_dict(), 0, data)
    moments = {name: sample.dense() for name, sample in view.side_samples(batch).items()}
    identity = FactoredGradientProjector(model, traker.param_names, 1, 0, "cpu", kind="identity")
    identity.start_statistics("ekfac")
    identity(view.task, view.weights, view.buffers, batch, model_id=0)
    position = {target.name: b for b, target in enumerate(identity.targets)}
    sides = projector.principal_sides()
    assert {side for _, side in sides} == {"rows", "cols"} and any("wte" in t.name for t, _ in sides)
    assert set(moments) == {f"{target.name}/{side}" for target, side in sides}
    for target, side in sides:
        expected = identity.statistics[f"block_{position[target.name]}_{side}"]
        torch.testing.assert_close(moments[f"{target.name}/{side}"], expected, rtol=1e-5, atol=1e-6)


def test_features_are_the_exact_gradients_projected_with_the_stored_factors(tmp_path):
    """hf_trak's default on a causal LM stores each checkpoint's principal factors; x_i = √k/√p · ⊕_l P_rᵀ G_il P_c
    with those factors and the exact per-example gradients G_il; a reload scores as the run that made them."""
    model, data, targets = tiny_gpt2(), lm_sequences(12), lm_sequences(3, seed=1)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, save_dir=str(tmp_path / "s"), **SETTINGS)
    config = traker.config
    assert (config.principal_share, config.kernel_shrinkage) == (PRINCIPAL_SHARE, KERNEL_SHRINKAGE)
    assert config.principal_fraction == 0.1 and config.store_version == STORE_VERSION >= 5
    expected = traker.featurize(data, checkpoints).score(targets)
    store, projector = traker.store, traker.feature_map.projector
    assert projector.fallback_gradients is None
    factors = [store.principal_factors(m) for m in range(2)]
    assert set(factors[0]) == {f"{t.name}/{side}" for t, side in projector.principal_sides()}
    assert any(not torch.equal(factors[0][name], factors[1][name]) for name in factors[0])  # made per checkpoint
    for m, checkpoint in enumerate(checkpoints):
        view, _, batch = _view_and_batch(traker, checkpoint, m, data)
        grads = {}
        for chunk in PerExampleGradients(model, traker.param_names)(view.task, view.weights, view.buffers, batch):
            grads.update(chunk)
        features = torch.zeros(len(data), projector.proj_dim, dtype=torch.float64)
        for target in projector.targets:
            sides = [
                factors[m].get(f"{target.name}/{side}", projector.factor(m, target, side)).double()
                for side in ("rows", "cols")
            ]
            gradient = grads[target.name].double().reshape(len(data), target.rows, target.cols)
            block = sides[0].T @ gradient @ sides[1]
            features[:, target.offset : target.offset + target.size] = block.reshape(len(data), -1)
        features *= (projector.proj_dim / traker.num_params) ** 0.5
        stored = torch.from_numpy(store.features(m)).double()
        torch.testing.assert_close(stored, features, rtol=1e-4, atol=1e-5 * features.abs().max().item())
    loaded = TRAKer.from_pretrained(str(tmp_path / "s"), model, checkpoints=checkpoints)
    assert loaded.config.principal_share == PRINCIPAL_SHARE
    np.testing.assert_array_equal(loaded.score(targets), expected)


def test_missing_or_corrupt_factors_redo_their_checkpoint_and_other_settings_are_refused(tmp_path, caplog):
    model, data, targets = tiny_gpt2(), lm_sequences(12), lm_sequences(3, seed=1)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    root = str(tmp_path / "s")
    expected = TRAKer(model, save_dir=root, **SETTINGS).featurize(data, checkpoints).score(targets)
    path = os.path.join(root, "checkpoint-1", PRINCIPAL_FACTORS_NAME)
    os.remove(path)
    with pytest.raises(ValueError, match="incomplete"):
        TRAKer.from_pretrained(root, model, checkpoints=checkpoints)
    again = TRAKer(model, save_dir=root, **SETTINGS).featurize(data, checkpoints)
    assert "Checkpoint 1's principal factors are missing: redoing its features" in caplog.text
    np.testing.assert_allclose(again.score(targets), expected, rtol=1e-5, atol=1e-6)
    with open(path, "r+b") as file:
        file.truncate(20)
    caplog.clear()
    again = TRAKer(model, save_dir=root, **SETTINGS).featurize(data, checkpoints)
    assert "principal factors are missing" in caplog.text
    np.testing.assert_allclose(again.score(targets), expected, rtol=1e-5, atol=1e-6)
    before = {name: os.path.getmtime(os.path.join(root, "checkpoint-0", name)) for name in os.listdir(
        os.path.join(root, "checkpoint-0"))}  # fmt: skip
    for setting, message in [
        (dict(principal_share=0.5), "principal_share: stored 0.6, given 0.5"),
        (dict(principal_fraction=0.5), "principal_fraction: stored 0.1, given 0.5"),
        (dict(kernel_shrinkage=0.0), "kernel_shrinkage: stored 0.3, given 0.0"),
    ]:
        with pytest.raises(OutputExistsError, match=message):
            TRAKer(model, save_dir=root, **SETTINGS, **setting).featurize(data, checkpoints)
    after = {name: os.path.getmtime(os.path.join(root, "checkpoint-0", name)) for name in os.listdir(
        os.path.join(root, "checkpoint-0"))}  # fmt: skip
    assert after == before


def test_shrunk_per_token_kernels_follow_their_definition():
    """K_b = ((1 − α)·G_b + α·(A_b ⊗ B_b)·tr G_b/(tr A_b · tr B_b) + λ_b I)⁻¹, λ_b = 0.01·tr/k_b, from the stored
    per-token statistics (× k/p), recomputed in numpy; α = 0 is the plain per-token Gram matrix."""
    model, train, targets = tiny_gpt2(), lm_sequences(16), lm_sequences(3, seed=5)
    for alpha in (0.0, 0.3):
        traker = TRAKer(model, kernel_shrinkage=alpha, ensemble="mean", **SETTINGS).featurize(
            train, [model.state_dict()]
        )
        store, config = traker.store, traker.store.config
        statistics = {}
        for start, stop in store.shard_ranges():
            for name, tensor in store.statistics(0, start, stop).items():
                statistics[name] = statistics.get(name, 0) + tensor.double().numpy()
        scale = config.feature_dim / config.num_params
        kernel = np.zeros((config.feature_dim, config.feature_dim))
        for b, (offset, size) in enumerate(config.kernel_blocks):
            gram = statistics[f"block_{b}"] * scale
            rows, cols = statistics[f"block_{b}_rows"], statistics[f"block_{b}_cols"]
            kfac = np.kron(rows, cols) * np.trace(gram) / (np.trace(rows) * np.trace(cols))
            gram = (1 - alpha) * gram + alpha * kfac
            block = slice(offset, offset + size)
            kernel[block, block] = np.linalg.inv(gram + 0.01 * np.trace(gram) / size * np.eye(size))
        x = store.features(0).astype(np.float64)
        t = traker._target_features(targets, None, None)[0][0].numpy().astype(np.float64)
        expected = x @ kernel @ t.T
        np.testing.assert_allclose(traker.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_the_estimator_gives_principal_factors_and_shrinkage_to_per_token_kernels_only():
    assert TRAKer(tiny_gpt2(), proj_dim=512).config.principal_share == PRINCIPAL_SHARE == 0.6
    for config in (
        TRAKer(tiny_bert(), proj_dim=512, kernel_from="examples").config,
        TRAKer(tiny_bert(), proj_dim=512, store_version=6).config,  # kernels from the examples
        TRAKer(tiny_gpt2(), proj_dim=512, estimator="trak").config,
        TRAKer(tiny_gpt2(), proj_dim=512, store_version=4).config,  # that format had neither
    ):
        assert (config.principal_share, config.principal_fraction, config.kernel_shrinkage) == (0.0, 0.0, 0.0)
    explicit = TRAKer(tiny_bert(), proj_dim=512, kernel_from="examples", principal_share=0.5).config
    assert explicit.principal_share == 0.5  # taken
    with pytest.raises(InvalidArgumentError, match="pass projector='factored' or principal_share=0"):
        TRAKer(tiny_gpt2(), proj_dim=64, projector="rademacher", principal_share=0.5)
    with pytest.raises(InvalidArgumentError, match=r"pass kernel_from='tokens' \(or 'mixed'\) or kernel_shrinkage=0"):
        TRAKer(tiny_bert(), proj_dim=512, kernel_from="examples", kernel_shrinkage=0.3)
    with pytest.raises(InvalidArgumentError, match="kernel_from='mixed' is a format of store version 7 or later, and "
                                                   "this is a version-6 store"):  # fmt: skip
        TRAKer(tiny_bert(), proj_dim=512, kernel_from="mixed", store_version=6)
    with pytest.raises(InvalidArgumentError, match=r"principal_share must be in \[0, 1\]"):
        TRAKer(tiny_gpt2(), principal_share=1.5)
    for bad in (0, None, "0.1"):
        with pytest.raises(InvalidArgumentError, match=r"principal_fraction must be in \(0, 1\]"):
            TRAKer(tiny_gpt2(), principal_fraction=bad)
    with pytest.raises(InvalidArgumentError, match=r"kernel_shrinkage must be in \[0, 1\]"):
        TRAKer(tiny_gpt2(), kernel_shrinkage="0.3")


def test_a_store_of_a_newer_format_is_refused_naming_the_upgrade(tmp_path):
    model = tiny_bert()
    root = str(tmp_path / "s")
    TRAKer(model, proj_dim=32, save_dir=root).featurize(token_sequences(4), [model.state_dict()])
    with open(os.path.join(root, CONFIG_NAME)) as file:
        config = json.load(file)
    config["store_version"] = STORE_VERSION + 1
    with open(os.path.join(root, CONFIG_NAME), "w") as file:
        json.dump(config, file)
    with pytest.raises(StoreMismatchError, match=f"version-{STORE_VERSION + 1} store .* upgrade hf_trak"):
        FeatureStore.load(root)


def test_side_samples_leave_out_the_tokens_that_reach_no_loss():
    """An input side's moment is Σ x_t x_tᵀ over the tokens whose output gradient is not zero. In a one-layer GPT-2
    the MLP's output at position t only feeds the logits at t, so those are the tokens whose next label is in the
    loss (not the masked first ones, nor a sequence's last token, nor padding): by hand from the layer's inputs."""
    model, data = tiny_gpt2(), lm_sequences(6)
    traker = TRAKer(model, proj_dim=24, dtype=torch.float32)
    projector = traker.feature_map.projector
    name = "transformer.h.0.mlp.c_fc.weight/rows"  # Conv1D: the rows side is the layer's input
    assert name in {f"{t.name}/{side}" for t, side in projector.principal_sides()}
    view, _, batch = _view_and_batch(traker, model.state_dict(), 0, data)
    moments = {name: sample.dense() for name, sample in view.side_samples(batch).items()}
    captured = []
    handle = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    handle.remove()
    assert len({len(ids) for ids in data["input_ids"]}) > 1  # padded
    predicts = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1))  # position t predicts label t + 1
    assert 0 < predicts.sum() < predicts.numel() - len(data)
    tokens = captured[0][predicts].double()
    torch.testing.assert_close(moments[name], tokens.T @ tokens, rtol=1e-4, atol=1e-5)


def test_a_store_whose_sides_all_fit_k_is_complete_without_principal_factors(tmp_path):
    """principal_share > 0 where every side has k = d: nothing to compute, an empty factors file, a complete store."""
    model, data = tiny_gpt2(), lm_sequences(6)
    traker = TRAKer(model, proj_dim=100000, save_dir=str(tmp_path / "s"), dtype=torch.float32)
    assert traker.config.principal_share and not traker.feature_map.projector.principal_sides()
    expected = traker.featurize(data, [model.state_dict()]).score(lm_sequences(2, seed=1))
    assert traker.store.principal_factors(0) == {}
    loaded = TRAKer.from_pretrained(str(tmp_path / "s"), model)
    np.testing.assert_array_equal(loaded.score(lm_sequences(2, seed=1)), expected)


def test_finite_rows_leave_out_the_rows_with_a_non_finite_value():
    rows = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [0.5, -1.0], [float("inf"), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(finite_rows(rows), rows[[0, 2]].float())
    torch.testing.assert_close(finite_rows(rows[[0, 2]]), rows[[0, 2]].float())
    huge = torch.tensor([[3e38, 3e38], [1.0, 1.0]])  # finite, but their sum is not: kept all the same
    torch.testing.assert_close(finite_rows(huge), huge)


def test_the_tokens_that_reach_the_loss_are_those_whose_output_gradient_is_not_all_zero():
    """``reaching_tokens``: a token whose δ is all zero does not reach; one zero coordinate, a NaN or an infinity
    (left to ``finite_rows``) does."""
    delta = torch.ones(2, 3, 4)
    delta[0, 1] = 0
    delta[0, 2, 0] = 0
    delta[1, 0] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    delta[1, 2] = torch.tensor([0.0, 0.0, float("-inf"), 0.0])
    delta[1, 1] = -1e-30
    assert reaching_tokens(delta).tolist() == [True, False, True, True, True, True]


def test_a_side_gets_share_times_k_leading_eigenvectors_unless_it_is_kept_whole():
    """``principal_count``: min(k, round(share·k)) where k < d; 0 where k ≥ d (the side is kept whole, no factor)."""
    from hf_trak.method.principal import principal_count

    assert [principal_count(10, 50, share) for share in (0.0, 0.25, 0.5, 1.0)] == [0, 2, 5, 10]
    assert principal_count(10, 10, 0.5) == principal_count(12, 10, 0.5) == 0
    assert principal_count(49, 50, 1.5) == 49
