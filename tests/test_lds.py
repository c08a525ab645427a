import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from hf_trak.evaluate import lds, make_subsets
from hf_trak.testing.lds import NUM_TARGETS, NUM_TRAIN, digits_lds


def test_lds_is_mean_spearman_of_predicted_and_actual_outputs():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(30, 4))
    masks = make_subsets(30, 25, fraction=0.5, seed=1)
    assert (masks.sum(1) == 15).all()
    outputs = masks @ scores + 0.5 * rng.normal(size=(25, 4))
    result = lds(scores, masks, outputs)
    expected = [spearmanr(masks @ scores[:, j], outputs[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(result.per_target, expected, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))
    assert lds(scores, masks, masks @ scores).mean == pytest.approx(1.0)
    assert lds(-scores, masks, masks @ scores).mean == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="Shapes do not agree"):
        lds(scores.T, masks, outputs)


@pytest.mark.slow
def test_trak_attributions_on_digits_are_far_above_random():
    """500 real digits, 64 half-size retrained subsets, 100 held-out targets."""
    setup = digits_lds()
    random_lds = lds(
        np.random.default_rng(0).normal(size=(NUM_TRAIN, NUM_TARGETS)), setup.subset_masks, setup.subset_outputs
    ).mean
    trak_lds = setup.lds_of(proj_dim=1024)
    traker_default_lds = setup.lds_of(proj_dim=1024, lambda_reg=0.0, dtype=torch.float32)
    assert abs(random_lds) < 0.1
    assert trak_lds > 0.5
    # traker's lambda = 0 is close to random when k > n; the derived default is what makes TRAK work here.
    assert trak_lds > traker_default_lds + 0.3
