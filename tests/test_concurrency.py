"""Several processes on one store: featurizations take turns (a lock that records its owner and dies with it),
scoring sees the finished store or a named error, never a mix; and a full disk is a named error that a rerun with
space recovers from, to the same bytes."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from hf_trak import DiskFullError, StoreLockedError, TRAKer
from hf_trak.run.featurize import _expected_bytes
from hf_trak.store import lock
from hf_trak.testing.datasets import digits, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_vit
from hf_trak.testing.processes import subprocess_env

pytestmark = pytest.mark.slow
SETTINGS = dict(proj_dim=32, shard_size=16)
SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import digits
    from hf_trak.testing.models import perturbed_state_dict, tiny_vit
    action, root, out = sys.argv[1:4]
    model = tiny_vit()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    if action == "featurize":
        TRAKer(model, save_dir=root, proj_dim=32, shard_size=16).featurize(digits(96), checkpoints, batch_size=8)
    elif action == "overwrite":  # other settings: the store is replaced
        TRAKer(model, save_dir=root, proj_dim=48, shard_size=16, overwrite=True).featurize(digits(96), checkpoints,
                                                                                            batch_size=8)
    elif action == "hold":  # hold the lock until killed
        from hf_trak.store import lock
        with lock.writing(root):
            print("holding", flush=True)
            import time; time.sleep(600)
    elif action == "score":
        try:
            scores = TRAKer.from_pretrained(root, model, checkpoints).score(digits(4, offset=200))
            np.save(out, scores)
        except Exception as error:
            print(type(error).__name__, error)
""")


def _reference(tmp_path):
    model = tiny_vit()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, save_dir=str(tmp_path / "reference"), **SETTINGS)
    traker.featurize(digits(96), checkpoints, batch_size=8)
    return model, checkpoints, traker.score(digits(4, offset=200))


def _start(tmp_path, *arguments):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *arguments], env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _wait_for_holder(process) -> None:
    assert process.stdout.readline().strip() == "holding", process.stderr.read()


def test_a_held_store_is_waited_for_or_refused_naming_its_owner(tmp_path):
    model, checkpoints, expected = _reference(tmp_path)
    root = str(tmp_path / "store")
    holder = _start(tmp_path, "hold", root, "-")
    _wait_for_holder(holder)
    try:
        start = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"being featurized by process {holder.pid} on .*waited 0.5 s"):
            TRAKer(model, save_dir=root, lock_timeout=0.5, **SETTINGS).featurize(digits(96), checkpoints)
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (SIGKILL): its lock went with it, and the next run takes the store over at once.
    assert holder.returncode == -signal.SIGKILL
    traker = TRAKer(model, save_dir=root, lock_timeout=0, **SETTINGS).featurize(digits(96), checkpoints, batch_size=8)
    np.testing.assert_array_equal(traker.score(digits(4, offset=200)), expected)
    assert f'"pid": {os.getpid()}' in open(os.path.join(root, lock.LOCK_NAME)).read()  # the owner now recorded


def test_two_featurizations_started_together_take_turns(tmp_path):
    """Repeated: both exit 0, and the store scores exactly as one run's (no shard written twice half-way)."""
    _, _, expected = _reference(tmp_path)
    for attempt in range(3):
        root = str(tmp_path / f"store-{attempt}")
        processes = [_start(tmp_path, "featurize", root, "-") for _ in range(2)]
        for process in processes:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]
        scorer = _start(tmp_path, "score", root, str(tmp_path / f"scores-{attempt}.npy"))
        out, err = scorer.communicate(timeout=600)
        assert scorer.returncode == 0 and not out.strip(), (out, err[-3000:])
        np.testing.assert_array_equal(np.load(tmp_path / f"scores-{attempt}.npy"), expected)


def test_scoring_during_a_featurization_gets_the_finished_store_or_a_named_error(tmp_path):
    """A store being replaced (overwrite, other settings) while another process scores it: the scores are the old
    store's or the new one's, or the scorer says the store is incomplete or was featurized again; never a mix."""
    model, checkpoints, old = _reference(tmp_path)
    new = TRAKer(model, save_dir=str(tmp_path / "new"), **{**SETTINGS, "proj_dim": 48})
    new = new.featurize(digits(96), checkpoints, batch_size=8).score(digits(4, offset=200))
    outcomes = []
    for attempt in range(3):
        root = str(tmp_path / f"store-{attempt}")
        shutil.copytree(tmp_path / "reference", root)
        out = str(tmp_path / f"scores-{attempt}.npy")
        writer, scorer = _start(tmp_path, "overwrite", root, "-"), _start(tmp_path, "score", root, out)
        said, err = scorer.communicate(timeout=600)
        assert scorer.returncode == 0, err[-3000:]
        assert writer.wait(timeout=600) == 0, writer.stderr.read()[-3000:]
        if os.path.exists(out):
            scores = np.load(out)
            assert np.array_equal(scores, old) or np.array_equal(scores, new), "a mix of the two stores"
            outcomes.append("old scores" if np.array_equal(scores, old) else "new scores")
        else:
            assert said.split()[0] in ("IncompleteStoreError", "StoreMismatchError"), said
            outcomes.append(said.split()[0])
    assert len(outcomes) == 3


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk`` (root only), grown with ``grow()``; unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_a_named_error_and_a_rerun_with_space_gives_the_same_bytes(tmp_path, small_disk):
    disk, grow = small_disk
    model = tiny_vit()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    settings = dict(proj_dim=256, shard_size=64, dtype="float32")
    reference = TRAKer(model, save_dir=str(tmp_path / "reference"), **settings).featurize(digits(600), checkpoints)
    root = str(disk / "store")
    with pytest.raises(DiskFullError, match=r"No space left on the device writing .*store.* The complete store needs "
                                            r"about \d+\.\d MiB") as raised:  # fmt: skip
        TRAKer(model, save_dir=root, **settings).featurize(digits(600), checkpoints)
    assert "featurize again" in str(raised.value)
    assert not [name for _, _, names in os.walk(root) for name in names if ".tmp-" in name]  # nothing half-written
    grow()
    resumed = TRAKer(model, save_dir=root, **settings).featurize(digits(600), checkpoints)
    np.testing.assert_array_equal(resumed.score(digits(8, offset=600)), reference.score(digits(8, offset=600)))
    for model_id in range(2):
        np.testing.assert_array_equal(resumed.store.features(model_id), reference.store.features(model_id))


@pytest.mark.parametrize("kernel_from", ["auto", "tokens", "examples"])
def test_the_full_disk_message_states_the_size_of_the_complete_store(tmp_path, kernel_from):
    """``_expected_bytes``, the size the full-disk message names, against the bytes a complete store takes: within
    5% for mixed kernels from the Kronecker factors alone (the default here), per-token kernels and kernels from
    the examples."""
    model = tiny_bert()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=512, shard_size=100, save_dir=str(tmp_path / "s"), kernel_from=kernel_from)
    traker.featurize(token_sequences(300), checkpoints)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(tmp_path / "s") for f in names)
    expected = _expected_bytes(traker.config, traker.feature_map, 300, len(checkpoints))
    assert 0.95 < expected / written < 1.05, (expected, written)
