"""Featurization throughput: hf_trak vs MadryLab's traker 0.3.2 (BasicProjector), same model, data, k.

    python benchmarks/featurize.py [--num-examples 256] [--proj-dim 2048] [--batch-size 32]

Model: a random-init ``ViTForImageClassification`` on 8×8 digits (~70k parameters), one
checkpoint, Rademacher projection, float32 features, on CPU. Both runs featurize the same
examples and finalize the kernel (setup included); the script prints examples/s of each
and their ratio. traker's CPU projector regenerates the p × k random matrix for every
batch; hf_trak generates it once per checkpoint, so the ratio grows with the data size.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from hf_trak import TRAKer


def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return ViTForImageClassification(config).eval()


class LogitsOnly(nn.Module):
    """traker's image task calls ``model(images)`` and expects logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def run_hf_trak(model, data, proj_dim, batch_size):
    start = time.perf_counter()
    traker = TRAKer(model, proj_dim=proj_dim, dtype=torch.float32, save_dir=None, device="cpu", estimator="trak")
    traker.featurize(data, [model.state_dict()], batch_size=batch_size)
    return time.perf_counter() - start, traker


def run_traker(model, data, proj_dim, batch_size):
    from trak import TRAKer as MadryTRAKer
    from trak.projectors import BasicProjector, ProjectionType

    wrapped = LogitsOnly(model).eval()
    num_params = sum(p.numel() for p in wrapped.parameters())
    rows = data.with_format("torch")
    with tempfile.TemporaryDirectory() as save_dir:
        start = time.perf_counter()
        projector = BasicProjector(
            grad_dim=num_params,
            proj_dim=proj_dim,
            seed=0,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            dtype=torch.float32,
        )
        traker = MadryTRAKer(
            model=wrapped,
            task="image_classification",
            train_set_size=len(data),
            save_dir=save_dir,
            device="cpu",
            projector=projector,
            proj_dim=proj_dim,
            use_half_precision=False,
        )
        traker.load_checkpoint(wrapped.state_dict(), model_id=0)
        for begin in range(0, len(data), batch_size):
            batch = rows[begin : begin + batch_size]
            traker.featurize(batch=(batch["pixel_values"], batch["labels"]), num_samples=len(batch["labels"]))
        traker.finalize_features()
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    digits = load_digits()
    data = Dataset.from_dict(
        {
            "pixel_values": (digits.images[: args.num_examples] / 16.0).astype(np.float32)[:, None],
            "labels": digits.target[: args.num_examples],
        }
    )
    model = vit()
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"ViT, {num_params} parameters, {args.num_examples} examples, proj_dim {args.proj_dim}, "
        f"batch {args.batch_size}, CPU threads {torch.get_num_threads()}"
    )
    hf_seconds, _ = run_hf_trak(model, data, args.proj_dim, args.batch_size)
    madry_seconds = run_traker(model, data, args.proj_dim, args.batch_size)
    hf_rate, madry_rate = args.num_examples / hf_seconds, args.num_examples / madry_seconds
    print(f"hf_trak: {hf_rate:8.1f} examples/s ({hf_seconds:.1f} s)")
    print(f"traker : {madry_rate:8.1f} examples/s ({madry_seconds:.1f} s)")
    print(f"ratio hf_trak / traker: {hf_rate / madry_rate:.1f}x")


if __name__ == "__main__":
    main()
