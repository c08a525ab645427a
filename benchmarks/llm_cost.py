"""Featurize against a training step on real-size text models: time and peak memory, 2 threads, CPU or GPU.

    python benchmarks/llm_cost.py [--models gpt2 bert-small] [--lengths 128 512] [--examples 32]
                                  [--batch-size 8] [--threads 2] [--device cpu] [--dtype float32]
                                  [--repeats 1]

On a GPU (the device machine): ``--device cuda --dtype bfloat16 --models gpt2 llama-1b``; without a CUDA
device that prints one line saying it skipped, and exits 0.

Models, random init (no download): ``gpt2`` is ``GPT2LMHeadModel(GPT2Config())``, GPT-2 small (124M
parameters, vocabulary 50,257); ``bert-small`` is a 4-layer BERT of width 512 (``BertConfig(hidden_size=512,
num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)``, about 29M parameters) with a 2-class
head; ``llama-1b`` is ``LlamaForCausalLM`` with TinyLlama-1.1B's shape (width 2048, 22 layers, 32 query and 4
key/value heads, MLP 5632, vocabulary 32,000: 1.1B parameters). For each model and length, ``--examples``
random sequences; every measurement runs in a process of its own (so that its peak resident memory,
``ru_maxrss``, is its own):

* ``training step``: AdamW, forward, backward and optimizer step over the examples in batches of
  ``--batch-size``, seconds per example (after one warm-up batch);
* ``featurize (default)``: ``TRAKer(model).featurize(...)`` at the defaults with the same batch size, one
  checkpoint, seconds per example (the kernel included; after one warm-up batch's forward and backward, as a
  process that has just trained: a process's first passes cost more), and its ratio to the training step;
* ``featurize, no per-token statistics`` (``kernel_from="examples"``) and ``featurize, no principal pass``
  (``principal_share=0`` and ``block_sizes="by_size"``: no pass over a sample of the rows for the principal
  factors and the block sizes): what those parts of the default cost, as the difference to it;
* ``featurize, batch size left to hf_trak``: the default with ``batch_size=None`` (``hf_trak.run.memory``
  picks it from the free memory): its peak memory is what a user gets without choosing.

Peak memory is the process's from the end of the warm-up on, model, data and what the warm-up left (AdamW's
state) included (GiB): Linux's ``VmHWM``, reset through ``/proc/self/clear_refs`` (elsewhere ``ru_maxrss``, from
the start). GPU: peak allocated memory instead. Each row
also gives tokens per second (examples × tokens / seconds). With ``--repeats R`` every measurement runs R
times, the variants in turn, and the table gives the median seconds (the ratio: of the medians) and the
largest peak.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "training step": None,
    "featurize (default)": {},
    "featurize, no per-token statistics": {"kernel_from": "examples"},
    "featurize, no principal pass": {"principal_share": 0.0, "block_sizes": "by_size"},
    "featurize, batch size left to hf_trak": {"batch_size": None},
}


MODELS = ("gpt2", "bert-small", "llama-1b")
VOCABULARIES = {"gpt2": 50257, "bert-small": 30522, "llama-1b": 32000}


def make_model(name: str):
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config())
    if name == "llama-1b":
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
        return LlamaForCausalLM(config)
    config = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
                        num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def data(name: str, length: int, examples: int):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCABULARIES[name], size=(examples, length)).tolist()
    labels = rng.integers(0, 2, size=examples).tolist() if name == "bert-small" else ids
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * examples, "labels": labels})


def worker(spec: dict) -> dict:
    """One measurement, in this process: seconds per example and peak memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = make_model(spec["model"]).to(device, getattr(torch, spec["dtype"]))
    split = data(spec["model"], spec["length"], spec["examples"])
    size = spec["batch_size"]
    rows = split.with_format("torch")

    def batch(start):
        return {name: value.to(device) for name, value in rows[start : start + size].items()}

    if spec["variant"] == "training step":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()

        def step(start):
            model(**batch(start)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step(0)  # warm-up: AdamW's state, allocator
        reset_peak_memory(device)
        started = time.perf_counter()
        for start in range(0, len(split), size):
            step(start)
    else:
        from hf_trak import TRAKer

        model(**batch(0)).loss.backward()  # warm-up, as the training step's: the process's first passes cost more
        model.zero_grad(set_to_none=True)
        settings = dict(VARIANTS[spec["variant"]])
        batch_size = settings.pop("batch_size", size)
        traker = TRAKer(model, save_dir=None, device=str(device), **settings)
        reset_peak_memory(device)
        started = time.perf_counter()
        traker.featurize(split, [model.state_dict()], batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - started) / len(split), "peak": peak_memory(device)}


def reset_peak_memory(device) -> None:
    """Start the peak memory over: the GPU's peak allocation, or Linux's resident high-water mark (``VmHWM``)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # 5: reset the peak resident set size (proc(5))


def peak_memory(device) -> float:
    """GiB: the peak since ``reset_peak_memory`` (``ru_maxrss``, the process's whole peak, without ``/proc``)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "bert-small"], choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the table has medians")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"skipped: --device {args.device} but torch sees no CUDA device")
            return
        print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}")
    print("| model | tokens | measurement | s / example | × training step | tokens / s | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        for length in args.lengths if model != "bert-small" else args.lengths[:1]:
            found = {variant: [] for variant in args.variants}
            for _ in range(args.repeats):  # the variants in turn, so that a change of the machine's load hits all
                for variant in args.variants:
                    spec = dict(model=model, length=length, examples=args.examples, batch_size=args.batch_size,
                                threads=args.threads, device=args.device, variant=variant,
                                dtype=args.dtype)  # fmt: skip
                    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                          capture_output=True, text=True)  # fmt: skip
                    if done.returncode != 0:
                        found[variant] = f"failed: {done.stderr.strip().splitlines()[-1]}"
                    elif isinstance(found[variant], list):
                        found[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            base = found.get("training step")
            base = statistics.median(r["seconds"] for r in base) if isinstance(base, list) and base else None
            for variant, results in found.items():
                if isinstance(results, str):
                    print(f"| {model} | {length} | {variant} | {results} | | | |")
                    continue
                seconds = statistics.median(r["seconds"] for r in results)
                ratio = f"{seconds / base:.2f}" if base else ""
                peak = max(r["peak"] for r in results)
                print(f"| {model} | {length} | {variant} | {seconds:.3f} | {ratio} | {length / seconds:.0f} | "
                      f"{peak:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
