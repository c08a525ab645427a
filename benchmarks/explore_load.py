"""The explorer under load: concurrent clients, each asking for its own targets, against one ``hf-trak explore``.

    python benchmarks/explore_load.py [--demo-dir trak_demo] [--clients 16] [--queries 50]

Serves the store ``make demo`` leaves in ``--demo-dir`` (or trains it first, about 1.5 min; ``--tiny``: a
random-init ViT on 60 digits at 2 checkpoints instead, for a quick check) with ``hf-trak explore`` in its own
process, then runs ``--clients`` threads, each a ``gradio_client.Client`` asking ``--queries`` times for target row
``client % rows`` ("Attribute this target row"). Every answer is checked against ``hf_trak.attribute``'s for that
row (the page's target and its top proponent): a client that gets another client's result, or an error, fails the
run. Prints the p50 and p99 latency of a query, the queries per second, and the server's resident memory before
and after (VmRSS).
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as file:
        return int(re.search(r"VmRSS:\s+(\d+) kB", file.read()).group(1)) / 1024


def tiny_store(folder: str):
    """A random-init ViT on 60 digits at 2 checkpoints: (store, dataset folder, the top proponent of each test row)."""
    from datasets import DatasetDict
    from transformers import ViTImageProcessor

    import hf_trak
    from hf_trak.demo.digits import load_digits
    from hf_trak.testing.models import perturbed_state_dict, tiny_vit

    model, processor = tiny_vit(), ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    folders = []
    for step, seed in ((1, None), (2, 3)):
        if seed is not None:
            model.load_state_dict(perturbed_state_dict(model, seed, scale=0.3))
        folders.append(os.path.join(folder, f"checkpoint-{step}"))
        model.save_pretrained(folders[-1])
        processor.save_pretrained(folders[-1])
    splits = DatasetDict(train=load_digits(0, 60), test=load_digits(60, 76))
    splits.save_to_disk(os.path.join(folder, "data"))
    result = hf_trak.attribute(folders, splits["train"], splits["test"], processor=processor, k=1, proj_dim=64,
                               save_dir=os.path.join(folder, "store"))  # fmt: skip
    top = result.top_k.filter(lambda row: row["kind"] == "proponent")
    return os.path.join(folder, "store"), os.path.join(folder, "data"), dict(zip(top["target"], top["train_index"]))


def demo_store(demo_dir: str, folder: str):
    """The demo's store: (store, dataset folder, the top proponent of each of the first 16 test digits)."""
    from datasets import DatasetDict

    import hf_trak
    from hf_trak.demo.digits import load_digits
    from hf_trak.demo.pipeline import NUM_TEST, NUM_TRAIN, run_demo
    from hf_trak.hf.loading import load_model, processor_for

    store = os.path.join(demo_dir, "trak")
    if not os.path.exists(os.path.join(store, "trak_config.json")):
        run_demo(demo_dir, num_subsets=1)
    splits = DatasetDict(train=load_digits(0, NUM_TRAIN), test=load_digits(NUM_TRAIN, NUM_TRAIN + NUM_TEST))
    splits.save_to_disk(os.path.join(folder, "data"))
    sources = hf_trak.FeatureStore.load(store).config.checkpoint_sources
    model, processor = load_model(sources[-1]), processor_for(sources[-1])
    train, targets = (hf_trak.prepare_split(split, model, None, processor) for split in (splits["train"],
                      splits["test"].select(range(16))))  # fmt: skip
    traker = hf_trak.TRAKer.from_pretrained(store, model, checkpoints=sources, train_dataset=train)
    top = traker.top_k(targets, k=1).indices
    return store, os.path.join(folder, "data"), {row: int(top[row, 0]) for row in range(len(top))}


def serve(store: str, data: str, log_path: str):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    command = [sys.executable, "-m", "hf_trak.cli", "explore", "--store", store, "--dataset", data, "--k", "5",
               "--port", str(port)]  # fmt: skip
    log = open(log_path, "w+")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        log.seek(0)
        if "explorer running on" in log.read():
            return process, f"http://127.0.0.1:{port}/"
        if process.poll() is not None:
            break
        time.sleep(0.5)
    log.seek(0)
    raise RuntimeError(f"hf-trak explore did not start:\n{log.read()[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="trak_demo")
    parser.add_argument("--tiny", action="store_true", help="a small random-init store instead of the demo's")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as folder:
        store, data, expected = tiny_store(folder) if args.tiny else demo_store(args.demo_dir, folder)
        rows = len(expected)
        process, url = serve(store, data, os.path.join(folder, "explore.log"))
        try:
            before = resident_mib(process.pid)
            latencies, failures = [], []
            lock = threading.Lock()

            def client(number: int) -> None:
                row = number % rows
                try:
                    connection = Client(url, verbose=False)
                    for _ in range(args.queries):
                        start = time.perf_counter()
                        outputs = connection.predict(row, api_name="/on_target_row")
                        elapsed = time.perf_counter() - start
                        message, summary = outputs[0], outputs[1]
                        wanted = f"Top proponent:** train row {expected[row]} "
                        if message or f"**Target:** target row {row} ·" not in summary or wanted not in summary:
                            raise AssertionError(f"client {number} asked for row {row}, got: {message or summary}")
                        with lock:
                            latencies.append(elapsed)
                except Exception as error:  # noqa: BLE001 (counted and shown)
                    with lock:
                        failures.append(f"client {number}: {' '.join(str(error).split())[:300]}")

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            after = resident_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
    latencies = np.array(latencies) * 1000
    print(f"{args.clients} clients × {args.queries} queries: {len(latencies)} answered, {len(failures)} failed")
    for failure in failures[:5]:
        print("  " + failure)
    if len(latencies):
        p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
        print(
            f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms; {len(latencies) / wall:.1f} queries/s; "
            f"server memory {before:.0f} MiB before, {after:.0f} MiB after"
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
