"""``hf_trak.attribute`` over raw splits with a processor, its top-k dataset, and the reports."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image as PILImage
from transformers import ViTImageProcessor

import hf_trak
from hf_trak.attribute import top_k_dataset
from hf_trak.data.processing import prepare_split
from hf_trak.hf.loading import resolve_model
from hf_trak.report import CAPTION, CELL, GAP, to_pil, write_report
from hf_trak.testing.datasets import digit_images, lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_gpt2, tiny_vit, word_tokenizer

SETTINGS = dict(proj_dim=32, dtype=torch.float32)


def raw_text(n, seed=0):
    """``token_sequences`` as a raw ``load_dataset``-style split: ``text`` and ``label`` only."""
    return token_sequences(n, seed=seed).select_columns(["text", "labels"]).rename_column("labels", "label")


def test_attribute_tokenizes_raw_text_like_the_pretokenized_path(tmp_path):
    train, targets = raw_text(30), raw_text(6, seed=1)
    result = hf_trak.attribute(tiny_bert(), train, targets, processor=word_tokenizer(), k=4, **SETTINGS)

    # Second path: TRAKer on the same token ids, tokenized by hand (the words are the ids).
    reference = hf_trak.TRAKer(tiny_bert(), save_dir=None, **SETTINGS).featurize(token_sequences(30), [tiny_bert()])
    expected = reference.score(token_sequences(6, seed=1))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())

    top = result.top_k.to_pandas()
    assert len(top) == 6 * 2 * 4
    for target in range(6):
        column = result.scores[:, target]
        rows = top[top.target == target]
        proponents = rows[rows.kind == "proponent"].sort_values("rank")
        opponents = rows[rows.kind == "opponent"].sort_values("rank")
        np.testing.assert_array_equal(proponents.train_index, np.argsort(-column, kind="stable")[:4])
        np.testing.assert_array_equal(opponents.train_index, np.argsort(column, kind="stable")[:4])
        np.testing.assert_allclose(proponents.score, column[proponents.train_index], rtol=1e-6)
        assert list(rows.text) == [train[int(i)]["text"] for i in rows.train_index]
        assert set(rows.target_text) == {targets[target]["text"]}

    path = result.save_report(str(tmp_path / "report.html"), num_targets=3)
    page = open(path).read()
    assert page.count("<section>") == 3 and targets[0]["text"] in page and targets[3]["text"] not in page


def test_text_report_escapes_html(tmp_path):
    train = raw_text(12).map(lambda row, i: {"text": f"<b>{i}</b> " + row["text"]}, with_indices=True)
    scores = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)
    page = open(write_report(top_k_dataset(scores, train, raw_text(2, seed=1), k=2), str(tmp_path / "r.html"))).read()
    assert "<b>" not in page and "&lt;b&gt;" in page


def test_attribute_applies_an_image_processor_and_draws_the_grid(tmp_path):
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    train, targets = digit_images(40), digit_images(5, offset=100)
    result = hf_trak.attribute(tiny_vit(), train, targets, processor=processor, k=3, **SETTINGS)

    # Second path: the processor applied by hand to the pixels, as the ``pixel_values`` column.
    def by_hand(split):
        pixels = np.stack([np.asarray(image, np.float32)[None] / 255 for image in split["image"]])
        return Dataset.from_dict({"pixel_values": (pixels - 0.5) / 0.5, "labels": split["label"]})

    reference = hf_trak.TRAKer(tiny_vit(), save_dir=None, **SETTINGS).featurize(by_hand(train), [tiny_vit()])
    np.testing.assert_allclose(result.scores, reference.score(by_hand(targets)), rtol=1e-4, atol=1e-6)

    path = result.save_report(str(tmp_path / "report.png"), num_targets=4)
    grid = PILImage.open(path).convert("RGB")
    assert grid.size == (CELL * 7 + 2 * GAP, 20 + 4 * (CELL + CAPTION + GAP))
    top = result.top_k
    # Row 2 holds target 2 and, second among its proponents, that proponent's train image.
    second = [row for row in top if row["target"] == 2 and row["kind"] == "proponent" and row["rank"] == 1][0]
    cell_top = 20 + 2 * (CELL + CAPTION + GAP)
    for image, left in ((targets[2]["image"], 0), (train[second["train_index"]]["image"], CELL + GAP + CELL)):
        expected = to_pil(image).resize((CELL - 6, CELL - 6), PILImage.NEAREST)
        drawn = grid.crop((left + 3, cell_top + 3, left + CELL - 3, cell_top + CELL - 3))
        assert np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_causal_lm_labels_default_to_the_input_ids():
    lm = tiny_gpt2()
    raw = lm_sequences(12).remove_columns("labels")
    prepared = prepare_split(raw, lm, hf_trak.CausalLMModelOutput(), None)
    assert prepared["labels"] == prepared["input_ids"]
    result = hf_trak.attribute(lm, raw, raw.select(range(3)), k=2, **SETTINGS)
    with_labels = raw.map(lambda row: {"labels": row["input_ids"]})
    reference = hf_trak.TRAKer(tiny_gpt2(), save_dir=None, **SETTINGS).featurize(with_labels, [tiny_gpt2()])
    np.testing.assert_allclose(result.scores, reference.score(with_labels.select(range(3))), rtol=1e-5, atol=1e-7)


def test_a_trainer_output_dir_gives_its_checkpoints_in_step_order(tmp_path):
    for step, seed in ((10, 1), (2, 2)):
        tiny_bert(seed=seed).save_pretrained(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint
    model, checkpoints = resolve_model(str(tmp_path))
    assert checkpoints == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-10")]
    expected = tiny_bert(seed=1).state_dict()  # the last checkpoint is the model
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())


def test_unclear_columns_are_refused_with_the_fix():
    two_texts = raw_text(4).add_column("title", ["a"] * 4).add_column("note", ["b"] * 4)
    with pytest.raises(ValueError, match="text_column="):
        hf_trak.attribute(tiny_bert(), two_texts, two_texts, processor=word_tokenizer(), **SETTINGS)
    with pytest.raises(ValueError, match="image_column="):
        processor = ViTImageProcessor(do_resize=False)
        hf_trak.attribute(tiny_vit(), raw_text(4), raw_text(4), processor=processor, **SETTINGS)
    with pytest.raises(ValueError, match=r"\.png \(images\) or \.html"):
        write_report(top_k_dataset(np.ones((4, 1)), raw_text(4), raw_text(1), k=1), "report.txt")
