import copy

import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.method.estimator import GLOBAL_LAMBDA_SCALE, LAMBDA_SCALE, MODULE_LAMBDA_SCALE
from hf_trak.method.gradients import PerExampleGradients, select_parameters
from hf_trak.method.masks import to_4d_attention_mask
from hf_trak.method.model_outputs import AutoModelOutput
from hf_trak.testing.datasets import digits, lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, tiny_vit
from hf_trak.testing.reference import PARITY_CASES, identity_traker, kernel_scores, reference_scores


@pytest.mark.parametrize("estimator", ["trak", "hf_trak"])
@pytest.mark.parametrize("case,lambda_reg", PARITY_CASES)
def test_identity_projector_scores_match_float64_reference(case, lambda_reg, estimator):
    """float32 hf_trak end to end against float64 TRAK by the formula.

    Where the error comes from: K = (XtX + λI)⁻¹ has eigenvalues up to 1/λ where
    XtX has no mass (k > n here: k = 890-1937 parameters, n = 20-24 examples), and x_iᵀK
    cancels those down to |x|/s, so float32 rounding anywhere in the kernel path is
    amplified by κ = (s_max + λ)/λ, 2.3e3-9.5e3 in these cases at the default λ. With XtX
    summed in float32, K stored in float32 and Φ = X K in float32 (a float32 kernel path), max
    |error| / max |score| was up to 1.6e-4 (image, 1 thread) and 2.2e-4 (causal_lm, 2
    threads): which element crossed 1e-4 depended on the BLAS reduction order. XtX, K and
    Φ are float64 (``hf_trak.method.kernel``): the kernel path then adds ≤ 4e-7 (next test),
    and what is left, ≤ 1.4e-6 at any thread count, is the float32 per-example gradients
    themselves (float64 scoring of hf_trak's float32 features is as far from the
    reference). The a-priori bound on that residue, eps32 ≈ 6e-8 times κ, is 6e-4 and too loose
    to test against, so the tolerance, 1e-5 · max |score|, sits between what the analysis
    separates: 7× above the gradient residue measured at 1 and 2 threads, 10-20× below the
    errors of a float32 kernel path, which this test therefore catches.

    ``estimator="trak"`` is the seeds' TRAK (Q, λ = 0.1·tr/k); ``"hf_trak"``, the default, uses one global
    kernel with the identity projector: no Q and λ = 1·tr/k (``hf_trak.method.estimator``).
    """
    traker, model, train, targets, checkpoints = identity_traker(case, lambda_reg, estimator)
    scores = traker.score(targets, batch_size=4)
    expected = reference_scores(model, train, targets, checkpoints, lambda_reg, estimator=estimator)
    assert scores.shape == (len(train), len(targets))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    if lambda_reg is not None:
        assert all(float(traker.store.load_kernel(m)["lambda_reg"]) == lambda_reg for m in range(3))


