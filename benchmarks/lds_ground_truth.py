"""Ground truth of the LDS suite: each task's model retrained on random halves of its train split.

    python benchmarks/lds_ground_truth.py [--tasks image text lm] [--num-subsets 32] [--seeds 2]

For each task of ``benchmarks/lds_suite.py``: ``--num-subsets`` random halves (seed 0), a
model trained on each with ``--seeds`` training seeds (32 × 2 = 64 models by default), and
f of every target under each model (CLIP's contrast set drawn from the whole train split, as
TRAK's is). Written to ``benchmarks/lds_data/<task>.npz``: ``masks`` (subsets × n,
bit-packed), ``outputs`` (seeds × subsets × targets, float32).
The two seeds of a subset give the task's noise ceiling: the agreement of two retrainings
on the same halves (``benchmarks/lds.py``). Minutes per task on 2 CPU cores.
"""

import argparse
import os
import time

import numpy as np
import torch
from lds_suite import TASKS

from hf_trak.evaluate import make_subsets, model_outputs

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lds_data")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--num-subsets", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(DATA, exist_ok=True)
    for name in args.tasks:
        task = TASKS[name]()
        started = time.perf_counter()
        masks = make_subsets(len(task.train), args.num_subsets, seed=0)
        outputs = np.zeros((args.seeds, args.num_subsets, len(task.targets)), dtype=np.float32)
        for subset, mask in enumerate(masks):
            for seed in range(args.seeds):
                model = task.train_model(seed=10_000 + 100 * subset + seed, rows=np.flatnonzero(mask))
                outputs[seed, subset] = model_outputs(model, task.targets, contrast=task.train)
        path = os.path.join(DATA, f"{name}.npz")
        np.savez_compressed(path, masks=np.packbits(masks, axis=1), num_train=len(task.train), outputs=outputs)
        seconds = time.perf_counter() - started
        print(f"{name}: {args.num_subsets} subsets × {args.seeds} seeds in {seconds:.0f} s -> {path}")


if __name__ == "__main__":
    main()
