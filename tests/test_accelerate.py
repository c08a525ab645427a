"""Featurize and score under ``torchrun --nproc_per_node 2`` (gloo, CPU): same result as one process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from hf_trak import TRAKer, attribute
from hf_trak.store.feature_store import FeatureStore
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, word_tokenizer
from hf_trak.testing.processes import assert_gloo_threads_joined_at_exit, subprocess_env

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from accelerate import Accelerator
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import lm_sequences
    from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2
    from hf_trak.testing.processes import register_exit_probe
    from hf_trak.testing.datasets import token_sequences
    store, out, num_train, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
    register_exit_probe(out)
    make_model, make_data = {"bert": (tiny_bert, token_sequences), "gpt2": (tiny_gpt2, lm_sequences)}[sys.argv[4]]
    accelerator = Accelerator(cpu=True)
    model = make_model()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=32, save_dir=store, shard_size=4, accelerator=accelerator)
    traker.featurize(make_data(num_train), checkpoints, batch_size=batch_size)
    targets = make_data(7, seed=1)
    scores = traker.score(targets, batch_size=2, target_block_size=2)
    top = traker.top_k(targets, k=3, batch_size=2)
    if accelerator.is_main_process:
        np.save(out + "/scores.npy", scores)
        np.save(out + "/top_indices.npy", top.indices)
    else:
        assert scores is None and top is None
""")


MODELS = {"bert": (tiny_bert, token_sequences), "gpt2": (tiny_gpt2, lm_sequences)}


def _torchrun(store, out, num_train, model="bert", batch_size=3, **kwargs):
    script = os.path.join(out, "script.py")
    with open(script, "w") as file:
        file.write(SCRIPT)
    command = [
        *TORCHRUN,
        script,
        str(store),
        str(out),
        str(num_train),
        model,
        str(batch_size),
    ]
    return subprocess.Popen(command, env=subprocess_env(), **kwargs)


def _single_process(num_train, model="bert", batch_size=3):
    make_model, make_data = MODELS[model]
    model = make_model()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=32, save_dir=None, shard_size=4).featurize(
        make_data(num_train), checkpoints, batch_size=batch_size
    )
    return traker


@pytest.mark.parametrize("model", list(MODELS))
def test_two_processes_give_the_single_process_result(tmp_path, model):
    """The same features bit for bit. gpt2 (hf_trak's causal-LM default) also makes its principal factors across
    the processes: each takes a share of the same batches of the sample (``featurize._write_principal_factors``)."""
    process = _torchrun(tmp_path / "store", tmp_path, 23, model, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-4000:]
    assert_gloo_threads_joined_at_exit(tmp_path)  # hf_trak.run.processes destroyed the process group
    reference = _single_process(23, model)
    assert bool(reference.config.principal_share) == (model == "gpt2")
    targets = MODELS[model][1](7, seed=1)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), reference.score(targets), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "top_indices.npy"), reference.top_k(targets, k=3).indices)
    store = FeatureStore.load(str(tmp_path / "store"))
    for m in range(2):  # 6 shards of 4 (the last has 3) written by two processes: the same features
        np.testing.assert_array_equal(store.features(m), reference.store.features(m))
        torch.testing.assert_close(store.load_kernel(m)["xtx"], reference.store.load_kernel(m)["xtx"])


