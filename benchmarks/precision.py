"""Float32 precision of TRAK scores against float64 TRAK by the formula, on the closed-form parity cases.

    python benchmarks/precision.py [--threads 1]

For each case of ``tests/test_scores.py`` (tiny ViT, BERT, CLIP and GPT-2, identity projector,
k = p > n, three checkpoints), prints κ = (s_max + λ)/λ of XᵀX + λI and, as max |error| /
max |score| against ``hf_trak.testing.reference_scores`` (float64 autograd, direct inverse):

* ``hf_trak``: the scores hf_trak returns (XᵀX, K and Φ = XK in float64, ΦTᵀ in float32);
* ``float32 kernel``: the same stored features through the kernel path of hf_trak 0.1.0
  (XᵀX summed, K kept and Φ formed in float32);
* ``gradients only``: the same features scored in float64, i.e. what the float32
  per-example gradients alone cost.

The error of a float32 kernel path grows with κ; hf_trak's stays at the gradients' share.
"""

import argparse

import numpy as np
import torch

from hf_trak.method.estimator import LAMBDA_SCALE
from hf_trak.method.kernel import score_block
from hf_trak.testing.reference import PARITY_CASES, identity_traker, kernel_scores, reference_scores


def float32_kernel_scores(xs, ts, qs, lambda_reg):
    """hf_trak 0.1.0's kernel path: XᵀX accumulated, K stored and Φ = XK formed in float32."""
    phis = []
    for x in xs:
        x = torch.as_tensor(x, dtype=torch.float32)
        xtx = x.T @ x
        lam = LAMBDA_SCALE * float(torch.trace(xtx.double())) / xtx.shape[0] if lambda_reg is None else lambda_reg
        inverse = torch.linalg.inv(xtx.double() + lam * torch.eye(xtx.shape[0], dtype=torch.float64))
        phis.append(x @ (inverse / inverse.abs().mean()).float())
    return score_block(phis, ts, torch.as_tensor(np.mean(qs, axis=0))).numpy()


def condition_number(x: np.ndarray, lambda_reg) -> float:
    xtx = torch.as_tensor(x).double().T @ torch.as_tensor(x).double()
    lam = LAMBDA_SCALE * float(torch.trace(xtx)) / xtx.shape[0] if lambda_reg is None else lambda_reg
    return float((torch.linalg.eigvalsh(xtx).max() + lam) / lam)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); max |error| / max |score| against float64 TRAK")
    columns = ("hf_trak", "float32 kernel", "gradients only")
    print(
        f"{'case':<10} {'lambda':<8} {'k':>5} {'n':>3} {'kappa':>8} {columns[0]:>9} {columns[1]:>15} {columns[2]:>15}"
    )
    for case, lambda_reg in PARITY_CASES:
        traker, model, train, targets, checkpoints = identity_traker(case, lambda_reg)
        scores = traker.score(targets, batch_size=4)
        expected = reference_scores(model, train, targets, checkpoints, lambda_reg)
        xs = [traker.store.features(m) for m in range(len(checkpoints))]
        qs = [traker.store.out_to_loss(m) for m in range(len(checkpoints))]
        ts, _ = traker._target_features(targets, 4, None)  # the target features score() used

        def error(values):
            return np.abs(values - expected).max() / np.abs(expected).max()

        kappa = max(condition_number(x, lambda_reg) for x in xs)
        print(
            f"{case:<10} {str(lambda_reg):<8} {xs[0].shape[1]:>5} {len(train):>3} {kappa:>8.2e} "
            f"{error(scores):>9.1e} {error(float32_kernel_scores(xs, ts, qs, lambda_reg)):>15.1e} "
            f"{error(kernel_scores(xs, ts, qs, lambda_reg)):>15.1e}"
        )


if __name__ == "__main__":
    main()
