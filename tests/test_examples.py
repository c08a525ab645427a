"""Each example runs on its offline default and its attributions pass a sanity check.

The checks compare with what random attributions would give: top proponents share the
target's label (or digit, or words) far more often than chance.
"""

import importlib
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)  # the examples import their sibling offline_data.py

    def load(name):
        return importlib.import_module(name)

    return load


def label_agreement(top, kind: str) -> float:
    rows = top.filter(lambda row: row["kind"] == kind)
    return float(np.mean(np.array(rows["label"]) == np.array(rows["target_label"])))


def test_text_classification(example, tmp_path):
    result = example("text_classification").main(["--output-dir", str(tmp_path)])
    assert result.scores.shape == (96, 16) and len(result.traker.checkpoints) == 3
    assert label_agreement(result.top_k, "proponent") > 0.8  # random: ~0.5
    assert result.top_k[0]["target_text"] in open(tmp_path / "report.html").read()


def test_image_classification(example, tmp_path):
    args = ["--output-dir", str(tmp_path), "--num-train", "200", "--num-test", "20", "--epochs", "8"]
    result = example("image_classification").main(args)
    assert result.scores.shape == (200, 20) and len(result.traker.checkpoints) == 4  # save_total_limit=4
    assert label_agreement(result.top_k, "proponent") > 0.4  # random: ~0.1
    assert os.path.getsize(tmp_path / "report.png") > 0


def test_causal_lm(example, tmp_path):
    result = example("causal_lm").main(["--output-dir", str(tmp_path)])
    assert result.scores.shape == (64, 8)

    def overlap(a: str, b: str) -> float:
        a, b = set(a.split()), set(b.split())
        return len(a & b) / len(a | b)

    train_texts = result.top_k.unique("text")
    proponents = result.top_k.filter(lambda row: row["kind"] == "proponent")
    top = np.mean([overlap(row["text"], row["target_text"]) for row in proponents])
    anyone = np.mean([overlap(text, row["target_text"]) for row in proponents for text in train_texts])
    assert top > anyone + 0.1
    assert os.path.exists(tmp_path / "report.html")


def test_clip(example, tmp_path):
    result = example("clip_attribution").main(["--output-dir", str(tmp_path), "--num-train", "120"])
    proponents = result.top_k.filter(lambda row: row["kind"] == "proponent")
    same_digit = np.mean([row["caption"] == row["target_caption"] for row in proponents])
    assert same_digit > 0.5  # random: ~0.1
    assert os.path.getsize(tmp_path / "report.png") > 0


def test_trainer(example, tmp_path):
    scores, top = example("trainer_attribution").main(["--output-dir", str(tmp_path)])
    assert scores.shape == (96, 16)
    assert label_agreement(top, "proponent") > 0.8
    assert os.path.exists(tmp_path / "report.html") and os.path.exists(tmp_path / "trak" / "trak_arguments.json")
