"""Push to and load from the Hub protocol, with the real huggingface_hub and datasets clients.

The clients read ``HF_ENDPOINT`` when imported, so each side runs in its own process with
its own empty cache, pointed at the loopback server of ``tests/hub_server.py``.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.hub_server import HubServer

PUSH = textwrap.dedent("""
    import sys, numpy as np
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import digits, token_sequences
    from hf_trak.testing.models import perturbed_state_dict, tiny_bert
    out = sys.argv[1]
    model = tiny_bert()
    traker = TRAKer(model, proj_dim=24, save_dir=out + "/store", shard_size=8)
    traker.featurize(token_sequences(20), [model.state_dict()], batch_size=6)
    scores = traker.score(token_sequences(4, seed=1))
    traker.save_scores(scores, "test")
    print(traker.push_to_hub("someone/bert-trak"))
    np.save(out + "/scores.npy", scores)
    np.save(out + "/features.npy", traker.store.features(0))
""")

LOAD = textwrap.dedent("""
    import sys, numpy as np, torch
    from datasets import load_dataset
    from huggingface_hub import HfFileSystem
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import token_sequences
    from hf_trak.testing.models import tiny_bert
    out = sys.argv[1]
    traker = TRAKer.from_hub("someone/bert-trak", model=tiny_bert())
    np.save(out + "/hub_scores.npy", traker.score(token_sequences(4, seed=1)))
    features = load_dataset("someone/bert-trak", "checkpoint-0", split="train").with_format("numpy")
    np.save(out + "/hub_features.npy", np.stack(features["features"]))
    scores = load_dataset("someone/bert-trak", "scores-test", split="train").with_format("numpy")
    np.save(out + "/hub_saved_scores.npy", np.stack(scores["scores"]).T)
    with HfFileSystem().open("datasets/someone/bert-trak/trak_config.json", "rb", block_size=16) as file:
        file.seek(10)
        open(out + "/config_slice.bin", "wb").write(file.read(20))
    try:
        TRAKer.from_hub("someone/bert-trak", model=tiny_bert(seed=7))
    except ValueError as error:
        print("REFUSED:", error)
""")


@pytest.fixture
def hub(tmp_path):
    with HubServer() as server:
        yield server


def _run(script, out, hub, home):
    env = hub.client_env(home)
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_push_to_hub_then_from_hub_on_a_clean_cache(hub, tmp_path):
    pushed = _run(PUSH, tmp_path, hub, tmp_path / "pusher-home")
    assert "/datasets/someone/bert-trak/commit/" in pushed
    repo = hub.state.repos["someone/bert-trak"]
    assert "README.md" in repo["files"] and "trak_config.json" in repo["files"]
    assert all(path in repo["lfs"] for path in repo["files"] if path.endswith((".arrow", ".safetensors")))
    card = repo["files"]["README.md"].decode()
    assert 'TRAKer.from_hub("someone/bert-trak"' in card and "config_name: checkpoint-0" in card

    loaded = _run(LOAD, tmp_path, hub, tmp_path / "loader-home")  # a different, empty cache
    np.testing.assert_array_equal(np.load(tmp_path / "hub_scores.npy"), np.load(tmp_path / "scores.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "hub_features.npy"), np.load(tmp_path / "features.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "hub_saved_scores.npy"), np.load(tmp_path / "scores.npy"))
    config = open(tmp_path / "store" / "trak_config.json", "rb").read()
    assert open(tmp_path / "config_slice.bin", "rb").read() == config[10:30]
    assert any(path == "trak_config.json" for path, _ in hub.state.ranges)
    assert "REFUSED:" in loaded and "other weights" in loaded


PUSH_LM = textwrap.dedent("""
    import sys, numpy as np
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import lm_sequences
    from hf_trak.testing.models import tiny_gpt2
    out = sys.argv[1]
    model = tiny_gpt2()
    traker = TRAKer(model, proj_dim=64, save_dir=out + "/store", shard_size=8)
    assert traker.config.principal_share > 0  # hf_trak's causal-LM default: factors made from the data
    traker.featurize(lm_sequences(20), [model.state_dict()], batch_size=6)
    traker.push_to_hub("someone/gpt2-trak")
    np.save(out + "/scores.npy", traker.score(lm_sequences(4, seed=1)))
""")

LOAD_LM = textwrap.dedent("""
    import sys, numpy as np
    from hf_trak import TRAKer
    from hf_trak.testing.datasets import lm_sequences
    from hf_trak.testing.models import tiny_gpt2
    traker = TRAKer.from_hub("someone/gpt2-trak", model=tiny_gpt2())
    np.save(sys.argv[1] + "/hub_scores.npy", traker.score(lm_sequences(4, seed=1)))
""")


@pytest.mark.slow
def test_a_causal_lm_store_travels_with_its_principal_factors(hub, tmp_path):
    """The factors that projected the train rows are files of the repo: a clean cache scores the same."""
    _run(PUSH_LM, tmp_path, hub, tmp_path / "pusher-home")
    assert "checkpoint-0/principal-factors.safetensors" in hub.state.repos["someone/gpt2-trak"]["files"]
    _run(LOAD_LM, tmp_path, hub, tmp_path / "loader-home")
    np.testing.assert_array_equal(np.load(tmp_path / "hub_scores.npy"), np.load(tmp_path / "scores.npy"))
