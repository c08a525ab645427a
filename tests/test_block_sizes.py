"""``block_sizes="spectrum"``: k divided among the factored matrices by their gradients' spectra
(``hf_trak.method.block_sizes``), made once per store at the first checkpoint and recorded."""

import numpy as np
import pytest
import torch

import hf_trak.method.block_sizes
import hf_trak.run.block_shapes
from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.errors import InvalidArgumentError
from hf_trak.method.block_sizes import (
    FULL_SPECTRUM_SIDE,
    LEADING_EIGENVALUES,
    MAX_SIDE_DIMS,
    SideSample,
    side_spectrum,
    spectrum_shapes,
)
from hf_trak.method.factored_sizes import Target
from hf_trak.run.side_samples import BatchMoments
from hf_trak.testing.datasets import lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2


def test_side_spectrum_is_the_share_of_the_trace_in_the_leading_eigenvalues():
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    moment = rotation @ torch.diag(torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)) @ rotation.T
    np.testing.assert_allclose(side_spectrum(moment)[0], [0.75, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(side_spectrum(torch.tensor([2.0, 0.0, 6.0]))[0], [0.75, 1.0, 1.0])  # id counts
    np.testing.assert_array_equal(side_spectrum(torch.zeros(2, 2))[0], [1.0, 1.0])  # a side no token reached
    dim = FULL_SPECTRUM_SIDE + 100  # a large side: its leading eigenvalues, the rest spread evenly
    spectrum = (100 * 0.9 ** torch.arange(dim) + 0.01).double()
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[
        0
    ]
    energy, vectors = side_spectrum(rotation @ torch.diag(spectrum) @ rotation.T)
    exact = (spectrum.cumsum(0) / spectrum.sum()).numpy()
    assert len(energy) == dim and energy[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(energy[:LEADING_EIGENVALUES], exact[:LEADING_EIGENVALUES], atol=2e-3)
    step = (1 - energy[LEADING_EIGENVALUES - 1]) / (dim - LEADING_EIGENVALUES)
    np.testing.assert_allclose(np.diff(energy[LEADING_EIGENVALUES - 1 :]), step, rtol=1e-6)
    exact = rotation[:, :8].float()  # the leading eigenvectors come along, for the principal factors
    assert vectors.shape == (dim, LEADING_EIGENVALUES)
    torch.testing.assert_close(vectors[:, :8] @ vectors[:, :8].T, exact @ exact.T, atol=1e-4, rtol=0)


def test_spectrum_shapes_spend_the_budget_where_it_keeps_the_most():
    flat = np.arange(1, 9) / 8  # energy spread evenly over 8 directions
    energy = {("a", "rows"): np.ones(8), ("a", "cols"): flat, ("b", "rows"): flat, ("b", "cols"): flat}
    shapes = spectrum_shapes([Target("a", 8, 8), Target("b", 8, 8)], energy, 20)
    assert shapes["a"] == (1, 8)  # all of a's energy within 1 × 8 dimensions: no second row
    left = 20 - sum(r * c for r, c in shapes.values())
    assert left >= 0 and not any(r < 8 and c <= left or c < 8 and r <= left for r, c in shapes.values())  # none fits
    whole = spectrum_shapes([Target("a", 8, 8), Target("c", 2, 3)], {("a", "rows"): np.ones(8)}, 100)
    assert whole == {"a": (8, 8), "c": (2, 3)}  # enough for both whole (c without measurement: k/d)


def test_no_side_gets_more_than_max_side_dims_however_flat_its_spectrum():
    wide = 4 * MAX_SIDE_DIMS  # one row, a flat spectrum: every dimension of it gains alike, 1/wide
    energy = {("a", "rows"): np.ones(1), ("a", "cols"): np.arange(1, wide + 1) / wide}
    energy.update({("b", side): np.arange(1, 9) / 8 for side in ("rows", "cols")})
    targets, budget = [Target("a", 1, wide), Target("b", 8, 8)], 2 * MAX_SIDE_DIMS
    assert spectrum_shapes(targets, energy, budget) == {"a": (1, MAX_SIDE_DIMS), "b": (8, 8)}
    with pytest.MonkeyPatch.context() as patch:  # without the cap the flat side takes the rest of the budget
        patch.setattr(hf_trak.method.block_sizes, "MAX_SIDE_DIMS", wide)
        assert spectrum_shapes(targets, energy, budget)["a"] == (1, budget - 64)


def _measured_again(traker, model, train, fraction):
    """(Moments, leading eigenvectors, shapes) recomputed from the tokens of the same rows, through the projector
    directly (a second path)."""
    projector = traker.feature_map.projector
    weights = projector.weights()
    rows = np.unique(np.linspace(0, len(train) - 1, int(np.ceil(fraction * len(train)))).round().astype(int))
    view = traker.feature_map.at(model.state_dict(), 0)
    source = ExampleSource.for_model(train, model, traker.task)
    samples = {}
    for name, tokens in view.side_tokens(
        source.batch(rows.tolist()), [(t, s) for t in weights for s in ("rows", "cols")]
    ):
        samples.setdefault(name, SideSample()).add(tokens)
    spectra = {name: sample.spectrum() for name, sample in samples.items()}
    energy = {tuple(name.split("/")): found[0] for name, found in spectra.items()}
    leading = {name: found[1] for name, found in spectra.items() if found[1] is not None}
    moments = {name: sample.dense() for name, sample in samples.items()}
    return moments, leading, spectrum_shapes(weights, energy, sum(t.size for t in weights))


@pytest.mark.parametrize("make_model,data", [(tiny_gpt2, lm_sequences), (tiny_bert, token_sequences)])
def test_spectrum_shapes_are_recorded_and_scored_with(make_model, data, tmp_path, monkeypatch):
    model, train, targets = make_model(), data(30), data(3, seed=1)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    by_size = TRAKer(model, proj_dim=96, block_sizes="by_size")
    traker = TRAKer(model, proj_dim=96, save_dir=str(tmp_path / "s"), dtype=torch.float32)
    assert traker.config.block_sizes == "spectrum" and not traker.config.block_shapes
    traker.featurize(train, checkpoints)
    recorded = traker.config.block_shapes
    fraction = traker.config.principal_fraction or hf_trak.run.block_shapes.SAMPLE_FRACTION
    moments, leading, expected = _measured_again(traker, model, train, fraction)
    assert recorded == {name: list(shape) for name, shape in expected.items()}
    sizes = {t.name: [t.k_rows, t.k_cols] for t in by_size.feature_map.projector.weights()}
    assert recorded != sizes and sum(a * b for a, b in recorded.values()) <= sum(a * b for a, b in sizes.values())
    assert traker.config.feature_dim == sum(size for _, size in traker.config.kernel_blocks) == traker.feature_map.dim
    if traker.config.principal_share:  # checkpoint 0's factors from the moments and eigenvectors of the sizes
        factors = traker.feature_map.projector.principal_factors(0, moments, leading)
        stored = traker.store.principal_factors(0)
        assert factors.keys() == stored.keys() and all(
            torch.allclose(factors[n], stored[n], atol=1e-5) for n in factors
        )
    scores = traker.score(targets)
    monkeypatch.setattr(hf_trak.run.block_shapes, "_measured", lambda *a: pytest.fail("measured again"))
    loaded = TRAKer.from_pretrained(str(tmp_path / "s"), model, checkpoints)
    np.testing.assert_array_equal(loaded.score(targets), scores)
    resumed = TRAKer(model, proj_dim=96, save_dir=str(tmp_path / "s"), dtype=torch.float32)
    np.testing.assert_array_equal(resumed.featurize(train, checkpoints).score(targets), scores)  # the shapes reused


def test_block_sizes_follow_the_estimator_and_the_store_version():
    assert TRAKer(tiny_gpt2(), proj_dim=96, estimator="trak", projector="factored").config.block_sizes == "by_size"
    assert TRAKer(tiny_gpt2(), proj_dim=96, store_version=5).config.block_sizes == "by_size"
    with pytest.raises(InvalidArgumentError, match="block_sizes='spectrum' .* projector='factored'"):
        TRAKer(tiny_gpt2(), proj_dim=96, projector="rademacher", block_sizes="spectrum")


@pytest.mark.parametrize("dim,count", [(40, 12), (FULL_SPECTRUM_SIDE + 200, FULL_SPECTRUM_SIDE + 40)])
def test_a_side_sample_of_few_tokens_has_the_spectrum_of_its_moment(dim, count):
    """Fewer tokens than dimensions: the spectrum from G = VVᵀ equals the one from F = VᵀV (E, and the leading
    eigenvectors' span); as many tokens as dimensions turn the sample into F itself."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(count, dim, generator=generator) * 0.8 ** torch.arange(dim).clamp(max=30)
    sample = SideSample()
    sample.add(tokens[: count // 2])
    sample.add(tokens[count // 2 :])
    assert sample.tokens is not None and sample.moment is None
    moment = (tokens.T @ tokens).double()
    torch.testing.assert_close(sample.dense(), moment)
    energy, vectors = sample.spectrum()
    exact_energy, exact_vectors = side_spectrum(moment)
    assert len(energy) == dim and np.all(energy[count:] == 1.0)
    top = min(LEADING_EIGENVALUES, count)
    np.testing.assert_allclose(energy[:top], exact_energy[:top], atol=2e-3)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(vectors.shape[1]), atol=1e-4, rtol=0)
    eigenvectors = torch.linalg.eigh(moment)[1].flip(1)[:, :4].float()  # well separated: 0.8^i
    torch.testing.assert_close(vectors[:, :4] @ vectors[:, :4].T, eigenvectors @ eigenvectors.T, atol=2e-3, rtol=0)
    sample.add(torch.randn(dim, dim, generator=generator))  # as many tokens as d: F from now on
    assert sample.tokens is None and sample.moment.shape == (dim, dim)


def test_a_side_sample_sums_ids_and_vectors_on_one_side():
    """A tied embedding's rows side: the embedding's id counts (F's diagonal) and the head's vectors add up."""
    counts, tokens = torch.tensor([2.0, 0.0, 5.0]), torch.tensor([[1.0, 2.0, 0.0]])
    for order in ((counts, tokens), (tokens, counts), (counts, counts)):
        sample = SideSample()
        for part in order:
            sample.add(part)
        expected = sum(torch.diag(p.double()) if p.dim() == 1 else (p.T @ p).double() for p in order)
        torch.testing.assert_close(sample.dense(), expected)
    assert sample.moment.dim() == 1  # ids alone: the diagonal only


def test_a_side_sample_of_few_tokens_gives_its_moments_leading_eigenvectors():
    """``SideSample.leading``: from n < d tokens, F's leading eigenvectors come from the n × n Gram matrix (the same
    span as eigh of F = VᵀV); None where the sample is F itself or F has fewer directions than asked for."""
    generator = torch.Generator().manual_seed(0)
    dim, count = 300, 120
    tokens = torch.randn(count, dim, generator=generator, dtype=torch.float64) * 0.9 ** torch.arange(dim).clamp(max=60)
    sample = SideSample()
    sample.add(tokens.float())
    vectors = sample.leading(40)
    assert vectors.shape == (dim, 40) and vectors.dtype == torch.float64
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(40, dtype=torch.float64), atol=1e-10, rtol=0)
    values, exact = torch.linalg.eigh(sample.dense())
    exact = exact.flip(1)[:, :10]  # well separated: 0.9^i
    torch.testing.assert_close(vectors[:, :10] @ vectors[:, :10].T, exact @ exact.T, atol=1e-6, rtol=0)
    assert sample.leading(count + 1) is None  # F's rank is at most n
    sample.add(torch.randn(dim, dim, generator=generator))  # as many tokens as d: F itself
    assert sample.leading(40) is None


def test_principal_factors_of_a_side_with_fewer_sampled_tokens_than_dimensions_come_from_the_tokens(monkeypatch):
    """A side whose factor needs more eigenvectors than its spectrum found (here: a spectrum of 1 leading eigenvalue
    past 2 dimensions), sampled with fewer tokens than it has dimensions: at the first checkpoint and at a later one
    (``hf_trak.run.side_samples``), the factor's leading part is ``SideSample.leading`` of the sample at that
    checkpoint (no d × d moment is kept for it), and spans F's leading eigenvector."""
    monkeypatch.setattr(hf_trak.method.block_sizes, "FULL_SPECTRUM_SIDE", 2)
    monkeypatch.setattr(hf_trak.method.block_sizes, "LEADING_EIGENVALUES", 1)
    model, train = tiny_gpt2(), lm_sequences(10)
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1)]
    traker = TRAKer(model, proj_dim=96, dtype=torch.float32)
    traker.featurize(train, checkpoints)
    projector, share = traker.feature_map.projector, traker.config.principal_share
    source = ExampleSource.for_model(train, model, traker.task)
    rows = hf_trak.run.block_shapes.sample_rows(traker.config.principal_fraction, len(train))
    checked = 0
    for model_id, checkpoint in enumerate(checkpoints):
        view = traker.feature_map.at(checkpoint, model_id)
        samples = {}
        for name, tokens in view.side_tokens(source.batch(rows), projector.principal_sides()):
            samples.setdefault(name, SideSample()).add(tokens)
        for target, side in projector.principal_sides():
            name = f"{target.name}/{side}"
            _, k = target.side(side)
            count = round(share * k)
            if samples[name].tokens is None or not 1 < count <= samples[name].tokens.shape[0]:
                continue
            leading = samples[name].leading(count)
            stored = traker.store.principal_factors(model_id)[name]
            torch.testing.assert_close(stored[:, :count], leading.float(), atol=1e-5, rtol=0)
            exact = torch.linalg.eigh(samples[name].dense())[1].flip(1)[:, :1].float()  # F's leading direction
            torch.testing.assert_close(stored[:, :1] @ stored[:, :1].T, exact @ exact.T, atol=1e-3, rtol=0)
            checked += 1
    assert checked >= 4


def test_a_side_sample_kept_batch_by_batch_sums_its_moment_in_batch_order():
    """``BatchMoments``: a batch's tokens are kept while all the batches hold fewer than d of them; from then on F
    is the sum of the batches' F_b in batch order, the same bits as summing them as they come."""
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(count, 12, generator=generator) for count in (3, 4, 6, 2)]
    samples = []
    for part in parts:
        sample = SideSample()
        sample.add(part)
        samples.append(sample)
    moments = BatchMoments()
    moments.add(samples[0])
    moments.add(samples[1])
    assert moments.moment is None and moments.token_count == 7
    torch.testing.assert_close(moments.tokens(), torch.cat(parts[:2]), rtol=0, atol=0)
    moments.add(samples[2])  # 13 tokens ≥ d = 12: F from now on
    moments.add(samples[3])
    assert not moments.batches
    expected = ((samples[0].dense() + samples[1].dense()) + samples[2].dense()) + samples[3].dense()
    torch.testing.assert_close(moments.dense(), expected, rtol=0, atol=0)
