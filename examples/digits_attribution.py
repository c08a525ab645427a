"""Attribute a small ViT's predictions on handwritten digits to its training digits (offline, ~1 min on CPU).

    python examples/digits_attribution.py [--output-dir digits_demo] [--proj-dim 1024]

1. Trains a ``ViTForImageClassification`` on 600 of scikit-learn's 8×8 digits, saving a
   ``save_pretrained`` checkpoint every 4 of 12 epochs (the ensemble TRAK averages over).
2. ``TRAKer.featurize`` the training split at those checkpoints; ``top_k`` on 200 test digits.
3. Prints each target's strongest proponents and how often the top proponents share the
   target's label (a sanity figure: it is ~0.1 for random attributions).
"""

import argparse
import logging
import os

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from transformers import ViTConfig, ViTForImageClassification

from hf_trak import TRAKer

NUM_TRAIN, NUM_TEST, EPOCHS, CHECKPOINT_EVERY = 600, 200, 12, 4


def digit_splits():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    train = Dataset.from_dict({"pixel_values": images[:NUM_TRAIN], "labels": digits.target[:NUM_TRAIN]})
    test = Dataset.from_dict(
        {
            "pixel_values": images[NUM_TRAIN : NUM_TRAIN + NUM_TEST],
            "labels": digits.target[NUM_TRAIN : NUM_TRAIN + NUM_TEST],
        }
    )
    return train, test


def train_with_checkpoints(train: Dataset, output_dir: str) -> tuple:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train.with_format("torch"), batch_size=32, shuffle=True)
    checkpoints = []
    for epoch in range(EPOCHS):
        model.train()
        for batch in loader:
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        if (epoch + 1) % CHECKPOINT_EVERY == 0:
            path = os.path.join(output_dir, f"checkpoint-{epoch + 1}")
            model.save_pretrained(path)
            checkpoints.append(path)
    return model.eval(), checkpoints


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="digits_demo")
    parser.add_argument("--proj-dim", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    train, test = digit_splits()
    model, checkpoints = train_with_checkpoints(train, args.output_dir)
    with torch.no_grad():
        rows = test.with_format("torch")[:]
        accuracy = (model(pixel_values=rows["pixel_values"]).logits.argmax(-1) == rows["labels"]).float().mean().item()
    print(f"Trained ViT ({sum(p.numel() for p in model.parameters())} parameters): test accuracy {accuracy:.2f}")

    traker = TRAKer(model, proj_dim=args.proj_dim, save_dir=os.path.join(args.output_dir, "trak"))
    traker.featurize(train, checkpoints, batch_size=50, overwrite=True)
    top = traker.top_k(test, k=5)

    train_labels, test_labels = np.array(train["labels"]), np.array(test["labels"])
    for target in range(5):
        proponents = ", ".join(
            f"#{i} (label {train_labels[i]}, score {s:.3f})"
            for i, s in zip(top.indices[target, :3], top.scores[target, :3])
        )
        print(f"test digit {target} (label {test_labels[target]}): top proponents {proponents}")
    agreement = (train_labels[top.indices] == test_labels[:, None]).mean()
    print(f"Top-5 proponents sharing the target's label: {agreement:.2f} (random attribution: ~0.10)")
    print(f"Features saved to {traker.save_dir}")


if __name__ == "__main__":
    main()
