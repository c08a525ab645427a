"""LDS on scikit-learn's digits for λ, k and the number of checkpoints (``hf_trak.testing.digits_lds``).

python benchmarks/lds_digits.py   # LDS of hf_trak settings vs. random scores
"""

import logging

import numpy as np
import torch

from hf_trak.evaluate import lds
from hf_trak.method.estimator import LAMBDA_SCALE
from hf_trak.testing.lds import NUM_TARGETS, NUM_TRAIN, digits_lds


def main():
    logging.basicConfig(level=logging.WARNING)
    setup = digits_lds()
    random_lds = lds(
        np.random.default_rng(0).normal(size=(NUM_TRAIN, NUM_TARGETS)), setup.subset_masks, setup.subset_outputs
    ).mean
    print(f"random scores: LDS {random_lds:+.3f}")
    default_scale = LAMBDA_SCALE  # TRAK's (estimator='trak', which lds_of uses)
    for proj_dim in (256, 1024):
        print(
            f"proj_dim {proj_dim:5d}  {'lambda = 0 (traker default)':36s} LDS "
            f"{setup.lds_of(proj_dim=proj_dim, lambda_reg=0.0, dtype=torch.float32):+.3f}"
        )
        for scale in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
            value = setup.lds_of(proj_dim=proj_dim, dtype=torch.float32, lambda_scale=scale)
            label = f"lambda = {scale:g} * tr(XtX)/k" + (" (default)" if scale == default_scale else "")
            print(f"proj_dim {proj_dim:5d}  {label:36s} LDS {value:+.3f}")
    for m in (1, 3, 5):
        value = setup.lds_of(num_checkpoints=m, proj_dim=1024)
        print(f"proj_dim 1024, default lambda, {m} checkpoint(s): LDS {value:+.3f}")


if __name__ == "__main__":
    main()
