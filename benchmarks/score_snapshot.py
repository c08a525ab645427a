"""Scores of every estimator setting on the LDS suite's tasks, saved to compare two checkouts bit for bit.

    python benchmarks/score_snapshot.py --out before.npz            # on one checkout
    python benchmarks/score_snapshot.py --out after.npz --compare before.npz   # on another

For each task of ``benchmarks/lds_suite.py`` (two models, trained 3 epochs with seeds 0 and 1) and each
setting of ``SETTINGS`` (the default estimator, TRAK's, each projector, kernel source, ensemble, store format
and precision), the full score matrix and one top-k. ``--compare`` prints every array that differs (``0
differ``: the two checkouts score identically) and exits 1 if any does. A change that should not move any
score (a restructure) is checked this way.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lds_suite import TASKS  # noqa: E402

from hf_trak import TRAKer  # noqa: E402

SETTINGS = {
    "default": {},
    "default, projector seed 1": {"projector_seed": 1},
    "trak": {"estimator": "trak", "proj_dim": 1024},
    "trak, factored": {"estimator": "trak", "projector": "factored", "proj_dim": 1024},
    "normal projector": {"projector": "normal", "proj_dim": 512},
    "ekfac kernels": {"projector": "factored", "kernel": "per_module", "kernel_from": "ekfac", "proj_dim": 1024},
    "token kernels, random factors": {"projector": "factored", "kernel": "per_module", "kernel_from": "tokens",
                                      "principal_share": 0.0, "kernel_shrinkage": 0.0, "proj_dim": 1024},
    "mean ensemble with Q": {"ensemble": "mean", "train_weight": "out_to_loss", "proj_dim": 1024},
    "float32 store": {"dtype": "float32", "proj_dim": 1024, "lambda_scale": 0.05},
    "store version 3": {"store_version": 3, "proj_dim": 1024},
    "store version 4": {"store_version": 4, "proj_dim": 1024},
    "all parameters": {"grad_wrt": ["all"], "proj_dim": 1024},
}  # fmt: skip


def snapshot(tasks, settings, epochs: int) -> dict:
    arrays = {}
    for name in tasks:
        task = TASKS[name]()
        task.epochs = epochs
        models = [task.train_model(seed) for seed in (0, 1)]
        for setting in settings:
            start = time.time()
            traker = TRAKer(task.make_model(0), **SETTINGS[setting])
            traker.featurize(task.train, [model.state_dict() for model in models], batch_size=50)
            arrays[f"{name}/{setting}"] = traker.score(task.targets, batch_size=50)
            arrays[f"{name}/{setting}/top-k"] = traker.top_k(task.targets.select(range(5)), k=5).indices
            print(f"{name} | {setting} | {time.time() - start:.1f} s", flush=True)
    return arrays


def differences(arrays: dict, other: dict) -> list:
    found = [f"only in one: {key}" for key in sorted(set(arrays) ^ set(other))]
    for key in sorted(set(arrays) & set(other)):
        if not np.array_equal(arrays[key], other[key], equal_nan=True):
            found.append(f"differs: {key}")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="an .npz file for the scores")
    parser.add_argument("--compare", help="an .npz file written by this script on another checkout")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arrays = snapshot(args.tasks, args.settings, args.epochs)
    np.savez(args.out, **arrays)
    if args.compare:
        found = differences(arrays, dict(np.load(args.compare)))
        print("\n".join(found) or f"{len(arrays)} arrays, 0 differ")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
