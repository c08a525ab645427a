"""``estimator``: what the settings left at "auto" become (``hf_trak.method.estimator``), as the store records it."""

import re

import numpy as np
import pytest
import torch

from hf_trak import TRAKArguments, TRAKer
from hf_trak.errors import OutputExistsError
from hf_trak.method.estimator import (
    AUTO_MIN_DIMS_PER_MATRIX,
    DEFAULT_PROJ_DIM,
    GLOBAL_LAMBDA_SCALE,
    LAMBDA_SCALE,
    MODULE_LAMBDA_SCALE,
    TOKENS_PROJ_DIM,
    attention_input_parameters,
    choose_projector,
)
from hf_trak.run import scoring
from hf_trak.testing.datasets import digits, lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_clip, tiny_gpt2, tiny_vit


@pytest.mark.parametrize(
    "make_model,kernel_from,shrinkage",
    [(tiny_bert, "mixed", 1.0), (tiny_gpt2, "tokens", 0.3)],
)
def test_hf_trak_takes_per_module_kernels_without_q_from_per_token_statistics(make_model, kernel_from, shrinkage):
    """A causal LM's kernels from its per-token Gram matrices shrunk 30% toward K-FAC; a classifier's the mean of
    the examples' Gram matrix and K-FAC's (``kernel_shrinkage=1``); in a version-6 store, from the examples."""
    traker = TRAKer(make_model(), proj_dim=512)
    config = traker.config
    assert config.projector == "factored" and "estimator='hf_trak'" in config.projector_reason
    assert (config.train_weight, config.kernel, config.kernel_from) == ("none", "per_module", kernel_from)
    assert config.kernel_shrinkage == shrinkage and config.principal_share == 0.6
    assert config.lambda_scale == MODULE_LAMBDA_SCALE and len(config.kernel_blocks) > 1
    assert config.ensemble == "normalized"
    old = TRAKer(make_model(), proj_dim=512, store_version=6).config
    assert old.kernel_from == ("tokens" if kernel_from == "tokens" else "examples")
    assert old.kernel_shrinkage == (shrinkage if kernel_from == "tokens" else 0.0)


def test_trak_is_the_seeds_estimator():
    config = TRAKer(tiny_gpt2(), proj_dim=512, estimator="trak").config
    assert config.projector == "rademacher"  # p·k is small: TRAK's dense projection
    assert (config.train_weight, config.kernel, config.kernel_from) == ("out_to_loss", "global", "examples")
    assert config.ensemble == "mean"
    assert config.lambda_scale == LAMBDA_SCALE and config.kernel_blocks == []


def test_hf_trak_falls_back_to_a_global_kernel_with_its_lambda_where_the_projector_is_dense():
    model = tiny_bert()
    matrices = len(TRAKer(model, proj_dim=512).config.kernel_blocks)
    small = AUTO_MIN_DIMS_PER_MATRIX * matrices - 1  # too few dimensions to factor every matrix
    kind, reason = choose_projector(model, TRAKArguments(proj_dim=small))
    assert kind == "rademacher" and "≤ 2^28" in reason
    config = TRAKer(model, proj_dim=small).config
    assert (config.projector, config.kernel, config.train_weight) == ("rademacher", "global", "none")
    assert config.lambda_scale == GLOBAL_LAMBDA_SCALE


def test_explicit_settings_win_over_the_estimator():
    settings = dict(kernel_from="ekfac", train_weight="out_to_loss", lambda_scale=0.3)
    config = TRAKer(tiny_gpt2(), proj_dim=512, **settings).config
    assert (config.projector, config.kernel, config.kernel_from) == ("factored", "per_module", "ekfac")
    assert (config.train_weight, config.lambda_scale) == ("out_to_loss", 0.3)
    config = TRAKer(tiny_gpt2(), proj_dim=512, estimator="trak", projector="factored", kernel="per_module").config
    assert (config.kernel, config.kernel_from, config.train_weight) == ("per_module", "examples", "out_to_loss")