@pytest.mark.parametrize("case,lambda_reg", PARITY_CASES)
def test_kernel_path_is_as_precise_as_float64_on_the_same_features(case, lambda_reg):
    """hf_trak's XtX, λ, K, Φ = XK and ΦTᵀ against float64 on the very features it stored.

    This isolates the kernel path from gradient rounding. With XtX, K and Φ in float64 the
    only float32 step left is ΦTᵀ, a length-k dot product of well-scaled vectors: error
    about eps32 · √k ≤ 3e-6 relative (k ≤ 1937); the tolerance is 1e-5 · max |score|.
    The float32 kernel path it replaced was off by up to 1.5e-4 here.
    """
    traker, *_, targets, _ = identity_traker(case, lambda_reg, "trak")
    scores = traker.score(targets, batch_size=4)
    target_features, _ = traker._target_features(targets, 4, None)  # as score() made them
    expected = kernel_scores(
        [traker.store.features(m) for m in range(3)],
        target_features,
        [traker.store.out_to_loss(m) for m in range(3)],
        lambda_reg,
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_checkpoints_aliasing_the_live_model_do_not_change_scores():
    models = [tiny_vit(seed=0), tiny_vit(seed=1)]
    before = copy.deepcopy(models[0].state_dict())
    train, targets = digits(20), digits(5, offset=50)
    aliased = TRAKer(models[0], proj_dim=64, save_dir=None).featurize(train, [m.state_dict() for m in models])
    cloned = TRAKer(tiny_vit(seed=5), proj_dim=64, save_dir=None).featurize(
        train, [copy.deepcopy(m.state_dict()) for m in models]
    )
    np.testing.assert_array_equal(aliased.score(targets), cloned.score(targets))
    for name, tensor in models[0].state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_save_pretrained_folders_and_models_work_as_checkpoints(tmp_path):
    model, other = tiny_bert(seed=0), tiny_bert(seed=1)
    other.save_pretrained(tmp_path / "checkpoint-1")
    train, targets = token_sequences(12), token_sequences(4, seed=3)
    from_folder = TRAKer(model, proj_dim=32, save_dir=None).featurize(train, [model, tmp_path / "checkpoint-1"])
    from_dicts = TRAKer(model, proj_dim=32, save_dir=None).featurize(train, [model.state_dict(), other.state_dict()])
    np.testing.assert_array_equal(from_folder.score(targets), from_dicts.score(targets))


def test_blockwise_scores_and_top_k_agree_with_full_matrix():
    model, train, targets = tiny_vit(), digits(30), digits(11, offset=200)
    full = (
        TRAKer(model, proj_dim=48, save_dir=None).featurize(train, [model.state_dict()], batch_size=7).score(targets)
    )
    traker = TRAKer(model, proj_dim=48, save_dir=None, shard_size=7)
    blocked = traker.featurize(train, [model.state_dict()], batch_size=3).score(
        targets, batch_size=2, target_block_size=3
    )
    np.testing.assert_allclose(blocked, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())
    for largest in (True, False):
        top = traker.top_k(targets, k=4, largest=largest, batch_size=2, target_block_size=3)
        assert top.indices.shape == top.scores.shape == (11, 4)
        order = np.argsort(-blocked if largest else blocked, axis=0)[:4].T
        np.testing.assert_array_equal(top.indices, order)
        np.testing.assert_allclose(top.scores, np.take_along_axis(blocked, order.T, 0).T, rtol=1e-6)


def test_out_array_receives_scores(tmp_path):
    model, train, targets = tiny_vit(), digits(10), digits(3, offset=40)
    traker = TRAKer(model, proj_dim=16, save_dir=None).featurize(train, [model.state_dict()])
    out = np.lib.format.open_memmap(tmp_path / "scores.npy", mode="w+", dtype=np.float32, shape=(10, 3))
    assert traker.score(targets, out=out) is out
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), traker.score(targets))
    with pytest.raises(ValueError, match="expected"):
        traker.score(targets, out=np.empty((3, 10), np.float32))


def test_featurize_writes_features_that_from_pretrained_scores_identically(tmp_path):
    model, train, targets = tiny_bert(), token_sequences(15), token_sequences(5, seed=2)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=3)]
    traker = TRAKer(model, proj_dim=32, save_dir=str(tmp_path / "trak"), shard_size=4).featurize(train, checkpoints)
    loaded = TRAKer.from_pretrained(str(tmp_path / "trak"), tiny_bert(seed=9), checkpoints)
    np.testing.assert_array_equal(loaded.score(targets), traker.score(targets))
    with pytest.raises(ValueError, match="param_names"):
        TRAKer.from_pretrained(str(tmp_path / "trak"), model, checkpoints, grad_wrt=["classifier.weight"])
    with pytest.raises(
        ValueError, match="made for a BertForSequenceClassification .* not a ViTForImageClassification"
    ):
        TRAKer.from_pretrained(
            str(tmp_path / "trak"), tiny_vit(num_labels=3), checkpoints, grad_wrt=None, task="text_classification"
        )
    with pytest.raises(ValueError, match="Checkpoint 1 .* other weights"):
        TRAKer.from_pretrained(str(tmp_path / "trak"), model, [checkpoints[0], perturbed_state_dict(model, seed=4)])
    with pytest.raises(ValueError, match="pass them as checkpoints"):
        TRAKer.from_pretrained(str(tmp_path / "trak"), model)