def test_principal_factors_from_tokens_gathered_across_processes_are_the_single_process_ones(tmp_path):
    """gpt2's 3 sample rows hold fewer tokens than its MLP is wide: at the second checkpoint the MLP's sides take
    their principal factors from the tokens, gathered from both processes (batches of one row: two to the first,
    one to the second; ``hf_trak.run.side_samples``), and get the one-process factors (to float32 rounding: the
    processes run one thread each, the reference two). A side missing a process's tokens would be another factor.
    With one thread, as each launched process has, the reference gives the launch's scores to 1e-6 of the largest
    (with two threads they differ by about 1e-4: float32 rounding, amplified by the kernels' conditioning)."""
    process = _torchrun(tmp_path / "store", tmp_path, 23, "gpt2", 1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-4000:]
    reference = _single_process(23, "gpt2", batch_size=1).store.principal_factors(1)
    factors = FeatureStore.load(str(tmp_path / "store")).principal_factors(1)
    assert factors.keys() == reference.keys()
    assert {"transformer.h.0.mlp.c_fc.weight/cols", "transformer.h.0.mlp.c_proj.weight/rows"} <= factors.keys()
    for name in factors:
        torch.testing.assert_close(factors[name], reference[name], rtol=0, atol=1e-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _single_process(23, "gpt2", batch_size=1).score(MODELS["gpt2"][1](7, seed=1))
    finally:
        torch.set_num_threads(threads)
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def _wait_for_six_shards(process, store) -> None:
    """Until the launch has written 6 shard files of checkpoint 0, still running (to be killed mid-run)."""
    shard_dir = store / "checkpoint-0"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if shard_dir.is_dir() and len([f for f in os.listdir(shard_dir) if f.endswith(".arrow")]) >= 6:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the launch finished before it could be killed"


def _assert_the_next_launch_resumes_to_the_single_process_features(store, tmp_path) -> None:
    """The killed launch left the store incomplete; the next one completes it to the one-process features."""
    assert not FeatureStore.load(str(store)).is_complete()
    resumed = _torchrun(store, tmp_path, 400, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-4000:]
    reference = _single_process(400)
    for m in range(2):
        np.testing.assert_array_equal(FeatureStore.load(str(store)).features(m), reference.store.features(m))


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_a_killed_launch_is_resumed_by_the_next(tmp_path):
    store = tmp_path / "store"
    process = _torchrun(
        store, tmp_path, 400, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_six_shards(process, store)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _assert_the_next_launch_resumes_to_the_single_process_features(store, tmp_path)


def test_distributed_example_runs_under_torchrun(tmp_path):
    command = [
        *TORCHRUN,
        "examples/distributed_attribution.py",
        "--save-dir",
        str(tmp_path / "store"),
        "--proj-dim",
        "128",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) featurized 400 examples" in result.stdout
    assert FeatureStore.load(str(tmp_path / "store")).is_complete()


ATTRIBUTE_SCRIPT = textwrap.dedent("""
    import os, sys, numpy as np
    import hf_trak
    from hf_trak.testing.datasets import token_sequences
    from hf_trak.testing.models import tiny_bert, word_tokenizer
    from hf_trak.testing.processes import register_exit_probe
    store, out, streamed = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed"
    register_exit_probe(out)
    raw = lambda n, seed: token_sequences(n, seed=seed).select_columns(["text", "labels"])
    train = raw(13, 0).to_iterable_dataset(num_shards=2) if streamed else raw(13, 0)  # a stream: spooled once
    # no Accelerator: TRAKer counts the launch's processes itself (with cpu=True on this machine)
    result = hf_trak.attribute(tiny_bert(), train, raw(5, 1), processor=word_tokenizer(), k=3, proj_dim=16,
                               save_dir=store, shard_size=4)
    if os.environ["RANK"] == "0":
        np.save(out + "/scores.npy", result.scores)
        result.top_k.save_to_disk(out + "/top_k")
    else:
        assert result.scores is None and result.top_k is None
""")


@pytest.mark.parametrize("train", ["materialized", "streamed"])
def test_attribute_under_torchrun_equals_one_process(tmp_path, train):
    """Without an Accelerator, on CPU: accelerate's ``PartialState()`` would count one process in each
    (``hf_trak.run.processes.process_state`` makes it with ``cpu=True``). A streamed train split is read into
    its files by the main process, then by the other from them."""
    script = tmp_path / "attribute.py"
    script.write_text(ATTRIBUTE_SCRIPT)
    done = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path / "store"), str(tmp_path), train],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_gloo_threads_joined_at_exit(tmp_path)

    def raw(n, seed):
        return token_sequences(n, seed=seed).select_columns(["text", "labels"])

    single = attribute(tiny_bert(), raw(13, 0), raw(5, 1), processor=word_tokenizer(), k=3, proj_dim=16)
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_allclose(scores, single.scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    assert load_from_disk(str(tmp_path / "top_k"))["train_index"] == single.top_k["train_index"]
    assert os.path.isdir(tmp_path / "store-rows" / "train") == (train == "streamed")


def test_an_accelerator_counting_one_process_in_a_launch_of_two_is_refused(tmp_path):
    """``Accelerator()`` without ``cpu=True`` on a machine without GPU initializes torch.distributed with two
    processes but counts one: each would featurize everything alone into the same store."""
    script = tmp_path / "one_of_two.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        from accelerate import Accelerator
        from hf_trak import TRAKer
        from hf_trak.testing.models import tiny_bert
        accelerator = Accelerator()
        TRAKer(tiny_bert(), proj_dim=16, save_dir=sys.argv[1], accelerator=accelerator)
    """)
    )
    done = subprocess.run([*TORCHRUN, str(script), str(tmp_path / "store")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0
    assert "accelerate counts 1 process(es) but torch.distributed has 2" in done.stderr
    assert "Accelerator(cpu=True)" in done.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_one_killed_process_stops_the_launch_with_a_named_error_and_a_rerun_resumes(tmp_path):
    """SIGKILL one of the two processes mid-featurize: the other stops within seconds, saying why
    (``ProcessFailedError``) instead of waiting in a collective, and the next launch resumes to the exact features."""
    store = tmp_path / "store"
    process = _torchrun(store, tmp_path, 400, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_six_shards(process, store)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    start = time.time()
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode != 0 and time.time() - start < 60
    assert "ProcessFailedError: This process was stopped (SIGTERM): another process of the launch ended" in output
    _assert_the_next_launch_resumes_to_the_single_process_features(store, tmp_path)
