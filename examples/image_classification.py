"""Which training images made a fine-tuned image classifier label a test image the way it did?

Offline default (a small ViT on scikit-learn's 8×8 digits; about a minute on 2 CPU cores):

    python examples/image_classification.py

A Hub model and dataset:

    python examples/image_classification.py --model google/vit-base-patch16-224-in21k --dataset beans \\
        --num-train 1000 --num-test 50

1. Fine-tunes the model with ``transformers.Trainer``, saving a checkpoint every epoch.
2. ``hf_trak.attribute(output_dir, train, test, processor=image_processor)`` featurizes the raw
   train split at those checkpoints and scores the test images.
3. Writes ``report.png``: each test image, its top proponents and its top opponents.
"""

import argparse
import os

from datasets import load_dataset
from offline_data import digit_image_splits
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import hf_trak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: a small random-init ViT)")
    parser.add_argument("--dataset", default=None, help="load_dataset name with image/label columns")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--output-dir", default="image_attribution")
    return parser.parse_args(argv)


def model_and_processor(args, num_labels: int):
    if args.model:
        processor = AutoImageProcessor.from_pretrained(args.model)
        model = AutoModelForImageClassification.from_pretrained(
            args.model, num_labels=num_labels, ignore_mismatched_sizes=True
        )
        return model, processor
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=num_labels,
    )  # fmt: skip
    return ViTForImageClassification(config), ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])


def main(argv=None) -> hf_trak.Attribution:
    args = parse_args(argv)
    if args.dataset:
        splits = load_dataset(args.dataset)
        train = splits["train"].shuffle(seed=0).select(range(min(args.num_train, len(splits["train"]))))
        test = splits["test"].shuffle(seed=0).select(range(min(args.num_test, len(splits["test"]))))
    else:
        train, test = digit_image_splits(args.num_train, args.num_test)
    model, processor = model_and_processor(args, num_labels=train.features["label"].num_classes)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        learning_rate=5e-3 if not args.model else 5e-5,
        save_strategy="epoch",
        save_total_limit=4,  # TRAK uses the checkpoints that are left
        report_to=[],
        logging_strategy="no",
        seed=0,
    )
    Trainer(
        model=model,
        args=training_args,
        train_dataset=hf_trak.prepare_split(train, model, None, processor),  # the same processing hf_trak applies
        processing_class=processor,
    ).train()

    result = hf_trak.attribute(
        args.output_dir,
        train=train,
        targets=test,
        processor=processor,
        k=5,
        proj_dim=args.proj_dim,
        save_dir=os.path.join(args.output_dir, "trak"),
        overwrite=True,  # this script retrains, so earlier features are stale
    )
    proponents = result.top_k.filter(lambda row: row["kind"] == "proponent").select_columns(["label", "target_label"])
    agreement = sum(a == b for a, b in zip(proponents["label"], proponents["target_label"])) / len(proponents)
    print(f"Top-5 proponents with the target's label: {agreement:.2f}")
    print(f"Report: {result.save_report(os.path.join(args.output_dir, 'report.png'))}")
    return result


if __name__ == "__main__":
    main()