def test_trainable_parameters_only_are_differentiated():
    model, data = tiny_bert(), token_sequences(8)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("classifier"))
    names = select_parameters(model)
    assert names == ["classifier.weight", "classifier.bias"]
    task = AutoModelOutput.from_model(model)
    batch = next(ExampleSource.for_model(data, model, task).batches(8))
    batch["attention_mask"] = to_4d_attention_mask(batch["attention_mask"], "bidirectional", torch.float32)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    subset = list(PerExampleGradients(model, names)(task, weights, {}, batch))
    full = list(PerExampleGradients(model, list(weights))(task, weights, {}, batch))
    assert len(subset) == 1 and list(subset[0]) == names
    for name in names:
        torch.testing.assert_close(subset[0][name], full[0][name])
    assert TRAKer(model, proj_dim=8, save_dir=None, estimator="trak").num_params == sum(
        weights[n].numel() for n in names
    )
    # hf_trak's default leaves the biases out (hf_trak.method.estimator.default_parameters)
    assert TRAKer(model, proj_dim=8, save_dir=None).param_names == ["classifier.weight"]


@pytest.mark.parametrize("estimator,scale", [("trak", LAMBDA_SCALE), ("hf_trak", GLOBAL_LAMBDA_SCALE)])
def test_explicit_and_derived_lambda(estimator, scale):
    """λ = scale·tr(XᵀX)/k for a global kernel: 0.1 for TRAK, 1 for hf_trak's (no Q) global kernel."""
    model, train = tiny_vit(), digits(12)
    traker = TRAKer(model, proj_dim=16, save_dir=None, estimator=estimator).featurize(train, [model.state_dict()])
    assert traker.config.kernel == "global" and traker.config.lambda_scale == scale
    derived = traker.store.load_kernel(0)
    expected = scale * float(torch.trace(derived["xtx"].double())) / 16
    assert float(derived["lambda_reg"]) == pytest.approx(expected, rel=1e-6)
    explicit = TRAKer(model, proj_dim=16, save_dir=None, lambda_reg=0.25).featurize(train, [model.state_dict()])
    assert float(explicit.store.load_kernel(0)["lambda_reg"]) == 0.25


def test_scoring_reads_the_stored_preconditioned_features_and_matches_forming_them(tmp_path, monkeypatch):
    """A query costs one read of Φ = XK (stored by featurize) and n·k·T, never n·k²."""
    import os

    import hf_trak.run.scoring
    from hf_trak.store.feature_store import PRECONDITIONED

    model, train, targets = tiny_vit(), digits(30), digits(7, offset=60)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        root = str(tmp_path / str(dtype))
        traker = TRAKer(model, proj_dim=64, save_dir=root, shard_size=8, dtype=dtype)
        traker.featurize(train, [model.state_dict(), perturbed_state_dict(model, seed=2)])
        with monkeypatch.context() as patched:
            patched.setattr(
                hf_trak.run.scoring, "preconditioned", lambda *a: pytest.fail("Φ was formed at query time")
            )
            stored = traker.score(targets)
            top = traker.top_k(targets, k=3)
        for m in range(2):
            for start, stop in traker.store.shard_ranges():
                os.remove(traker.store.shard_path(m, start, stop, PRECONDITIONED))
        formed = traker.score(targets)  # a store without Φ (before version 3): formed per shard, in float64
        np.testing.assert_allclose(stored, formed, rtol=0, atol=tolerance * np.abs(formed).max())
        np.testing.assert_array_equal(top.indices, np.argsort(-stored, axis=0, kind="stable")[:3].T)