def test_hf_trak_differentiates_the_weights_and_not_the_biases_unless_told():
    """hf_trak leaves biases out, and with the factored projector the attention's query/key/value projections
    (named here by their module paths, a second path to ``attention_input_parameters``)."""
    model = tiny_bert()
    biases = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    attention = {name for name, _ in model.named_parameters() if re.search(r"self\.(query|key|value)\.", name)}
    assert attention_input_parameters(model) == attention and len(attention) == 6  # one layer: 3 × (W, b)
    for projector, left_out in (("factored", biases | attention), ("rademacher", biases)):
        default = TRAKer(model, proj_dim=512, projector=projector)
        classic = TRAKer(model, proj_dim=512, projector=projector, estimator="trak")
        assert default.param_names == [name for name in classic.param_names if name not in left_out]
        assert biases & set(classic.param_names) and default.num_params < classic.num_params
    named = ["classifier.weight", "classifier.bias"]
    assert TRAKer(model, proj_dim=8, grad_wrt=named).param_names == named  # an explicit grad_wrt is kept as given
    for name, parameter in model.named_parameters():  # BitFit: only biases train, so they are what is left
        parameter.requires_grad_(name in biases)
    assert set(TRAKer(model, proj_dim=64).param_names) == biases
    for name, parameter in model.named_parameters():  # only the attention's inputs train: they are kept
        parameter.requires_grad_(name in attention)
    assert set(TRAKer(model, proj_dim=64).param_names) == attention - biases


def test_attention_inputs_are_found_in_gpt2_vit_and_clip():
    expected = {
        "gpt2": (tiny_gpt2(), r"attn\.c_attn\."),
        "vit": (tiny_vit(), r"attention\.(q|k|v)_proj\."),
        "clip": (tiny_clip(), r"self_attn\.(q|k|v)_proj\."),
    }
    for name, (model, pattern) in expected.items():
        found = attention_input_parameters(model)
        assert found and found == {n for n, _ in model.named_parameters() if re.search(pattern, n)}, name


