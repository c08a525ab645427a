"""What the default estimator costs: featurize time and store size, estimator="hf_trak" against "trak".

    python benchmarks/estimator_cost.py [--num-examples 512] [--proj-dim auto] [--repeats 3] [--threads 2]
                                        [--kernel-from mixed] [--kernel-shrinkage 1]

Two random-init models large enough that ``projector="auto"`` factors them under either estimator (p·k > 2^28), so
that the difference is the estimator's alone: a 4-layer GPT-2 (hidden 256, 64-token sequences; hf_trak adds
per-token Gram matrices and Kronecker factors beside each shard) and a 4-layer BERT classifier (hidden 256, 64
tokens; hf_trak: mixed kernels, with Kronecker factors beside each shard); for both, hf_trak adds one forward and
backward over 10% of the rows for its principal factors. Each run featurizes one checkpoint into a fresh store,
finalize included (K and Φ); the script prints the median seconds of ``--repeats`` runs, the store's bytes on disk,
and the ratios hf_trak / trak, measured in the same process. ``--proj-dim auto`` (the default) gives each estimator
its own k (``hf_trak.method.estimator.auto_proj_dim``: hf_trak 4096 for its per-token and mixed kernels, 2048
otherwise; trak 2048), a number the same k to both. ``--kernel-from`` gives hf_trak's estimator that
``kernel_from`` on both models (its own k for it, with ``--proj-dim auto``), ``--kernel-shrinkage`` that
``kernel_shrinkage``.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_trak import TRAKer

VOCAB, LENGTH = 1000, 64


def models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=LENGTH))
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=LENGTH,
            num_labels=3,
        )
    )
    return {"gpt2 (causal LM)": gpt2.eval(), "bert (classifier)": bert.eval()}


def data(n: int, labels: bool) -> Dataset:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(n, LENGTH)).tolist()
    columns = {"input_ids": ids, "attention_mask": [[1] * LENGTH] * n}
    columns["labels"] = rng.integers(0, 3, size=n).tolist() if labels else ids
    return Dataset.from_dict(columns)


def store_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def run(model, split, estimator: str, proj_dim, repeats: int, **settings):
    times, size, config = [], 0, None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            save_dir = os.path.join(folder, "s")
            traker = TRAKer(model, proj_dim=proj_dim, estimator=estimator, save_dir=save_dir, **settings)
            start = time.perf_counter()
            traker.featurize(split, [model.state_dict()], batch_size=32)
            times.append(time.perf_counter() - start)
            size, config = store_bytes(traker.save_dir), traker.config
    return float(np.median(times)), size, config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--proj-dim", type=lambda text: text if text == "auto" else int(text), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel-from", choices=["examples", "tokens", "mixed"], help="hf_trak's kernel_from")
    parser.add_argument("--kernel-shrinkage", type=float, help="hf_trak's kernel_shrinkage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, model in models().items():
        split = data(args.num_examples, labels="bert" in name)
        p = sum(parameter.numel() for parameter in model.parameters())
        settings = {"kernel_from": args.kernel_from} if args.kernel_from else {}
        if args.kernel_shrinkage is not None:
            settings["kernel_shrinkage"] = args.kernel_shrinkage
        results = {
            "trak": run(model, split, "trak", args.proj_dim, args.repeats),
            "hf_trak": run(model, split, "hf_trak", args.proj_dim, args.repeats, **settings),
        }
        for estimator, (seconds, size, config) in results.items():
            print(f"{name}, p={p:,}, {estimator:8}: k={config.proj_dim}, {config.projector} projector, "
                  f"{config.kernel} kernel from {config.kernel_from}, train_weight={config.train_weight}: "
                  f"featurize {seconds:.1f} s (median of {args.repeats}), store {size / 2**20:.1f} MiB")  # fmt: skip
        (t0, s0, _), (t1, s1, _) = results["trak"], results["hf_trak"]
        print(f"{name}: hf_trak / trak: time {t1 / t0:.2f}×, store {s1 / s0:.2f}×", flush=True)


if __name__ == "__main__":
    main()
