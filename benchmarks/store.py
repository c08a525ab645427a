"""Feature-store throughput: writing Arrow shards and reading them back memory-mapped, in GB/s.

    python benchmarks/store.py [--num-examples 200000] [--proj-dim 2048] [--shard-size 4096]

Writes a float16 featurization (n × k) shard by shard through ``FeatureStore.write_shard``
(atomic Arrow IPC files), then reads it back the way scoring does (``FeatureStore.shards``:
zero-copy numpy views, touched by a float32 reduction). Baselines in the same run:
``numpy.save``/``numpy.load(mmap_mode="r")`` of the whole matrix, and reading the same shards
with ``datasets.load_dataset(...).with_format("numpy")``.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from hf_trak.store.config import TRAKConfig
from hf_trak.store.feature_store import FeatureStore
from hf_trak.store.versions import STORE_VERSION


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=200_000)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=4096)
    args = parser.parse_args()
    n, k = args.num_examples, args.proj_dim
    features = np.random.default_rng(0).standard_normal((args.shard_size, k)).astype(np.float16)
    q = np.ones(args.shard_size, np.float32)
    gigabytes = n * k * 2 / 1e9
    config = TRAKConfig(
        model_class="-", name_or_path="", task="-", task_settings={}, param_names=[], num_params=0,
        store_version=STORE_VERSION, feature_dim=k, kernel_blocks=[], projector="rademacher", proj_dim=k,
        projector_seed=0, lambda_reg=None, lambda_scale=0.1, kernel="global", kernel_from="examples",
        train_weight="out_to_loss", ensemble="mean", principal_share=0.0, principal_fraction=0.0,
        kernel_shrinkage=0.0, dtype="float16", shard_size=args.shard_size, num_checkpoints=1, num_train_examples=n,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        store = FeatureStore.create_or_resume(os.path.join(root, "store"), config)
        start = time.perf_counter()
        for begin, stop in store.shard_ranges():
            store.write_shard(0, begin, features[: stop - begin], q[: stop - begin])
        write = time.perf_counter() - start
        os.sync()

        start = time.perf_counter()
        total = sum(float(block.sum(dtype=np.float32)) for _, block, _ in store.shards(0))
        read = time.perf_counter() - start

        whole = np.concatenate([features] * (n // args.shard_size + 1))[:n]
        start = time.perf_counter()
        np.save(os.path.join(root, "whole.npy"), whole)
        numpy_write = time.perf_counter() - start
        start = time.perf_counter()
        mapped = np.load(os.path.join(root, "whole.npy"), mmap_mode="r")
        numpy_total = sum(
            float(mapped[i : i + args.shard_size].sum(dtype=np.float32)) for i in range(0, n, args.shard_size)
        )
        numpy_read = time.perf_counter() - start

        from datasets import load_dataset

        start = time.perf_counter()
        shards = os.path.join(store.checkpoint_dir(0), "features-*.arrow")
        rows = load_dataset("arrow", data_files=shards, split="train").with_format("numpy")
        datasets_total = sum(
            float(rows[i : i + args.shard_size]["features"].sum(dtype=np.float32))
            for i in range(0, n, args.shard_size)
        )
        datasets_read = time.perf_counter() - start
    assert np.isclose(total, numpy_total, rtol=1e-3) and np.isclose(total, datasets_total, rtol=1e-3)
    print(f"{n} × {k} float16 features = {gigabytes:.2f} GB, shards of {args.shard_size} rows")
    print(
        f"hf_trak store write   {gigabytes / write:6.2f} GB/s    "
        f"numpy.save          {gigabytes / numpy_write:6.2f} GB/s"
    )
    print(
        f"hf_trak store read    {gigabytes / read:6.2f} GB/s    numpy.load mmap     {gigabytes / numpy_read:6.2f} GB/s"
        f"    datasets numpy format {gigabytes / datasets_read:6.2f} GB/s"
    )


if __name__ == "__main__":
    main()
