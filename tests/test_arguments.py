"""TRAKArguments: one settings object, reachable from Python, the CLI and the Trainer, checked at the edge."""

import dataclasses

import pytest

from hf_trak import TRAKArguments, TRAKConfig, TRAKer
from hf_trak.arguments import FEATURIZE_SCOPES, STORED, fields_in, parsed_settings
from hf_trak.cli import SCORE_NAMES, SCORE_SCOPES, build_parser, main
from hf_trak.testing.models import tiny_vit
from hf_trak.trainer import make_traker

# A value other than the default for every field, valid together on a tiny ViT.
NON_DEFAULT = dict(
    task="image_classification",
    proj_dim=16,
    projector="factored",
    projector_seed=3,
    lambda_reg=0.5,
    lambda_scale=0.2,
    dtype="float32",
    grad_wrt=["classifier.weight"],
    param_chunk_numel=100,
    max_projector_cache_bytes=1000,
    shard_size=7,
    save_dir="features",
    stream_dir="rows",
    batch_size=5,
    target_block_size=9,
    device="cpu",
    on_nonfinite="exclude",
    kernel="per_module",
    kernel_from="tokens",
    ensemble="mean",
    principal_share=0.5,
    principal_fraction=0.5,
    kernel_shrinkage=0.4,
    block_sizes="spectrum",
    train_weight="none",
    estimator="trak",
    overwrite=True,
    lock_timeout=30.0,
    process_timeout=60.0,
    keep_initial_weights=False,
    max_checkpoints=2,
)


def _argv(values: dict) -> list:
    argv = []
    for name, value in values.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            argv.append(option)
        else:
            argv += [option, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def test_the_sample_covers_every_field_and_differs_from_the_defaults():
    defaults = TRAKArguments()
    assert set(NON_DEFAULT) == {field.name for field in dataclasses.fields(TRAKArguments)}
    assert all(getattr(defaults, name) != value for name, value in NON_DEFAULT.items())
    assert {field.metadata["scope"] for field in dataclasses.fields(TRAKArguments)} == {
        "store",
        "featurize",
        "run",
        "trainer",
    }


def test_every_setting_is_reachable_from_the_cli():
    wanted = {field.name: NON_DEFAULT[field.name] for field in fields_in(FEATURIZE_SCOPES)}
    assert set(wanted) == set(NON_DEFAULT) - {"max_checkpoints", "keep_initial_weights"}  # all but the Trainer's own
    parsed = build_parser().parse_args(["featurize", "--model", "m", "--dataset", "d", *_argv(wanted)])
    assert parsed_settings(parsed) == wanted
    assert TRAKArguments(**parsed_settings(parsed)) == TRAKArguments(**wanted)

    scoring = {field.name: NON_DEFAULT[field.name] for field in fields_in(SCORE_SCOPES, SCORE_NAMES)}
    parsed = build_parser().parse_args(["score", "--save-dir", "s", "--dataset", "d", *_argv(scoring)])
    assert parsed_settings(parsed, SCORE_SCOPES, SCORE_NAMES) == scoring


def test_every_setting_is_reachable_from_the_trainer_and_reaches_the_traker(tmp_path):
    trak_args = TRAKArguments(**NON_DEFAULT)
    traker = make_traker(trak_args, tiny_vit(), str(tmp_path))
    assert traker.args == trak_args
    assert traker.param_names == ["classifier.weight"] and traker.config.projector == "factored"
    assert traker.config.kernel == "per_module" and traker.config.kernel_blocks == [[0, 16]]
    assert traker.config.train_weight == "none" and traker.feature_map.projector.proj_dim == 16
    assert traker.config.shard_size == 7 and traker.config.lambda_scale == 0.2 and traker.config.dtype == "float32"
    # The store defaults to <output_dir>/trak only when save_dir is unset.
    unset = make_traker(dataclasses.replace(trak_args, save_dir=None), tiny_vit(), str(tmp_path))
    assert unset.save_dir == str(tmp_path / "trak")


def test_keywords_and_args_build_the_same_traker():
    settings = {name: NON_DEFAULT[name] for name in ("proj_dim", "projector_seed", "lambda_scale", "shard_size")}
    by_keywords = TRAKer(tiny_vit(), **settings)
    by_args = TRAKer(tiny_vit(), args=TRAKArguments(**settings))
    assert by_keywords.args == by_args.args and by_keywords.config == by_args.config
    assert TRAKArguments.from_json_string(by_args.args.to_json_string()) == by_args.args


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("proj_dim", 2.5, "proj_dim must be 'auto' or a positive integer"),
        ("proj_dim", 0, "proj_dim must be 'auto' or a positive integer"),
        ("proj_dim", True, "proj_dim must be 'auto' or a positive integer"),
        ("proj_dim", "big", "proj_dim must be 'auto' or a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("target_block_size", -1, "target_block_size must be a positive integer"),
        ("shard_size", 0, "shard_size must be a positive integer"),
        ("param_chunk_numel", 0, "param_chunk_numel must be a positive integer"),
        ("projector", "sparse", "projector must be one of"),
        ("dtype", "bfloat16", "dtype must be one of"),
        ("lambda_reg", -1.0, "lambda_reg must be >= 0"),
        ("lambda_scale", 0.0, "lambda_scale must be > 0"),
    ],
)
def test_nonsense_settings_are_refused_before_any_work(setting, value, message):
    with pytest.raises(ValueError, match=message):
        TRAKArguments(**{setting: value})
    with pytest.raises(ValueError, match=message):
        TRAKer(tiny_vit(), **{setting: value})


def test_the_cli_refuses_nonsense_settings_in_one_line(capsys):
    for argv, message in (
        (["--proj-dim", "2.5"], "argument --proj-dim: expected auto or a positive integer, got '2.5'"),
        (["--proj-dim", "0"], "argument --proj-dim: expected auto or a positive integer, got '0'"),
        (["--batch-size", "0"], "error: batch_size must be a positive integer, got 0."),
        (["--projector", "sparse"], "argument --projector: invalid choice: 'sparse'"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["featurize", "--model", "no-model-needed", "--dataset", "d", "--save-dir", "s", *argv])
        assert exit.value.code == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error


def test_the_settings_of_scope_store_are_the_config_fields_copied_both_ways(tmp_path):
    """TRAKConfig records the resolved TRAKArguments fields of scope "store" under their names, and gives them back
    (``settings``): what ``from_pretrained`` scores with."""
    stored = [field.name for field in fields_in(STORED)]
    assert stored and set(stored) <= {field.name for field in dataclasses.fields(TRAKConfig)}
    model = tiny_vit()
    traker = TRAKer(model, proj_dim=24, lambda_scale=0.3, projector_seed=2, save_dir=str(tmp_path / "store"))
    resolved = {name: getattr(traker.args, name) for name in stored}
    assert {name: getattr(traker.config, name) for name in stored} == resolved
    assert traker.args.kernel != "auto" and traker.args.projector != "auto"  # resolved before it is recorded
    again = traker.config.settings()
    assert {name: getattr(again, name) for name in stored} == resolved