def test_train_weight_none_drops_q_and_nothing_else(tmp_path):
    """``train_weight="none"``: τ = mean_m(Φ_m T_mᵀ), i.e. TRAK's scores divided by Q̄ row by row."""
    model, train, targets = tiny_vit(), digits(16), digits(5, offset=40)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=3)]
    kwargs = dict(proj_dim=48, dtype=torch.float32, shard_size=6, estimator="trak")
    trak = TRAKer(model, **kwargs).featurize(train, checkpoints)
    unweighted = TRAKer(model, train_weight="none", save_dir=str(tmp_path / "s"), **kwargs)
    unweighted.featurize(train, checkpoints)
    q = np.mean([trak.store.out_to_loss(m) for m in range(2)], axis=0)
    expected = trak.score(targets) / q[:, None]
    np.testing.assert_allclose(unweighted.score(targets), expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    assert TRAKer.from_pretrained(str(tmp_path / "s"), model, checkpoints).config.train_weight == "none"


def test_per_module_kernels_are_the_block_diagonal_inverse_of_each_matrix_s_features():
    """``kernel="per_module"``: τ = Σ_b x_b (XᵀX_bb + λ_b I)⁻¹ t_b ⊙ Q over the factored projector's blocks, with
    λ_b = 0.01 tr(XᵀX_bb)/k_b (hf_trak's scale), each target's scores divided by σ (hf_trak's ensemble), recomputed
    here from the stored features: σ² = Σ_b mean over the rows of the block's part of the scores, squared (the store
    keeps XᵀX's diagonal blocks only); a version-6 store (XᵀX whole) divides by the RMS of the scores."""
    model, train, targets = tiny_bert(), token_sequences(24), token_sequences(4, seed=1)
    traker = TRAKer(model, proj_dim=96, projector="factored", kernel="per_module", dtype=torch.float32,
                    train_weight="out_to_loss", kernel_from="examples")  # fmt: skip
    traker.featurize(train, [model.state_dict()])
    blocks = traker.config.kernel_blocks
    assert sum(size for _, size in blocks) == 96 and blocks[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(blocks, blocks[1:]))  # the blocks tile the features
    x = traker.store.features(0).astype(np.float64)
    t = traker._target_features(targets, None, None)[0][0].numpy().astype(np.float64)
    kernel = np.zeros((96, 96))
    for offset, size in blocks:
        b = slice(offset, offset + size)
        xtx = x[:, b].T @ x[:, b]
        kernel[b, b] = np.linalg.inv(xtx + MODULE_LAMBDA_SCALE * np.trace(xtx) / size * np.eye(size))
    checkpoint_scores = x @ kernel @ t.T
    parts = [x[:, a : a + n] @ kernel[a : a + n, a : a + n] @ t[:, a : a + n].T for a, n in blocks]
    sigma = np.sqrt(sum((part**2).mean(axis=0) for part in parts))  # hf_trak's ensemble="normalized"
    rms = np.sqrt((checkpoint_scores**2).mean(axis=0))  # the scores' RMS, which a version-6 store divides by
    assert np.abs(sigma / rms - 1).max() > 1e-3
    expected = checkpoint_scores / sigma * traker.store.out_to_loss(0)[:, None]
    np.testing.assert_allclose(traker.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    old = TRAKer(model, proj_dim=96, projector="factored", kernel="per_module", dtype=torch.float32,
                 train_weight="out_to_loss", store_version=6).featurize(train, [model.state_dict()])  # fmt: skip
    np.testing.assert_array_equal(old.store.features(0), traker.store.features(0))
    expected = checkpoint_scores / rms * traker.store.out_to_loss(0)[:, None]
    np.testing.assert_allclose(old.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="kernel='per_module' needs .* projector='factored'"):
        TRAKer(tiny_vit(), proj_dim=16, projector="rademacher", kernel="per_module")


def test_mixed_kernels_average_the_examples_and_the_per_token_gram_matrices(tmp_path):
    """``kernel_from="mixed"``: each block's kernel is (M_b + λ_b I)⁻¹ with M_b = (XᵀX_bb + G_b·tr(XᵀX_bb)/tr(G_b))/2,
    XᵀX_bb recomputed here from the stored features and G_b from the stored per-token statistics (the per-token
    Gram matrix shrunk 30% toward K-FAC, as ``kernel_from="tokens"`` takes it), λ_b = 0.01·tr(M_b)/k_b; it has the
    per-token kernels' principal factors, and differs from both kernels it averages."""
    from hf_trak.method.kernel import shrunk_gram

    model, train = tiny_bert(), token_sequences(12)
    settings = dict(proj_dim=96, dtype=torch.float32, shard_size=5)
    mixed = TRAKer(model, kernel_from="mixed", kernel_shrinkage=0.3, save_dir=str(tmp_path / "mixed"), **settings)
    mixed.featurize(train, [model.state_dict()])
    config = mixed.config
    assert config.kernel == "per_module" and config.principal_share > 0 and config.kernel_shrinkage == 0.3
    x = mixed.store.features(0).astype(np.float64)
    statistics = {}
    for start, stop in mixed.store.shard_ranges():
        for name, tensor in mixed.store.statistics(0, start, stop).items():
            statistics[name] = statistics.get(name, 0) + tensor.double()
    kernel, scale = mixed.store.load_kernel(0)["kernel"].numpy(), config.feature_dim / config.num_params
    others = {kind: TRAKer(model, kernel_from=kind, principal_share=config.principal_share,
                           kernel_shrinkage=config.kernel_shrinkage if kind == "tokens" else 0.0, **settings)
              .featurize(train, [model.state_dict()]).store.load_kernel(0)["kernel"].numpy()
              for kind in ("tokens", "examples")}  # fmt: skip
    for b, (offset, size) in enumerate(config.kernel_blocks):
        block = slice(offset, offset + size)
        examples = x[:, block].T @ x[:, block]
        tokens = statistics[f"block_{b}"] * scale
        tokens = shrunk_gram(tokens, statistics[f"block_{b}_rows"], statistics[f"block_{b}_cols"], 0.3).numpy()
        m = (examples + tokens * np.trace(examples) / np.trace(tokens)) / 2
        expected = np.linalg.inv(m + MODULE_LAMBDA_SCALE * np.trace(m) / size * np.eye(size))
        np.testing.assert_allclose(kernel[block, block], expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        for other in others.values():
            assert not np.allclose(kernel[block, block], other[block, block], rtol=1e-3)


def test_mixed_kernels_with_full_shrinkage_take_the_kronecker_factors_alone(tmp_path):
    """``kernel_from="mixed", kernel_shrinkage=1``: the per-token part of each weight block is K-FAC's A ⊗ B alone, so
    featurize gathers the Kronecker factors and no per-token Gram matrix (``statistics_kind``: "ekfac"), and K_b =
    (M_b + λ_b I)⁻¹ with M_b = (XᵀX_bb + (A ⊗ B)·tr(XᵀX_bb)/tr(A ⊗ B))/2, recomputed here from the stored features
    and factors; it differs from the kernel with shrinkage 0.3 (except on a block whose tokens all share one row
    vector, such as the token-type embedding's: there the per-token Gram matrix is A ⊗ B)."""
    model, train = tiny_bert(), token_sequences(12)
    settings = dict(proj_dim=96, dtype=torch.float32, shard_size=5, kernel_from="mixed")
    mixed = TRAKer(model, kernel_shrinkage=1.0, save_dir=str(tmp_path / "kfac"), **settings)
    mixed.featurize(train, [model.state_dict()])
    x = mixed.store.features(0).astype(np.float64)
    statistics = {}
    for start, stop in mixed.store.shard_ranges():
        for name, tensor in mixed.store.statistics(0, start, stop).items():
            statistics[name] = statistics.get(name, 0) + tensor.double()
    blocks = mixed.config.kernel_blocks
    assert sorted(statistics) == sorted(f"block_{b}_{side}" for b in range(len(blocks)) for side in ("rows", "cols"))
    kernel = mixed.store.load_kernel(0)["kernel"].numpy()
    shrunk = TRAKer(model, kernel_shrinkage=0.3, **settings).featurize(train, [model.state_dict()])
    shrunk, differs = shrunk.store.load_kernel(0)["kernel"].numpy(), []
    for b, (offset, size) in enumerate(blocks):
        block = slice(offset, offset + size)
        examples = x[:, block].T @ x[:, block]
        kronecker = np.kron(statistics[f"block_{b}_rows"].numpy(), statistics[f"block_{b}_cols"].numpy())
        m = (examples + kronecker * np.trace(examples) / np.trace(kronecker)) / 2
        expected = np.linalg.inv(m + MODULE_LAMBDA_SCALE * np.trace(m) / size * np.eye(size))
        np.testing.assert_allclose(kernel[block, block], expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        differs.append(not np.allclose(kernel[block, block], shrunk[block, block], rtol=1e-3))
    assert sum(differs) == len(blocks) - 1


def test_a_float16_store_keeps_the_precision_of_per_module_kernels(tmp_path):
    """Φ is stored column-scaled (``hf_trak.method.kernel.column_scale``), so that kernels whose blocks differ by
    orders of magnitude keep float16's relative precision in every column (a per-module K rescaled by mean|K| once left
    99.8% of an unscaled float16 Φ at 0). Stored Φ against Φ formed in float64 from the same float16 features:"""
    import os

    from hf_trak.store.feature_store import PRECONDITIONED

    model, train, targets = tiny_vit(), digits(40), digits(5, offset=50)
    traker = TRAKer(model, proj_dim=256, projector="factored", kernel="per_module", save_dir=str(tmp_path / "s"))
    stored = traker.featurize(train, [model.state_dict()]).score(targets)
    for start, stop in traker.store.shard_ranges():
        os.remove(traker.store.shard_path(0, start, stop, PRECONDITIONED))
    formed = traker.score(targets)
    np.testing.assert_allclose(stored, formed, rtol=0, atol=2e-3 * np.abs(formed).max())


def test_token_kernels_equal_example_kernels_when_every_example_is_one_token():
    """``kernel_from="tokens"`` sums z_it z_itᵀ over tokens; with one token per example that is XᵀX's blocks. (Stores
    of version 3, whose sizes do not depend on the kernel source: from version 4 token kernels factor with equal
    sides, ``test_factored``.)"""
    model = tiny_bert()
    one_token = token_sequences(20, min_len=1, max_len=1)
    assert {len(ids) for ids in one_token["input_ids"]} == {1}
    kwargs = dict(proj_dim=128, projector="factored", kernel="per_module", dtype=torch.float32, shard_size=7,
                  store_version=3)  # fmt: skip
    targets = token_sequences(4, seed=3, min_len=1, max_len=1)
    tokens = TRAKer(model, kernel_from="tokens", **kwargs).featurize(one_token, [model.state_dict()])
    examples = TRAKer(model, **kwargs).featurize(one_token, [model.state_dict()])
    expected = examples.score(targets)
    np.testing.assert_allclose(tokens.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    longer = token_sequences(20)  # several tokens: the kernels differ
    a = TRAKer(model, kernel_from="tokens", **kwargs).featurize(longer, [model.state_dict()]).store.load_kernel(0)
    b = TRAKer(model, **kwargs).featurize(longer, [model.state_dict()]).store.load_kernel(0)
    assert not torch.allclose(a["kernel"], b["kernel"], rtol=1e-3)
    with pytest.raises(ValueError, match="kernel_from=.tokens. .* kernel=.per_module."):
        TRAKer(model, proj_dim=16, projector="factored", kernel="global", kernel_from="tokens")
    with pytest.raises(ValueError, match="kernel_from=.tokens. .* kernel=.per_module."):  # auto gives global here
        TRAKer(model, proj_dim=16, projector="rademacher", kernel_from="tokens")


def test_ekfac_kernels_follow_their_definition_in_projected_space(tmp_path):
    """``kernel_from="ekfac"``: for a weight block, K_b = Q diag(1/(Λ + λ_b)) Qᵀ with Q = Q_r ⊗ Q_c the eigenbases
    of the stored per-token Kronecker factors and Λ = diag(Qᵀ X_bᵀX_b Q), λ_b = 0.1·mean(Λ); a bias block inverts
    its per-token Gram matrix (× k/p). Recomputed here in numpy from the stored statistics and features
    (``estimator="trak"``, which differentiates the biases too, and λ's scale 0.1)."""
    model, train, targets = tiny_gpt2(), lm_sequences(16), lm_sequences(3, seed=5)
    traker = TRAKer(model, proj_dim=96, projector="factored", kernel="per_module", kernel_from="ekfac",
                    train_weight="none", dtype=torch.float32, shard_size=6, save_dir=str(tmp_path / "s"),
                    estimator="trak")  # fmt: skip
    traker.featurize(train, [model.state_dict()])
    store, config = traker.store, traker.store.config
    statistics = {}
    for start, stop in store.shard_ranges():
        for name, tensor in store.statistics(0, start, stop).items():
            statistics[name] = statistics.get(name, 0) + tensor.double().numpy()
    x = store.features(0).astype(np.float64)
    kernel = np.zeros((96, 96))
    for b, (offset, size) in enumerate(config.kernel_blocks):
        block = slice(offset, offset + size)
        if f"block_{b}_rows" in statistics:
            q = np.kron(
                np.linalg.eigh(statistics[f"block_{b}_rows"])[1], np.linalg.eigh(statistics[f"block_{b}_cols"])[1]
            )
            moments = np.diag(q.T @ x[:, block].T @ x[:, block] @ q)
            kernel[block, block] = (q / (moments + LAMBDA_SCALE * moments.mean())) @ q.T
        else:
            gram = statistics[f"block_{b}"] * config.feature_dim / config.num_params
            kernel[block, block] = np.linalg.inv(gram + LAMBDA_SCALE * np.trace(gram) / size * np.eye(size))
    assert any(f"block_{b}_rows" in statistics for b in range(len(config.kernel_blocks)))
    t = traker._target_features(targets, None, None)[0][0].numpy().astype(np.float64)
    expected = x @ kernel @ t.T
    np.testing.assert_allclose(traker.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_block_diagonal_kernels_are_applied_block_by_block_as_the_dense_matrix_would_be():
    """``column_scale`` and ``preconditioned`` given a per-module K's blocks (with K and XᵀX whole, or kept as their
    blocks) give diag(K XᵀX K) and X K of the dense K; ``add_gram`` into the blocks gives XᵀX's."""
    from hf_trak.method.kernel import add_gram, block_diagonal, column_scale, diagonal_blocks, preconditioned

    generator = torch.Generator().manual_seed(0)
    blocks = [[0, 3], [3, 5], [8, 1]]
    inverses = []
    for _, size in blocks:
        a = torch.randn(size, size, generator=generator, dtype=torch.float64)
        inverses.append(a @ a.T + torch.eye(size, dtype=torch.float64))
    kernel = block_diagonal(inverses, blocks)
    x = torch.randn(12, 9, generator=generator)
    xtx = x.double().T @ x.double()
    expected_scale = (torch.diagonal(kernel @ xtx @ kernel) / 12).sqrt()
    torch.testing.assert_close(column_scale(xtx, kernel, 12, blocks), expected_scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(column_scale(xtx, kernel, 12), expected_scale, rtol=1e-12, atol=0)
    grams = [torch.zeros(size, size, dtype=torch.float64) for _, size in blocks]
    add_gram(grams, x[:5], blocks)
    add_gram(grams, x[5:], blocks)
    for gram, piece in zip(grams, diagonal_blocks(xtx, blocks)):
        torch.testing.assert_close(gram, piece, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(column_scale(grams, inverses, 12, blocks), expected_scale, rtol=1e-12, atol=0)
    dense = (x.double() @ kernel / expected_scale).float()
    torch.testing.assert_close(preconditioned(x, kernel, expected_scale, blocks), dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(preconditioned(x, inverses, expected_scale, blocks), dense, rtol=1e-6, atol=1e-6)
    cut = preconditioned(x, kernel, None, [[0, 4], [4, 5]])  # blocks that cut K's own: K's entries are left out
    assert (cut - (x.double() @ kernel).float()).abs().max() > 1e-2
