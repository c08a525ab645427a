"""Query cost against a large store: one target's top-10, and 1000 targets, next to their floors.

    python benchmarks/query.py [--num-examples 200000] [--proj-dim 2048] [--targets 1000] [--threads 2]

Builds a synthetic float16 store (n × k Gaussian features in 4096-row shards, Q uniform)
and finalizes it as featurize does (XᵀX, K and the stored Φ = XK, ``finalize_checkpoint``).
Then, in a fresh process each (so that peak memory is the query's own), the median of
``--repeats`` runs of:

* ``TRAKer.top_k``'s path (``hf_trak.run.scoring.top_k``) for 1 target, k = 10, against one read
  of the store's Φ shards into memory (the floor of any exact query);
* the same for ``--targets`` targets, against the GEMM floor: Φ (n × k, float32, in memory)
  times Tᵀ (k × T) in one ``torch.mm``;
* the path of stores before version 3, which forms Φ = XK per call (n·k² float64 flops),
  for one target;
* the explorer's faiss index (``hf_trak.explore.index.FeatureIndex``, in this process): its build
  time, one target's top-10 with the exact index (``"Flat"``) and an approximate one
  (``--ivf`` lists, searching ``--nprobe`` of them), and the approximate one's recall@10
  against the exact top-10 over ``--recall-targets`` targets. Recall depends on the data: ``--clusters C`` draws the
  features around C centers (train and targets alike, as real features cluster by class and
  content); ``--clusters 0`` is isotropic noise, the worst case for any approximate index.

Peak memory is the query process's peak resident set during the queries minus what it held
before them (Linux: ``/proc/self/clear_refs``), next to one shard's Φ in float32 and the n × T
score matrix. Memory-mapped pages of the store count while touched.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

QUERY = r"""
import json, sys, time
import numpy as np, torch
from hf_trak.run.scoring import top_k
from hf_trak.store.feature_store import FeatureStore
root, kind = sys.argv[1], sys.argv[5]
num_targets, repeats, threads = (int(value) for value in sys.argv[2:5])
torch.set_num_threads(threads)
store = FeatureStore.load(root)
k = store.config.feature_dim
targets = [torch.from_numpy(np.random.default_rng(1).standard_normal((num_targets, k)).astype(np.float32))]
if kind == "old":  # a store before version 3: hide the stored Φ
    store.has_preconditioned = lambda model_id: False
def status(field):  # kB, from /proc/self/status (Linux)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM) to the current one
before = status("VmRSS")
times = []
for _ in range(repeats):
    start = time.perf_counter()
    result = top_k(store, targets, torch.device("cpu"), 4096, 10, True, show_progress=False)
    times.append(time.perf_counter() - start)
