"""TRAK over several processes (GPUs or nodes) with accelerate: featurize, then score.

Offline default (a small ViT on scikit-learn's digits), on one machine with 2 GPUs, or 2 CPU
processes (gloo) with torchrun:

    accelerate launch --multi_gpu --num_processes 2 examples/distributed_attribution.py --save-dir trak_dist
    torchrun --nproc_per_node 2 examples/distributed_attribution.py --save-dir trak_dist

A Hub model and dataset, on 8 GPUs of each of 2 nodes (run on every node, with its rank):

    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $RANK \\
        --main_process_ip $MAIN_IP --main_process_port 29500 examples/distributed_attribution.py \\
        --model textattack/bert-base-uncased-SST-2 --dataset glue --dataset-config sst2 --text-column sentence \\
        --save-dir /shared/sst2-trak

``save_dir`` must be a folder that every process can write (a shared file system across
nodes). Each process featurizes its own shards; only k × k matrices are all-reduced. The
main process prints the scores' shape and the top proponents. A killed launch resumes
when started again with the same arguments.
"""

import argparse
import logging

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset

from hf_trak import TRAKer


def digits_model_and_data():
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    train = Dataset.from_dict({"pixel_values": images[:400], "labels": digits.target[:400]})
    test = Dataset.from_dict({"pixel_values": images[400:440], "labels": digits.target[400:440]})
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config).eval(), train, test


def hub_model_and_data(args):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    splits = load_dataset(args.dataset, args.dataset_config)

    def tokenize(batch):
        return tokenizer(batch[args.text_column], truncation=True, max_length=128)

    train = splits["train"].select(range(min(args.num_train, len(splits["train"])))).map(tokenize, batched=True)
    test = splits["validation"].select(range(args.num_targets)).map(tokenize, batched=True)
    return model, train, test


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", default="trak_dist")
    parser.add_argument("--model", help="a Hub model id (default: a small ViT on digits, offline)")
    parser.add_argument("--dataset")
    parser.add_argument("--dataset-config")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--num-targets", type=int, default=100)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, train, test = hub_model_and_data(args) if args.model else digits_model_and_data()
    model.to(accelerator.device)
    traker = TRAKer(model, proj_dim=args.proj_dim, save_dir=args.save_dir, accelerator=accelerator)
    traker.featurize(train, checkpoints=[model], batch_size=args.batch_size)
    top = traker.top_k(test, k=3, batch_size=args.batch_size)
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es) featurized {len(train)} examples into {args.save_dir}")
        for target in range(3):
            print(
                f"target {target}: top proponents {top.indices[target].tolist()} "
                f"(scores {np.round(top.scores[target], 3).tolist()})"
            )


if __name__ == "__main__":
    main()
