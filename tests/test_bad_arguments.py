"""Nonsense arguments are refused at the edge, in the API and on the command line.

The command line prints one line, ``hf-trak: error: ...``, with exit status 2 for usage and
1 for failures, and a traceback only with ``--debug`` or ``HF_TRAK_DEBUG=1``.
"""

import subprocess
import sys

import pytest
import torch

from hf_trak import TRAKArguments, TRAKer
from hf_trak.cli import main
from hf_trak.errors import InvalidArgumentError, NotFoundError, TRAKError
from hf_trak.testing.datasets import digits
from hf_trak.testing.models import tiny_vit
from hf_trak.testing.processes import subprocess_env


@pytest.mark.parametrize(
    "setting, value",
    [("proj_dim", 2.5), ("proj_dim", 0), ("proj_dim", "2048"), ("batch_size", 0), ("batch_size", -4),
     ("target_block_size", 0), ("shard_size", 1.0), ("param_chunk_numel", 0), ("max_checkpoints", True)],
)  # fmt: skip
def test_settings_must_be_positive_integers(setting, value):
    expected = "'auto' or a positive integer" if setting == "proj_dim" else "a positive integer"
    with pytest.raises(InvalidArgumentError, match=rf"{setting} must be {expected}, got {value!r}"):
        TRAKArguments(**{setting: value})
    with pytest.raises(InvalidArgumentError, match=setting):
        TRAKer(tiny_vit(), **{setting: value})


@pytest.fixture(scope="module")
def traker():
    model = tiny_vit()
    return TRAKer(model, proj_dim=8).featurize(digits(6), [model.state_dict()])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.top_k(digits(2, offset=9), k=-3), "k must be a positive integer, got -3"),
        (lambda t: t.top_k(digits(2, offset=9), k=0), "k must be a positive integer, got 0"),
        (lambda t: t.top_k(digits(2, offset=9), k=2.0), "k must be a positive integer, got 2.0"),
        (lambda t: t.score(digits(2, offset=9), batch_size=-1), "batch_size must be a positive integer"),
        (lambda t: t.score(digits(2, offset=9), batch_size=0), "batch_size must be a positive integer, got 0"),
        (lambda t: t.top_k(digits(2, offset=9), target_block_size=0), "target_block_size must be a positive"),
        (lambda t: t.score(digits(2, offset=9), target_block_size=-2), "target_block_size must be a positive"),
        (lambda t: t.featurize(digits(6), [t.model.state_dict()], batch_size=-8), "batch_size must be a positive"),
        (lambda t: t.featurize(digits(6), [t.model.state_dict()], batch_size=0), "batch_size must be a positive"),
    ],
)
def test_call_arguments_are_checked_before_any_work(traker, call, message):
    with pytest.raises(InvalidArgumentError, match=message):
        call(traker)


def test_attribute_checks_k_before_loading_anything():
    import hf_trak

    with pytest.raises(InvalidArgumentError, match="k must be a positive integer, got -3"):
        hf_trak.attribute("./no_such_model", train=digits(2), targets=digits(1), k=-3)


def run_cli(argv, capsys, monkeypatch, debug: bool = False):
    monkeypatch.delenv("HF_TRAK_DEBUG", raising=False)
    if debug:
        monkeypatch.setenv("HF_TRAK_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["top-k", "--save-dir", "s", "--dataset", "d", "--output", "o", "--k", "-3"],
         "argument --k: expected a positive integer"),
        (["featurize", "--model", "m", "--dataset", "d", "--save-dir", "s", "--proj-dim", "2.5"],
         "--proj-dim: expected auto or a positive integer, got '2.5'"),
        (["report", "--top-k", "t", "--output", "r.html", "--num-targets", "0"],
         "expected a positive integer, got '0'"),
        (["featurize", "--model", "m", "--dataset", "d", "--save-dir", "s", "--batch-size", "0"],
         "hf-trak: error: batch_size must be a positive integer, got 0."),
        (["featurize", "--model", "m", "--dataset", "d"],
         "hf-trak: error: featurize writes a feature store: pass --save-dir."),
        (["report", "--top-k", "t", "--output", "r.pdf"], "hf-trak: error: Report path 'r.pdf' must end in .png"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert message in err
    assert err.startswith("hf-trak: error: ") and len(err.strip().splitlines()) == 1


def test_failures_exit_1_with_one_line_and_a_traceback_only_on_request(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = ["score", "--save-dir", "no_store", "--dataset", "d", "--output", "s.npy"]
    code, err = run_cli(argv, capsys, monkeypatch)
    assert code == 1 and err == "hf-trak: error: no_store holds no TRAK features (trak_config.json is missing).\n"
    with pytest.raises(NotFoundError, match="no_store holds no TRAK features"):
        run_cli(argv, capsys, monkeypatch, debug=True)
    with pytest.raises(NotFoundError):
        main(["--debug", *argv])


def test_the_installed_script_prints_one_line(tmp_path):
    script = [sys.executable, "-m", "hf_trak.cli", "top-k", "--save-dir", "s", "--dataset", "d", "--output", "o"]
    done = subprocess.run([*script, "--k", "0"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "--k: expected a positive integer, got '0'" in done.stderr
    done = subprocess.run(script, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "hf-trak: error: s holds no TRAK features (trak_config.json is missing)."
    ]


def test_every_error_class_is_a_trak_error_and_the_builtin_that_fits():
    from hf_trak import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, TRAKError)
    assert issubclass(errors.InvalidArgumentError, ValueError) and issubclass(
        errors.OutputExistsError, FileExistsError
    )
    assert issubclass(errors.CorruptStoreError, OSError) and issubclass(errors.StoreMismatchError, ValueError)
    import hf_trak

    assert all(hasattr(hf_trak, name) for name in errors.__all__)  # exported at the top level


def test_dtype_setting_accepts_a_torch_dtype():
    assert TRAKArguments(dtype=torch.float32).dtype == "float32"
