"""An FSDP2-sharded model (``fully_shard``, gloo on CPU, ``torchrun --nproc_per_node 2``) featurizes and scores to
the unsharded model's one-process result (``hf_trak.hf.sharding``), and what it cannot do is refused by name."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hf_trak import TRAKer, attribute
from hf_trak.store.feature_store import FeatureStore
from hf_trak.testing.datasets import lm_sequences
from hf_trak.testing.models import tiny_gpt2
from hf_trak.testing.processes import subprocess_env

pytestmark = pytest.mark.slow  # every test here starts processes

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SETTINGS = {"spectrum": {}, "by_size": {"block_sizes": "by_size"}}  # by size: the principal factors' own pass

# The model is sharded by accelerate's own FSDP2 code (fsdp_version=2, transformer_based_wrap), the function its
# prepare() calls on GPUs (accelerate applies FSDP on GPUs only): each block, the embedding, the tail and the root.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    import torch
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from hf_trak import TRAKer, attribute
    from hf_trak.errors import InvalidArgumentError
    from hf_trak.testing.datasets import lm_sequences
    from hf_trak.testing.models import tiny_gpt2
    out = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["GPT2Block"])
    rank = accelerator.process_index

    def refused(name, call):
        try:
            call()
        except InvalidArgumentError as error:
            with open(f"{out}/refused-{name}-{rank}.txt", "w") as file:
                file.write(str(error))

    half = tiny_gpt2()
    for block in half.transformer.h:
        fully_shard(block)  # the blocks only, not the model
    refused("half", lambda: TRAKer(half, proj_dim=32, save_dir=None))
    model = fsdp2_prepare_model(accelerator, tiny_gpt2())
    assert isinstance(model.transformer.h[0], FSDPModule) and isinstance(model, FSDPModule)
    refused("dense", lambda: TRAKer(model, proj_dim=32, projector="rademacher", save_dir=None))
    targets, one = lm_sequences(5, seed=1), lm_sequences(1, seed=2)
    for name, settings in SETTINGS.items():
        store = f"{out}/store-{name}"
        traker = TRAKer(model, proj_dim=32, save_dir=store, shard_size=4, accelerator=accelerator, **settings)
        traker.featurize(lm_sequences(11), [model], batch_size=3)  # 3 shards: 2 to the first process, 1 to the other
        scores = traker.score(targets, batch_size=2)  # 3 targets to the first process, 2 to the other
        top = traker.top_k(one, k=3)  # one target: none to the second process
        self_scores = traker.self_scores()
        loaded = TRAKer.from_pretrained(store, model).top_k(one, k=3)  # checks the fingerprint
        if accelerator.is_main_process:
            found = dict(scores=scores, top=top.indices, self_scores=self_scores, loaded=loaded.indices)
            np.savez(f"{out}/{name}.npz", **found)
        else:
            assert scores is None and top is None and loaded is None
    refused("tokens", lambda: traker.score_tokens(one, k=2))
    found = attribute(model, lm_sequences(11), targets, k=3, proj_dim=32, save_dir=f"{out}/store-attribute",
                      shard_size=4, batch_size=3, accelerator=accelerator)
    if accelerator.is_main_process:
        np.save(f"{out}/attribute-scores.npy", found.scores)
        np.save(f"{out}/attribute-top.npy", np.asarray(found.top_k["train_index"]))
    mixed, policy = tiny_gpt2(), MixedPrecisionPolicy(param_dtype=torch.bfloat16)  # float32 weights, bf16 passes
    for block in mixed.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(mixed, mp_policy=policy)
    traker = TRAKer(mixed, proj_dim=32, save_dir=f"{out}/store-bf16", shard_size=4, accelerator=accelerator)
    scores = traker.featurize(lm_sequences(11), [mixed], batch_size=3).score(targets, batch_size=2)
    if accelerator.is_main_process:
        np.save(f"{out}/bf16-scores.npy", scores)
    refused("state_dict", lambda: TRAKer(model, proj_dim=32, save_dir=f"{out}/store-state-dict").featurize(
        lm_sequences(4), [model.state_dict()], batch_size=2))
""").replace("SETTINGS", repr(SETTINGS))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([*TORCHRUN, str(script), str(out)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_an_fsdp_sharded_model_gives_the_unsharded_features_and_scores(launched, name):
    """Each layer's inputs and output gradients are whole on every process under FSDP, so the features are the
    unsharded model's bit for bit, whichever process made which shard, though the processes ran different numbers
    of batches (the one with fewer adds passes to keep FSDP's gathers in step); the scores, top-k and
    self-influence are the one-process ones, and so is the fingerprint of the weights (gathered whole), which
    ``from_pretrained`` checks at the sharded model."""
    plain = tiny_gpt2()
    reference = TRAKer(plain, proj_dim=32, save_dir=None, shard_size=4, **SETTINGS[name])
    reference.featurize(lm_sequences(11), [plain], batch_size=3)
    store = FeatureStore.load(str(launched / f"store-{name}"))
    np.testing.assert_array_equal(store.features(0), reference.store.features(0))
    assert store.config.checkpoint_fingerprints == reference.store.config.checkpoint_fingerprints
    assert store.config.block_shapes == reference.store.config.block_shapes
    assert reference.config.principal_share > 0  # the causal-LM default: principal factors, from a sample pass
    found = np.load(launched / f"{name}.npz")
    expected = reference.score(lm_sequences(5, seed=1), batch_size=2)
    np.testing.assert_allclose(found["scores"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(found["top"], reference.top_k(lm_sequences(1, seed=2), k=3).indices)
    np.testing.assert_array_equal(found["loaded"], found["top"])  # from_pretrained at the sharded model
    np.testing.assert_allclose(found["self_scores"], reference.self_scores(), rtol=1e-5, atol=1e-7)


def test_attribute_takes_a_sharded_model(launched):
    """``hf_trak.attribute(model, ...)`` with the sharded model (its one checkpoint) gives the unsharded model's
    scores and proponents."""
    plain = tiny_gpt2()
    expected = attribute(plain, lm_sequences(11), lm_sequences(5, seed=1), k=3, proj_dim=32, shard_size=4,
                         batch_size=3)  # fmt: skip
    scores = np.load(launched / "attribute-scores.npy")
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-6 * np.abs(expected.scores).max())
    np.testing.assert_array_equal(np.load(launched / "attribute-top.npy"), np.asarray(expected.top_k["train_index"]))


def test_a_mixed_precision_policy_gives_the_features_of_the_model_in_that_precision(launched):
    """Under ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` (what accelerate's FSDP2 sets for
    ``mixed_precision="bf16"``) the passes run in bf16: the features are those of the unsharded model cast to
    bf16, bit for bit, and so are its scores (to float32 rounding)."""
    plain = tiny_gpt2().to(torch.bfloat16)
    reference = TRAKer(plain, proj_dim=32, save_dir=None, shard_size=4)
    reference.featurize(lm_sequences(11), [plain], batch_size=3)
    store = FeatureStore.load(str(launched / "store-bf16"))
    np.testing.assert_array_equal(store.features(0), reference.store.features(0))
    expected = reference.score(lm_sequences(5, seed=1), batch_size=2)
    found = np.load(launched / "bf16-scores.npy")
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize(
    "name, says",
    [
        ("half", "otherwise than by FSDP2 on the whole model"),
        ("dense", "factored projector alone"),
        ("tokens", "Per-token scores needs the whole model"),
        ("state_dict", "pass checkpoints=[model]"),
    ],
)
def test_what_a_sharded_model_cannot_do_is_refused_with_the_fix(launched, name, says):
    """Blocks sharded without the model, a projector that needs whole per-example gradients, a pass that would run
    under vmap or on one process, and checkpoints other than the model's own weights: a named error on every
    process, not a hang."""
    for rank in (0, 1):
        assert says in (launched / f"refused-{name}-{rank}.txt").read_text()
    assert not (launched / "store-state-dict").exists()  # refused before any work
