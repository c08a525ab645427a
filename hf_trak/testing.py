"""What the tests and benchmarks share: tiny random-init Hugging Face models, small datasets (no
downloads), the digits LDS harness, and the environment of the processes tests start.

Needs the ``dev`` extra (scikit-learn); nothing in hf_trak imports it.
"""

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from .digits import digit_images as digits_split
from .evaluate import lds, make_subsets, model_outputs
from .traker import TRAKer

VOCAB = 40


def tiny_vit(seed: int = 0, num_labels: int = 10) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
            eos_token_id=2,
            bos_token_id=1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=8,
            patch_size=4,
            num_channels=1,
        ),
        projection_dim=4,
    )
    return CLIPModel(config).eval()


def digits(n: int, offset: int = 0) -> Dataset:
    """scikit-learn's digits as a ``pixel_values``/``labels`` dataset (values scaled to [0, 1])."""
    data = load_digits()
    images = (data.images[offset : offset + n] / 16.0).astype(np.float32)[:, None]
    return Dataset.from_dict({"pixel_values": images, "labels": data.target[offset : offset + n]})


def token_sequences(n: int, seed: int = 0, num_labels: int = 3, min_len: int = 3, max_len: int = 9) -> Dataset:
    """Ragged token sequences with an ``attention_mask`` of ones, a class label and a raw text column."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    ids = [rng.integers(3, VOCAB, size=length).tolist() for length in lengths]
    return Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": rng.integers(0, num_labels, size=n).tolist(),
            "text": [" ".join(map(str, x)) for x in ids],
        }
    )


def lm_sequences(n: int, seed: int = 0) -> Dataset:
    """Causal-LM examples: ``labels`` = ``input_ids`` with the first two tokens masked (-100)."""
    data = token_sequences(n, seed=seed).remove_columns(["labels", "text"])
    return data.map(lambda row: {"labels": [-100, -100] + row["input_ids"][2:]})


def clip_pairs(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    data = token_sequences(n, seed=seed).remove_columns(["labels", "text"])
    images = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    return data.add_column("pixel_values", images.tolist())


def perturbed_state_dict(model, seed: int, scale: float = 0.05) -> dict:
    """A second checkpoint of the same architecture: the model's tensors plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (t + scale * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t.clone())
        for name, t in model.state_dict().items()
    }


def word_tokenizer():
    """A whitespace word-level tokenizer whose words are the token ids of ``token_sequences``' text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, **{str(i): i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def digit_images(n: int, offset: int = 0) -> Dataset:
    """scikit-learn's digits as a raw image split: an ``image`` column (8×8 grayscale PIL) and ``label``."""
    return digits_split(offset, offset + n)


def subprocess_env(**extra) -> dict:
    """The environment of a process a test starts: this checkout importable, one thread, no progress bars."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- digits LDS harness
NUM_TRAIN, NUM_TARGETS = 500, 100


class DigitsMLP(nn.Module):
    """64 → 32 → 10 classifier of 8×8 digits: ``forward(pixel_values) -> logits``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, pixel_values):
        return self.net(pixel_values)


def digits_splits():
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    train = Dataset.from_dict({"pixel_values": images[:NUM_TRAIN], "labels": data.target[:NUM_TRAIN]})
    test = Dataset.from_dict(
        {
            "pixel_values": images[NUM_TRAIN : NUM_TRAIN + NUM_TARGETS],
            "labels": data.target[NUM_TRAIN : NUM_TRAIN + NUM_TARGETS],
        }
    )
    return train, test


def train_mlp(train: Dataset, mask: np.ndarray, seed: int, steps: int = 300) -> DigitsMLP:
    """Full-batch Adam with weight decay on the examples selected by ``mask``."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    rows = train.with_format("torch")[np.flatnonzero(mask)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(rows["pixel_values"]), rows["labels"]).backward()
        optimizer.step()
    return model.eval()


@dataclass
class DigitsLDS:
    """A small classifier (``DigitsMLP``, task ``image_classification``) trained on 500 training digits
    (``checkpoints``: full-data models of several seeds) and on half subsets (``subset_masks``), with the
    margins of the subset models on 100 held-out digits (``subset_outputs``)."""

    train: Dataset
    test: Dataset
    checkpoints: list
    subset_masks: np.ndarray
    subset_outputs: np.ndarray

    def lds_of(self, num_checkpoints: int = None, **traker_kwargs) -> float:
        """LDS of hf_trak's scores with ``traker_kwargs`` (``TRAKArguments`` fields) at the first checkpoints."""
        checkpoints = self.checkpoints[:num_checkpoints]
        traker = TRAKer(DigitsMLP(), task="image_classification", save_dir=None, **traker_kwargs)
        traker.featurize(self.train, checkpoints, batch_size=100)
        return lds(traker.score(self.test, batch_size=100), self.subset_masks, self.subset_outputs).mean


@functools.lru_cache(maxsize=1)
def digits_lds(num_subsets: int = 64, num_checkpoints: int = 5) -> DigitsLDS:
    train, test = digits_splits()
    subset_masks = make_subsets(NUM_TRAIN, num_subsets, fraction=0.5, seed=0)
    outputs = [
        model_outputs(train_mlp(train, mask, seed=0), test, task="image_classification") for mask in subset_masks
    ]
    full = np.ones(NUM_TRAIN, dtype=bool)
    checkpoints = [train_mlp(train, full, seed=seed).state_dict() for seed in range(num_checkpoints)]
    return DigitsLDS(train, test, checkpoints, subset_masks, np.stack(outputs))
