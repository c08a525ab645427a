"""What the tests and benchmarks share: tiny random-init Hugging Face models, small datasets (no
downloads), the environment of the processes tests start, the digits LDS harness and the
float64 TRAK reference with its parity cases (over 300 lines: every shared fixture is here).

Needs the ``dev`` extra (scikit-learn); nothing in hf_trak imports it.
"""

import atexit
import copy
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

from .data import ExampleSource
from .digits import digit_images as digits_split
from .estimator import GLOBAL_LAMBDA_SCALE, LAMBDA_SCALE
from .evaluate import lds, make_subsets, model_outputs
from .model_outputs import AutoModelOutput, ClassificationModelOutput, call_model, without_labels
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
    """The environment of a process a test starts: this checkout importable, one thread, no progress bars,
    and Python's stacks printed if it crashes (``PYTHONFAULTHANDLER``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        PYTHONFAULTHANDLER="1",
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    env.update(extra)
    return env


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # a gloo process group's worker and transport threads


def register_exit_probe(out: str) -> None:
    """In a launched process, before hf_trak starts: at exit, after hf_trak's own exit handler (``atexit``
    runs them last-in first-out), write how many gloo threads are still alive to ``out/exit-<rank>.txt``."""
    rank = os.environ.get("RANK", "0")

    def probe():
        alive = "n/a"  # no /proc: thread names unknown
        if os.path.isdir("/proc/self/task"):
            alive = str(sum(_thread_name(task) in GLOO_THREADS for task in os.listdir("/proc/self/task")))
        with open(os.path.join(out, f"exit-{rank}.txt"), "w") as file:
            file.write(alive)

    atexit.register(probe)


def _thread_name(task: str) -> str:
    with open(f"/proc/self/task/{task}/comm") as file:
        return file.read().strip()


def assert_gloo_threads_joined_at_exit(out, num_processes: int = 2) -> None:
    """Every launched process (``register_exit_probe``) had joined its gloo threads before the interpreter's
    teardown (Linux: threads named in /proc)."""
    expected = "0" if os.path.isdir("/proc/self/task") else "n/a"
    for rank in range(num_processes):
        with open(os.path.join(out, f"exit-{rank}.txt")) as file:
            assert file.read() == expected, f"rank {rank} reached its exit with gloo threads alive"


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
        """LDS of hf_trak's scores with ``traker_kwargs`` (``TRAKArguments`` fields; over the seeds' TRAK,
        ``estimator="trak"``, unless another estimator is named) at the first checkpoints."""
        traker_kwargs.setdefault("estimator", "trak")
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


# ----------------------------------------------------------------------------- float64 reference
def _double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def kernel_scores(
    train_features,
    target_features,
    out_to_loss,
    lambda_reg=None,
    lambda_scale=LAMBDA_SCALE,
    weighted=True,
    normalized=False,
) -> np.ndarray:
    """float64 TRAK scores from per-checkpoint features X_m (n × k), T_m (b × k) and Q_m (n,), by the formula
    (``weighted=False``: without Q, as ``train_weight="none"``; λ = lambda_scale·tr/k unless ``lambda_reg``;
    ``normalized``: each checkpoint's score matrix divided column by column by its RMS over the rows, as
    ``ensemble="normalized"``)."""
    total = 0
    for x, t in zip(train_features, target_features):
        x, t = torch.as_tensor(x).double(), torch.as_tensor(t).double()
        xtx = x.T @ x
        lam = lambda_scale * torch.trace(xtx) / xtx.shape[0] if lambda_reg is None else lambda_reg
        inverse = torch.linalg.inv(xtx + lam * torch.eye(xtx.shape[0], dtype=torch.float64))
        scores = x @ (inverse / inverse.abs().mean()) @ t.T
        total = total + (scores / scores.pow(2).mean(0).sqrt() if normalized else scores)
    q = torch.stack([torch.as_tensor(q).double() for q in out_to_loss]).mean(0)
    return (total / len(train_features) * (q[:, None] if weighted else 1)).numpy()


def reference_scores(model, train, targets, checkpoints, lambda_reg=None, param_names=None, estimator="trak"):
    """float64 TRAK by the formula: per-example autograd gradients on unpadded examples, direct inversion.
    ``estimator="hf_trak"``: its global-kernel form (no Q, λ = 1·tr/k, the weights and not the biases, each
    checkpoint's scores of a target divided by their RMS over the train rows), what it uses with the identity
    projector.

    Gradients are taken with respect to ``param_names`` (default: all parameters; hf_trak: all but the
    ``*.bias`` ones); ``checkpoints``
    are full state dicts. Q of classification heads is 1 − softmax(logits)_y computed here;
    other heads use the task's Q (checked against closed forms in test_model_outputs).
    """
    model = copy.deepcopy(model).double()
    task = AutoModelOutput.from_model(model)
    parameters = dict(model.named_parameters())
    all_names = list(parameters)
    names = all_names if param_names is None else list(param_names)
    if param_names is None and estimator == "hf_trak":
        names = [name for name in all_names if not name.endswith(".bias")]
    p = sum(parameters[name].numel() for name in names)

    def features(task, weights, data):
        rows, qs = [], []
        for example in ExampleSource.for_model(data, model, task).batches(1):
            example = _double(example)
            params = {name: weights[name].clone().requires_grad_(name in names) for name in all_names}
            output = task.get_output(model, params, {}, example)
            grads = torch.autograd.grad(output, [params[name] for name in names], allow_unused=True)
            grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
            rows.append(torch.cat([g.reshape(-1) for g in grads]) / np.sqrt(p))
            if isinstance(task, ClassificationModelOutput):
                logits = call_model(model, weights, {}, without_labels(example)).logits
                qs.append(1 - torch.softmax(logits[0], -1)[example["labels"][0]])
            else:
                qs.append(task.get_out_to_loss_grad(model, weights, {}, example)[0])
        return torch.stack(rows), torch.stack(qs).detach()

    xs, ts, qs = [], [], []
    train_source = ExampleSource.for_model(train, model, task)
    for checkpoint in checkpoints:
        weights = {name: checkpoint[name].double() for name in all_names}
        bound = task.at_checkpoint(model, weights, {}, lambda n, seed: _double(train_source.sample(n, seed)))
        x, q = features(bound, weights, train)
        xs.append(x), qs.append(q), ts.append(features(bound, weights, targets)[0])
    if estimator == "hf_trak":
        return kernel_scores(xs, ts, qs, lambda_reg, GLOBAL_LAMBDA_SCALE, weighted=False, normalized=True)
    return kernel_scores(xs, ts, qs, lambda_reg)


# The closed-form parity cases: (model, train split, target split) for each head.
CASES = {
    "image": (tiny_vit, lambda: digits(24), lambda: digits(6, offset=100)),
    "text": (tiny_bert, lambda: token_sequences(24), lambda: token_sequences(6, seed=1)),
    "clip": (tiny_clip, lambda: clip_pairs(20), lambda: clip_pairs(5, seed=1)),
    "causal_lm": (tiny_gpt2, lambda: lm_sequences(20), lambda: lm_sequences(5, seed=1)),
}


PARITY_CASES = [("image", None), ("image", 1e-3), ("text", None), ("text", 1e-3), ("clip", None), ("causal_lm", None)]


def identity_traker(case, lambda_reg, estimator="trak"):
    """``TRAKer`` with the identity projector (raw gradients, float32) featurized on one of ``CASES``, at
    three checkpoints: ``(traker, model, train, targets, checkpoints)``."""
    make_model, make_train, make_targets = CASES[case]
    model, train, targets = make_model(), make_train(), make_targets()
    checkpoints = [model.state_dict(), perturbed_state_dict(model, seed=1), perturbed_state_dict(model, seed=2)]
    traker = TRAKer(
        model,
        projector="identity",
        proj_dim=None,
        dtype=torch.float32,
        save_dir=None,
        lambda_reg=lambda_reg,
        estimator=estimator,
    )
    return traker.featurize(train, checkpoints, batch_size=5), model, train, targets, checkpoints
