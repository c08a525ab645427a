"""The explorer's latency on the demo's store: one new target, featurized and ranked, with and without an index.

    python benchmarks/explore.py [--demo-dir trak_demo] [--repeats 5] [--threads 2]

Uses the store ``make demo`` leaves in ``--demo-dir`` (600 digits, a ViT at 5 checkpoints,
k = 1024), or trains it first (``hf_trak.demo.pipeline.run_demo`` with one LDS model, about 1.5 min).
Prints the median over ``--repeats`` queries of test digits (new inputs, each attributed for
its predicted label) of:

* the whole query (``Explorer.query``): featurize the target at every checkpoint, the
  prediction, and the top-10 proponents and opponents with each checkpoint's agreement;
* its ranking part alone (``Explorer.rank``: proponents, opponents and agreement): one read
  of the stored Φ, or two searches of the exact faiss index (``index="exact"``);

then the recall@10 of an approximate index (``IVF8,Flat``, searching 1, 2 or 4 of its 8
lists) against the exact top-10 of the 200 test digits, each for its own label.
"""

import argparse
import os
import time

import numpy as np
import torch
from query import median_seconds  # this folder's query.py (scripts run with their folder on sys.path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="trak_demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_trak.demo.digits import load_digits
    from hf_trak.demo.pipeline import NUM_TEST, NUM_TRAIN, run_demo
    from hf_trak.explore.explorer import Explorer

    store = os.path.join(args.demo_dir, "trak")
    if not os.path.exists(os.path.join(store, "trak_config.json")):
        run_demo(args.demo_dir, num_subsets=1)
    train, test = load_digits(0, NUM_TRAIN), load_digits(NUM_TRAIN, NUM_TRAIN + NUM_TEST)
    for index in (None, "exact"):
        start = time.perf_counter()
        explorer = Explorer.from_store(store, train, index=index)
        started = time.perf_counter() - start
        examples = iter(test)

        def query():
            explorer.query(explorer.new_example(image=next(examples)["image"]))

        query()  # warm up
        whole = median_seconds(query, args.repeats)
        features, _, _ = explorer.target_features(test[0])
        ranking = median_seconds(lambda: explorer.rank(features, 10), args.repeats)
        config = explorer.store.config
        how = "no index (reads the store)" if index is None else "exact faiss index"
        print(f"{how}: n={config.num_train_examples}, {config.num_checkpoints} checkpoints, k={config.feature_dim}; "
              f"start {started:.1f} s; one new target {whole * 1000:.0f} ms, of which ranking "
              f"{ranking * 1000:.1f} ms ({args.threads} threads)")  # fmt: skip
    recall(explorer, test)


def recall(explorer, test) -> None:
    """recall@10 of an IVF index over the store's features against the exact index, on every test digit."""
    from hf_trak.explore.index import FeatureIndex

    features = [explorer.target_features(example)[0] for example in test]
    targets = [torch.cat([f[m] for f in features]) for m in range(len(features[0]))]
    truth = explorer.index.search(targets, 10).indices
    approximate = FeatureIndex(explorer.store, "IVF8,Flat")
    for nprobe in (1, 2, 4):
        approximate.nprobe = nprobe
        found = approximate.search(targets, 10).indices
        share = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        print(f"approximate index IVF8,Flat, nprobe={nprobe}: recall@10 {share:.3f} over {len(test)} test digits")


if __name__ == "__main__":
    main()
