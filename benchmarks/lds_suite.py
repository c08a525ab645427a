"""The LDS suite's tasks: three small Hugging Face models with different heads, their data and training.

Each task gives a train split, a target split (both of model inputs, ``labels`` included),
a model factory and a deterministic training loop, so that ``benchmarks/lds_ground_truth.py``
can retrain on random halves and ``benchmarks/lds.py`` can train the K attributed models.

* ``image``: ``ViTForImageClassification`` (the demo's model and training settings, 18k
  parameters) on 600 of scikit-learn's digits; 100 test digits as targets.
* ``text``: ``BertForSequenceClassification`` (2 layers, hidden 32) on 400 synthetic
  token sequences whose class is the keyword group most present (10% of labels flipped);
  100 targets.
* ``lm``: ``GPT2LMHeadModel`` (2 layers, hidden 32) on 400 sequences drawn from 6 Markov
  chains over 24 tokens ("topics"); 100 targets. f is the sequence log-likelihood margin.

f is hf_trak's model output function for the head (``AutoModelOutput``), evaluated with
``hf_trak.evaluate.model_outputs``.
"""

import dataclasses
from typing import Callable

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_trak.data.source import ExampleSource
from hf_trak.demo import pipeline as demo
from hf_trak.method.model_outputs import AutoModelOutput


@dataclasses.dataclass
class SuiteTask:
    name: str
    train: Dataset
    targets: Dataset
    make_model: Callable[[int], torch.nn.Module]
    epochs: int
    batch_size: int
    learning_rate: float

    def train_model(self, seed: int, rows=None) -> torch.nn.Module:
        """A model trained with ``seed`` on ``rows`` of the train split (all by default): AdamW, shuffled
        batches, the head's own loss (``labels`` in the batch)."""
        torch.manual_seed(seed)
        model = self.make_model(seed)
        data = self.train if rows is None else self.train.select(np.asarray(rows))
        source = ExampleSource.for_model(data, model, AutoModelOutput.resolve(model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=0.01)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(data), generator=generator).tolist()
            for start in range(0, len(order), self.batch_size):
                batch = source.batch(order[start : start + self.batch_size])
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return model.eval()


def image_task() -> SuiteTask:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = ((digits.images / 16.0 - 0.5) / 0.5).astype(np.float32)[:, None]

    def split(start, stop):
        return Dataset.from_dict({"pixel_values": pixels[start:stop], "labels": digits.target[start:stop]})

    return SuiteTask("image", split(0, 600), split(600, 700), demo.make_model, epochs=demo.EPOCHS,
                     batch_size=demo.BATCH_SIZE, learning_rate=demo.LEARNING_RATE)  # fmt: skip


def _keyword_sequences(n: int, seed: int, vocab: int = 64, groups: int = 3, words: int = 4, flip: float = 0.1):
    rng = np.random.default_rng(seed)
    keywords = np.arange(1, 1 + groups * words).reshape(groups, words)  # tokens 1..12; 0 is padding
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(rng.integers(8, 17))
        tokens = rng.integers(1 + groups * words, vocab, size=length)
        counts = rng.multinomial(int(rng.integers(2, 6)), rng.dirichlet(np.ones(groups)))
        places = rng.choice(length, size=min(length, counts.sum()), replace=False)
        spread = np.repeat(np.arange(groups), counts)[: len(places)]
        tokens[places] = [keywords[g, rng.integers(words)] for g in spread]
        label = int(np.argmax(np.bincount(spread, minlength=groups) + rng.uniform(0, 0.1, groups)))
        if rng.uniform() < flip:
            label = int(rng.integers(groups))
        rows["input_ids"].append(tokens.tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(label)
    return Dataset.from_dict(rows)


def text_task() -> SuiteTask:
    def make_model(seed):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, num_labels=3)  # fmt: skip
        return BertForSequenceClassification(config)

    return SuiteTask("text", _keyword_sequences(400, 0), _keyword_sequences(100, 1), make_model, epochs=15,
                     batch_size=32, learning_rate=3e-3)  # fmt: skip


def _markov_sequences(n: int, seed: int, vocab: int = 24, topics: int = 6, length: int = 16):
    chains = np.random.default_rng(1234).dirichlet(np.full(vocab, 0.15), size=(topics, vocab))  # shared by splits
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        topic = rng.integers(topics)
        tokens = [int(rng.integers(vocab))]
        for _ in range(length - 1):
            tokens.append(int(rng.choice(vocab, p=chains[topic, tokens[-1]])))
        rows.append(tokens)
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * n, "labels": rows})


def lm_task() -> SuiteTask:
    def make_model(seed):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(config)

    return SuiteTask("lm", _markov_sequences(400, 0), _markov_sequences(100, 1), make_model, epochs=15,
                     batch_size=32, learning_rate=3e-3)  # fmt: skip


TASKS = {"image": image_task, "text": text_task, "lm": lm_task}