def test_a_normalized_ensemble_gives_each_checkpoint_one_vote_per_target_and_older_stores_keep_the_mean(
    tmp_path, monkeypatch
):
    """ensemble="normalized" (hf_trak's): τ_j = mean_m(τ_mj/σ_mj), σ_mj the RMS over the rows of checkpoint m's
    scores of target j (``hf_trak.method.kernel.target_rms``, from XᵀX and K), checked against the scores of a store of
    each checkpoint alone normalized here (raw gradients: the same features in either store); and a store written
    before the field existed scores as the mean."""
    import json

    model, train, targets = tiny_bert(), token_sequences(16), token_sequences(4, seed=1)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=5)]
    settings = dict(projector="identity", proj_dim=None, dtype=torch.float32)
    both = TRAKer(model, save_dir=str(tmp_path / "both"), **settings).featurize(train, checkpoints)
    assert both.config.ensemble == "normalized"
    alone = [TRAKer(model, ensemble="mean", **settings).featurize(train, [c]).score(targets) for c in checkpoints]
    expected = np.mean([s / np.sqrt((s.astype(np.float64) ** 2).mean(axis=0)) for s in alone], axis=0)
    np.testing.assert_allclose(both.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    monkeypatch.setattr(scoring, "RMS_BLOCK", 3)  # σ computed in blocks of targets: the same scores
    np.testing.assert_allclose(both.score(targets), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    mean = TRAKer(model, ensemble="mean", **settings).featurize(train, checkpoints).score(targets)
    np.testing.assert_allclose(mean, np.mean(alone, axis=0), rtol=1e-4, atol=1e-5 * np.abs(mean).max())
    assert not np.allclose(mean / np.abs(mean).max(), expected / np.abs(expected).max(), atol=1e-2)
    config_path = tmp_path / "both" / "trak_config.json"
    config = json.loads(config_path.read_text())
    del config["ensemble"]
    config_path.write_text(json.dumps(config))
    older = TRAKer.from_pretrained(str(tmp_path / "both"), model, checkpoints)
    assert older.config.ensemble == "mean"
    np.testing.assert_allclose(older.score(targets), mean, rtol=1e-4, atol=1e-5 * np.abs(mean).max())
    kept = sorted(p.read_bytes() for p in (tmp_path / "both").rglob("*") if p.is_file() and p.name != ".trak.lock")
    with pytest.raises(OutputExistsError, match="ensemble: stored 'mean', given 'normalized'"):  # no silent mix
        TRAKer(model, save_dir=str(tmp_path / "both"), **settings).featurize(train, checkpoints)
    assert (
        sorted(p.read_bytes() for p in (tmp_path / "both").rglob("*") if p.is_file() and p.name != ".trak.lock")
        == kept
    )


def test_a_store_keeps_its_estimator_when_the_defaults_differ(tmp_path):
    """from_pretrained scores with the stored settings: a store made with estimator='trak' scores as TRAK, not as
    today's default, and equals the scores of the TRAKer that made it."""
    model, train, targets = tiny_vit(), digits(12), digits(3, offset=30)
    made = TRAKer(model, proj_dim=32, estimator="trak", save_dir=str(tmp_path / "s"), dtype=torch.float32)
    expected = made.featurize(train, [model.state_dict()]).score(targets)
    loaded = TRAKer.from_pretrained(str(tmp_path / "s"), model, train_dataset=train)
    assert (loaded.config.train_weight, loaded.args.train_weight) == ("out_to_loss", "out_to_loss")
    assert loaded.param_names == made.param_names and any(name.endswith(".bias") for name in made.param_names)
    np.testing.assert_array_equal(loaded.score(targets), expected)


def test_the_cli_and_the_trainer_default_to_hf_trak():
    from hf_trak.cli import build_parser

    args = build_parser().parse_args(["featurize", "--model", "m", "--dataset", "d", "--save-dir", "s"])
    assert args.estimator == "hf_trak" and args.train_weight == args.kernel == args.kernel_from == "auto"
    assert args.lambda_scale is None
    args = build_parser().parse_args(["featurize", "--model", "m", "--dataset", "d", "--estimator", "trak"])
    assert args.estimator == "trak"
    from hf_trak.trainer import TRAKCallback

    assert TRAKCallback().trak_args.estimator == "hf_trak"


def test_token_statistics_of_a_causal_lm_default_are_what_its_kernels_use(tmp_path):
    """The default on a causal LM writes per-token statistics beside each shard and builds each block's kernel
    from them (checked against the explicit kernel_from='tokens' store)."""
    model, train, targets = tiny_gpt2(), lm_sequences(12), lm_sequences(3, seed=4)
    settings = dict(proj_dim=512, dtype=torch.float32, shard_size=5)
    default = TRAKer(model, save_dir=str(tmp_path / "a"), **settings)
    explicit = TRAKer(model, save_dir=str(tmp_path / "b"), projector="factored", kernel="per_module",
                      kernel_from="tokens", train_weight="none", **settings)  # fmt: skip
    a = default.featurize(train, [model.state_dict()]).score(targets)
    b = explicit.featurize(train, [model.state_dict()]).score(targets)
    assert default.store.statistics(0, 0, 5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "estimator,lines",
    [
        ("hf_trak", ["| kernel | `per_module` (", "from `tokens`", "| λ | 0.01 · tr(XᵀX)/k per checkpoint (per block",
                     "| train-side weight | `none` (no Q) |", "| ensemble | `normalized` (",
                     "mean_m(X_m K_m T_mᵀ / σ_m), where", "σ_mj² = Σ_b ‖X_mb K_mb t_mjb‖²/n over the blocks b.",
                     "holds the diagonal blocks of XᵀX"]),
        ("trak", ["| kernel | `global` |", "| λ | 0.1 · tr(XᵀX)/k per checkpoint |",
                  "| train-side weight | `out_to_loss` |", "| ensemble | `mean` |",
                  "mean_m(X_m K_m T_mᵀ) ⊙ mean_m(Q_m), where T_m are the targets' features.",
                  "holds XᵀX and the regularized inverse K_m."]),
    ],
)  # fmt: skip
def test_the_dataset_card_states_the_estimator_the_store_was_made_with(tmp_path, estimator, lines):
    from hf_trak.store.card import render_dataset_card

    model = tiny_gpt2()
    traker = TRAKer(model, proj_dim=512, estimator=estimator, save_dir=str(tmp_path / "s"))
    card = str(render_dataset_card(traker.featurize(lm_sequences(6), [model.state_dict()]).store))
    for line in lines:
        assert line in card


def test_auto_proj_dim_follows_the_kernel_and_keeps_small_models_whole():
    """proj_dim="auto": 4096 for per-token kernels, 2048 otherwise, at most p, where the factored projector keeps every
    matrix whole (identity factors: the exact gradients); the store records the number."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_trak.cli.parser import build_parser

    big_lm = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    cases = [(big_lm, {}, TOKENS_PROJ_DIM), (big_lm, dict(kernel_from="examples"), DEFAULT_PROJ_DIM),
             (big_lm, dict(estimator="trak"), DEFAULT_PROJ_DIM)]  # fmt: skip
    for model, settings, expected in cases:
        traker = TRAKer(model, **settings)
        assert traker.num_params > expected and traker.config.proj_dim == expected
        assert 0.99 * expected <= traker.feature_map.dim <= expected  # equal sides can leave a dimension unused
    assert TRAKer(big_lm, proj_dim=4096).config.proj_dim == 4096  # a number is kept
    small = TRAKer(tiny_gpt2())
    assert small.config.proj_dim == small.num_params < TOKENS_PROJ_DIM
    assert all((t.k_rows, t.k_cols) == (t.rows, t.cols) for t in small.feature_map.projector.targets)
    assert TRAKer(tiny_bert(), proj_dim=512).config.proj_dim == 512
    assert (
        build_parser().parse_args(["featurize", "--model", "m", "--dataset", "d", "--proj-dim", "auto"]).proj_dim
        == "auto"
    )
