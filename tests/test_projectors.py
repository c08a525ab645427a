import numpy as np
import pytest
import torch

from hf_trak import TRAKer
from hf_trak.method.projectors import IdentityProjector, RandomProjector, make_projector
from hf_trak.testing.datasets import digits, lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_gpt2, tiny_vit

NUMELS = {"a.weight": 3000, "b.weight": 1000, "b.bias": 7}
CPU = torch.device("cpu")


def _random_grads(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch_size, numel, generator=generator) for name, numel in NUMELS.items()}


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_same_seed_same_projection_other_seed_or_checkpoint_differs(kind):
    grads = _random_grads(4)
    first = RandomProjector(NUMELS, 64, kind, seed=3, device=CPU).project(grads, model_id=0)
    again = RandomProjector(NUMELS, 64, kind, seed=3, device=CPU, max_cache_bytes=0).project(grads, model_id=0)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    other_seed = RandomProjector(NUMELS, 64, kind, seed=4, device=CPU).project(grads, model_id=0)
    other_checkpoint = RandomProjector(NUMELS, 64, kind, seed=3, device=CPU).project(grads, model_id=1)
    assert not torch.allclose(first, other_seed) and not torch.allclose(first, other_checkpoint)


def test_rademacher_entries_are_balanced_signs():
    block = RandomProjector({"w": 20000}, 64, "rademacher", seed=0, device=CPU).block(0, "w", 0)
    assert set(block.unique().tolist()) == {-1.0, 1.0}
    assert abs(block.mean().item()) < 0.01  # 1.28M signs: std of the mean is 0.0009


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_norms_and_inner_products_are_preserved_within_jl_bounds(kind):
    k = 2048
    projector = RandomProjector(NUMELS, k, kind, seed=0, device=CPU)
    grads = _random_grads(20, seed=1)
    flat = torch.cat([grads[name] for name in NUMELS], dim=1).double()
    projected = projector.project(grads, model_id=0).double() / np.sqrt(k)
    # relative error of a squared norm has std sqrt(2/k) = 0.031; 0.16 is 5 std.
    norm_ratio = projected.norm(dim=1) ** 2 / flat.norm(dim=1) ** 2
    assert (norm_ratio - 1).abs().max() < 0.16
    inner_error = (projected @ projected.T - flat @ flat.T).abs()
    assert (inner_error / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None])).max() < 0.16


def test_chunked_projection_equals_unchunked():
    projector = RandomProjector(NUMELS, 32, "rademacher", seed=0, device=CPU)
    projector.segment_numel = 700  # several segments per parameter
    grads = _random_grads(5)
    whole = projector.project(grads, model_id=0)
    parts = sum(projector.project({name: grad}, model_id=0) for name, grad in grads.items())
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-4)


def test_identity_projector_concatenates_gradients():
    grads = _random_grads(3)
    out = IdentityProjector(NUMELS, CPU).project(grads, model_id=0)
    torch.testing.assert_close(out, torch.cat([grads[name] for name in NUMELS], dim=1))


@pytest.mark.parametrize(
    "make_model,make_data", [(tiny_vit, lambda: digits(13)), (tiny_bert, lambda: token_sequences(13))]
)
def test_features_do_not_depend_on_batch_size_or_parameter_chunks(make_model, make_data):
    model, data = make_model(), make_data()
    reference = torch.as_tensor(
        TRAKer(model, proj_dim=40, save_dir=None, dtype=torch.float32, shard_size=5)
        .featurize(data, [model.state_dict()], batch_size=13)
        .store.features(0)
    )
    for batch_size, chunk in [(1, None), (5, None), (4, 150)]:
        traker = TRAKer(model, proj_dim=40, save_dir=None, dtype=torch.float32, param_chunk_numel=chunk)
        if chunk is not None:
            assert len(traker.feature_map.projector.gradients.chunks) > 3
        features = torch.as_tensor(
            traker.featurize(data, [model.state_dict()], batch_size=batch_size).store.features(0)
        )
        torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("proj_dim", [0, -3, None])
def test_non_positive_proj_dim_is_refused(proj_dim):
    with pytest.raises(ValueError, match="proj_dim must be a positive integer"):
        make_projector("rademacher", NUMELS, proj_dim, 0, CPU)
    with pytest.raises(ValueError, match="proj_dim must be 'auto' or a positive integer"):
        TRAKer(tiny_vit(), proj_dim=proj_dim, save_dir=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["vit", "gpt2"])  # gpt2: hf_trak's principal factors, made on the device
def test_cuda_features_equal_cpu_features(case):
    model, data = (tiny_vit(), digits(9)) if case == "vit" else (tiny_gpt2(), lm_sequences(9))
    cpu = TRAKer(model, proj_dim=64, save_dir=None, dtype=torch.float32, device="cpu").featurize(
        data, [model.state_dict()]
    )
    cuda = TRAKer(model, proj_dim=64, save_dir=None, dtype=torch.float32, device="cuda").featurize(
        data, [model.state_dict()]
    )
    np.testing.assert_allclose(cuda.store.features(0), cpu.store.features(0), rtol=1e-3, atol=1e-4)
