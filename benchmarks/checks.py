"""The checks of ``hf_trak.check`` on the demo's task: LDS with its interval, and the counterfactual check.

    python benchmarks/checks.py [--num-subsets 24] [--targets 0 1 2 3 4 5 6 7] [--k 20] [--seeds 3] [--threads 2]

Trains the demo's ViT on 600 digits with ``TRAKHFTrainer`` (5 checkpoints, ``hf_trak.demo.pipeline``'s
settings), then runs ``check_attribution`` (``--num-subsets`` models on random halves) and
``check_counterfactual`` (each target's top-k proponents removed, against k random rows, ``--seeds`` seeds),
both on the first 100 test digits, and prints their results with the time each took. Seeded: the same
numbers on every run of one installation.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from hf_trak.arguments import TRAKArguments
from hf_trak.data.processing import prepare_split
from hf_trak.demo import pipeline as demo
from hf_trak.demo.digits import load_digits
from hf_trak.trainer import TRAKHFTrainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-subsets", type=int, default=24)
    parser.add_argument("--targets", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=demo.NUM_TRAIN)
    parser.add_argument("--num-targets", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=None, help="cap each retraining (default: the run's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model = demo.make_model(seed=0)
    train_raw = load_digits(0, args.num_train)
    test_raw = load_digits(demo.NUM_TRAIN, demo.NUM_TRAIN + args.num_targets)
    train, test = (prepare_split(split, model, None, processor) for split in (train_raw, test_raw))
    with tempfile.TemporaryDirectory() as folder, demo.quiet_transformers():
        trainer = TRAKHFTrainer(
            model=model,
            args=demo.training_arguments(os.path.join(folder, "run"), len(train), seed=0, save=True),
            train_dataset=train,
            eval_dataset=test,
            trak_args=TRAKArguments(proj_dim=1024, batch_size=50),
        )
        trainer.train()
        scores = trainer.attribute(test)
        started = time.perf_counter()
        lds = trainer.check_attribution(num_subsets=args.num_subsets, max_steps=args.max_steps, scores=scores)
        print(f"{lds} ({time.perf_counter() - started:.0f} s)", flush=True)
        started = time.perf_counter()
        counterfactual = trainer.check_counterfactual(args.targets, k=args.k, num_seeds=args.seeds,
                                                      max_steps=args.max_steps, scores=scores)  # fmt: skip
        print(f"{counterfactual}\n({time.perf_counter() - started:.0f} s)")
        lower = np.mean(counterfactual.removed_top < counterfactual.removed_random)
        print(f"Mean change without the top-{args.k} proponents {counterfactual.removed_top.mean():+.3f}, without "
              f"{args.k} random rows {counterfactual.removed_random.mean():+.3f}; the proponents' removal lowered f "
              f"more for {lower:.0%} of the {len(args.targets)} targets")  # fmt: skip


if __name__ == "__main__":
    main()