peak = status("VmHWM") - before
print(json.dumps({"seconds": float(np.median(times)), "peak_mb": peak / 1024, "top": result.indices[0].tolist()}))
"""


def synthetic_features(rng, rows: int, centers: np.ndarray) -> np.ndarray:
    """(rows, k) float32: a random center each (none: 0) plus isotropic noise of the same energy, both ~1/√k."""
    k = centers.shape[1] if len(centers) else None
    noise = rng.standard_normal((rows, k), dtype=np.float32) / np.sqrt(k)
    return noise if not len(centers) else noise + centers[rng.integers(0, len(centers), rows)]


def synthetic_store(root: str, n: int, k: int, shard_size: int, centers: np.ndarray):
    from accelerate import PartialState

    from hf_trak.run.kernels import finalize_checkpoint
    from hf_trak.store.config import TRAKConfig
    from hf_trak.store.feature_store import FeatureStore
    from hf_trak.store.versions import STORE_VERSION

    config = TRAKConfig(
        model_class="-", name_or_path="", task="-", task_settings={}, param_names=[], num_params=0,
        store_version=STORE_VERSION, feature_dim=k, kernel_blocks=[], projector="rademacher", proj_dim=k,
        projector_seed=0, lambda_reg=None, lambda_scale=0.1, kernel="global", kernel_from="examples",
        train_weight="out_to_loss", ensemble="mean", principal_share=0.0, principal_fraction=0.0,
        kernel_shrinkage=0.0, block_sizes="by_size", dtype="float16", shard_size=shard_size, num_checkpoints=1,
        num_train_examples=n, checkpoint_fingerprints=["-"],
    )  # fmt: skip
    store = FeatureStore.create_or_resume(root, config)
    rng = np.random.default_rng(0)
    for start, stop in store.shard_ranges():
        features = synthetic_features(rng, stop - start, centers).astype(np.float16)
        store.write_shard(0, start, features, rng.uniform(0.01, 1.0, stop - start).astype(np.float32))
    finalize_checkpoint(store, 0, torch.device("cpu"), PartialState())
    return store


def run_query(root: str, num_targets: int, repeats: int, threads: int, kind: str = "stored") -> dict:
    done = subprocess.run([sys.executable, "-c", QUERY, root, str(num_targets), str(repeats), str(threads), kind],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_once(store) -> float:
    """Seconds to read every Φ shard of checkpoint 0 into memory (page cache warm, as for the queries)."""
    from hf_trak.store.feature_store import PRECONDITIONED

    start = time.perf_counter()
    for begin, stop in store.shard_ranges():
        phi, q = store.shard(0, begin, stop, PRECONDITIONED, verify=False)
        np.array(phi), np.array(q)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=200_000)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-old", action="store_true", help="skip the before-version-3 path (minutes at n=200k)")
    parser.add_argument("--clusters", type=int, default=100, help="centers the features are drawn around (0: none)")
    parser.add_argument("--ivf", type=int, default=1024, help="lists of the approximate index (IVF<n>,Flat)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256],
                        help="lists the approximate index searches per query (one line each)")  # fmt: skip
    parser.add_argument("--recall-targets", type=int, default=200)
    parser.add_argument("--skip-index", action="store_true", help="skip the faiss index figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, k, t = args.num_examples, args.proj_dim, args.targets
    rng = np.random.default_rng(123)
    centers = rng.standard_normal((args.clusters, k), dtype=np.float32) / np.sqrt(k)
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, "store")
        start = time.perf_counter()
        store = synthetic_store(root, n, k, args.shard_size, centers)
        print(f"synthetic store: n={n:,}, k={k}, float16, {args.shard_size}-row shards, {args.clusters} clusters; "
              f"built and finalized in {time.perf_counter() - start:.0f} s ({args.threads} threads)")  # fmt: skip
        reads = sorted(read_once(store) for _ in range(args.repeats))
        read = reads[len(reads) // 2]
        single = run_query(root, 1, args.repeats, args.threads)
        many = run_query(root, t, args.repeats, args.threads)
        phi = np.concatenate([np.array(p, dtype=np.float32) for _, p, _ in _phi_shards(store)])
        targets = torch.randn(k, t)
        floors = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.mm(torch.from_numpy(phi), targets)
            floors.append(time.perf_counter() - start)
        floor = float(np.median(floors))
        del phi
        shard_mb = args.shard_size * k * 4 / 2**20
        print(f"one read of the store's Φ ({n * k * 2 / 1e9:.2f} GB): {read:.3f} s")
        print(f"single target, top-10: {single['seconds']:.3f} s = {single['seconds'] / read:.2f}x one read "
              f"(goal <= 2x); peak memory +{single['peak_mb']:.0f} MB")  # fmt: skip
        print(f"{t} targets, top-10: {many['seconds']:.2f} s = {many['seconds'] / floor:.2f}x the GEMM floor "
              f"n·k·T ({floor:.2f} s; goal <= 1.5x); peak memory +{many['peak_mb']:.0f} MB "
              f"(one shard's Φ in float32: {shard_mb:.0f} MB; n × T scores: {n * t * 4 / 2**20:.0f} MB)")  # fmt: skip
        if not args.skip_old:
            old = run_query(root, 1, 1, args.threads, kind="old")
            assert old["top"] == single["top"], "the stored Φ and Φ formed per call must give the same top-10"
            print(f"single target, stores before version 3 (Φ = XK formed per call): {old['seconds']:.1f} s "
                  f"= {old['seconds'] / single['seconds']:.0f}x the stored-Φ query")  # fmt: skip
        if not args.skip_index:
            targets = torch.from_numpy(synthetic_features(rng, args.recall_targets, centers))
            index_figures(store, targets, single["seconds"], args)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _searched(index, targets: torch.Tensor, repeats: int):
    """(one target's top-10 seconds, median; every target's top-10 rows) with ``index``."""
    latency = median_seconds(lambda: index.search([targets[:1]], 10), repeats)
    return latency, index.search([targets], 10).indices


def index_figures(store, targets: torch.Tensor, streamed: float, args) -> None:
    """Build time, one target's top-10 latency (vs ``streamed``, the store query's), and recall@10."""
    from hf_trak.explore.index import FeatureIndex

    gib = store.config.num_train_examples * store.config.feature_dim * 4 / 2**30
    start = time.perf_counter()
    latency, truth = _searched(FeatureIndex(store, "Flat"), targets, args.repeats)
    print(f"faiss exact index (Flat, {gib:.2f} GiB float32 in memory): built and searched in "
          f"{time.perf_counter() - start:.0f} s; single target, top-10: {latency:.3f} s "
          f"({streamed / latency:.1f}x faster than reading the store)")  # fmt: skip
    factory = f"IVF{args.ivf},Flat"
    start = time.perf_counter()
    approximate = FeatureIndex(store, factory)
    built = time.perf_counter() - start
    for nprobe in args.nprobe:
        approximate.nprobe = nprobe
        latency, found = _searched(approximate, targets, args.repeats)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        print(f"faiss approximate index ({factory}, built (trained) in {built:.0f} s), nprobe={nprobe}: single "
              f"target, top-10: {latency * 1000:.1f} ms ({streamed / latency:.0f}x faster than reading the "
              f"store); recall@10 {recall:.3f} over {len(targets)} targets")  # fmt: skip


def _phi_shards(store):
    from hf_trak.store.feature_store import PRECONDITIONED

    for begin, stop in store.shard_ranges():
        phi, q = store.shard(0, begin, stop, PRECONDITIONED, verify=False)
        yield begin, phi, q


if __name__ == "__main__":
    main()
