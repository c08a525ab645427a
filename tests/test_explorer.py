"""The explorer's engine (``Explorer``, ``FeatureIndex``) and app (``ExplorerApp``) without a browser.

Every query is checked against a second path: ``attribute()``'s top-k, ``TRAKer.top_k``, or
the score matrix indexed by hand.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from PIL import Image as PILImage
from scipy.stats import rankdata
from transformers import ViTImageProcessor

import hf_trak
from hf_trak import InvalidArgumentError, InvalidInputError, TRAKer
from hf_trak.explore.explorer import Explorer
from hf_trak.testing.datasets import digit_images, digits, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_gpt2, tiny_vit, word_tokenizer
from hf_trak.testing.processes import subprocess_env

pytest.importorskip("faiss")
SETTINGS = dict(proj_dim=32, dtype=torch.float32)


def raw_text(n, seed=0):
    return token_sequences(n, seed=seed).select_columns(["text", "labels"]).rename_column("labels", "label")


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """A text classifier saved at two checkpoints with its tokenizer, and its store over 40 raw rows."""
    root = tmp_path_factory.mktemp("text")
    model, tokenizer = tiny_bert(), word_tokenizer()
    folders = []
    for step, seed in ((1, None), (2, 3)):
        folder = str(root / f"checkpoint-{step}")
        if seed is not None:
            model.load_state_dict(perturbed_state_dict(model, seed, scale=0.3))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    train, targets = raw_text(40), raw_text(6, seed=1)
    result = hf_trak.attribute(folders, train, targets, processor=tokenizer, k=5, save_dir=str(root / "store"),
                               shard_size=16, **SETTINGS)  # fmt: skip
    return dict(root=root, store=str(root / "store"), train=train, targets=targets, result=result, folders=folders)


def _top(result, target, kind):
    rows = result.top_k.filter(lambda r: r["target"] == target and r["kind"] == kind)
    return list(rows["train_index"]), np.array(rows["score"])


@pytest.mark.parametrize("index", [None, "exact"])
def test_a_target_row_gives_attributes_top_k_and_the_checkpoints_agreement(text_store, index):
    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"],
                                   index=index, k=5)  # fmt: skip
    assert len(explorer.views) == 2 and explorer.text_columns == ["text"] and explorer.label_column == "label"
    scores = text_store["result"].scores
    for target in range(6):
        query = explorer.query(explorer.target_example(target))
        assert query.label == text_store["targets"][target]["label"]
        for kind, found in (("proponent", query.proponents), ("opponent", query.opponents)):
            rows, values = _top(text_store["result"], target, kind)
            assert [n.row for n in found] == rows
            np.testing.assert_allclose([n.score for n in found], values, rtol=1e-4, atol=1e-6 * np.abs(values).max())
            assert [n.example["text"] for n in found] == [text_store["train"][r]["text"] for r in rows]
        # Agreement, second path: each checkpoint's share τ_m = Q̄ ⊙ Φ_m t_m from the stored Φ, by hand.
        traker = explorer.traker
        features, _, _ = explorer.target_features(explorer.target_example(target))
        store, shares = traker.store, []
        q = np.mean([store.out_to_loss(m) for m in range(2)], axis=0)
        q = q if store.config.train_weight == "out_to_loss" else np.ones_like(q)  # Q̄, or 1 (the default)
        for m in range(2):
            phi = np.concatenate([store.shard(m, a, b, "preconditioned")[0] for a, b in store.shard_ranges()])
            scale = store.load_kernel(m, ["phi_scale"])["phi_scale"].numpy()
            shares.append(q * (phi @ (features[m][0].numpy() * scale)))
        ensemble = set(np.argsort(-scores[:, target])[:5])
        expected = [len(ensemble & set(np.argsort(-share)[:5])) / 5 for share in shares]
        assert query.agreement == pytest.approx(expected)
    assert any(share < 1 for share in query.agreement)  # the checkpoints differ (else the check is vacuous)


def test_a_new_input_is_attributed_for_the_prediction_or_a_chosen_label(text_store):
    explorer = Explorer.from_store(text_store["store"], text_store["train"], k=4)
    text = "5 6 7 8 9"
    model = explorer.model
    inputs = word_tokenizer()([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]  # the model loaded is the last checkpoint
    predicted = int(logits.argmax())
    for label in (None, (predicted + 1) % 3):
        query = explorer.query(explorer.new_example(text), label=label)
        attributed = predicted if label is None else label
        assert query.label == attributed
        assert query.prediction.startswith(f"LABEL_{predicted} (p = {float(logits.softmax(-1)[predicted]):.2f})")
        target = raw_text(1).map(lambda row: {"text": text, "label": attributed})
        expected = hf_trak.attribute(text_store["folders"], text_store["train"], target, processor=word_tokenizer(),
                                     k=4, save_dir=text_store["store"], shard_size=16, **SETTINGS)  # fmt: skip
        assert [n.row for n in query.proponents] == _top(expected, 0, "proponent")[0]
        assert [n.row for n in query.opponents] == _top(expected, 0, "opponent")[0]
    # Longer than the model takes (16 positions): truncated like a pipeline, as the first 16 tokens.
    long = explorer.query(explorer.new_example(" ".join(["7"] * 40)))
    short = explorer.query(explorer.new_example(" ".join(["7"] * 16)))
    assert [n.row for n in long.proponents] == [n.row for n in short.proponents]


def test_bad_inputs_are_named(text_store):
    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"])
    with pytest.raises(InvalidInputError, match="Enter a text"):
        explorer.new_example("   ")
    with pytest.raises(InvalidInputError, match="Target rows are 0 to 5, not 6"):
        explorer.target_example(6)


def test_the_index_is_the_brute_force_top_k_with_excluded_rows_and_several_checkpoints():
    """``FeatureIndex`` ("Flat", and IVF probing every list) against ``TRAKer.top_k`` on a store with two
    checkpoints, an excluded row, shards of 5, with and without Q, and with the default estimator's per-module
    kernels on the factored projector (block-diagonal K, column-scaled Φ)."""
    from hf_trak.explore.index import FeatureIndex

    model, train = tiny_vit(), digits(23)
    train = train.map(
        lambda row, i: {"pixel_values": np.full((1, 8, 8), np.nan)} if i == 9 else row, with_indices=True
    )
    checkpoints = [model.state_dict(), perturbed_state_dict(model, 1, scale=0.2)]
    variants = [dict(train_weight="out_to_loss"), dict(train_weight="none"), dict(projector="factored", proj_dim=256)]
    for variant in variants:
        traker = TRAKer(model, on_nonfinite="exclude", shard_size=5, **{**SETTINGS, **variant})
        assert traker.config.kernel == ("per_module" if "projector" in variant else "global")
        traker.featurize(train, checkpoints)
        targets = digits(7, offset=40)
        for largest in (True, False):
            expected = traker.top_k(targets, k=6, largest=largest)
            features, _ = traker._target_features(targets, None, None)
            for factory, nprobe in (("Flat", 1), ("IVF2,Flat", 2)):
                found = FeatureIndex(traker.store, factory, nprobe=nprobe).search(features, 6, largest)
                np.testing.assert_array_equal(found.indices, expected.indices)
                # float32 sums in another order: differences of a few 1e-6 of the largest score
                scale = np.abs(expected.scores).max()
                np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-4, atol=1e-5 * scale)
            everything = FeatureIndex(traker.store).search(features, 23, largest)
            assert (everything.indices[:, -1] == 9).all()  # the excluded row ranks last
    with pytest.raises(InvalidArgumentError, match="Cannot build the faiss index 'IVF64,Flat' over 23 rows"):
        FeatureIndex(traker.store, "IVF64,Flat")


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    model = tiny_vit()
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model.save_pretrained(str(root / "model"))
    processor.save_pretrained(str(root / "model"))
    train, targets = digit_images(30), digit_images(4, offset=30)
    result = hf_trak.attribute(str(root / "model"), train, targets, processor=processor, k=3,
                               save_dir=str(root / "store"), **SETTINGS)  # fmt: skip
    return dict(root=root, store=str(root / "store"), train=train, targets=targets, result=result)


def test_images_an_uploaded_one_and_a_wrong_size(image_store):
    explorer = Explorer.from_store(image_store["store"], image_store["train"], k=3)
    assert explorer.image_column == "image" and explorer.text_columns == []
    target = image_store["targets"][2]
    uploaded = explorer.query(explorer.new_example(image=target["image"].convert("RGB")), label=target["label"])
    assert [n.row for n in uploaded.proponents] == _top(image_store["result"], 2, "proponent")[0]
    with pytest.raises(InvalidInputError, match=r"The image is 16×16 pixels; this model takes 8×8 .*an image of 8×8"):
        explorer.new_example(image=PILImage.new("L", (16, 16)))
    with pytest.raises(InvalidInputError, match="Upload an image"):
        explorer.new_example()


def test_a_target_row_in_the_image_input_comes_back_as_its_own_pixels(image_store):
    """The image input shows the picked row; "Attribute" (another label, say) sends it back through Gradio's
    postprocess and preprocess: the row's pixels, attributed as ``attribute`` does the row. The results are PNG
    files of the train images, enlarged."""
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    explorer = Explorer.from_store(image_store["store"], image_store["train"], targets=image_store["targets"], k=3)
    app = ExplorerApp(explorer)
    message, summary, proponents, opponents, shown, last, image, label, view, row = app.on_target_row(2)
    target = image_store["targets"][2]
    back = app.image.preprocess(app.image.postprocess(image))
    assert np.array_equal(np.asarray(back.convert("L")), np.asarray(target["image"]))
    again = app.on_attribute(back, explorer.label_name(target["label"]))
    assert again[0] == "" and again[4][0] == shown[0] == _top(image_store["result"], 2, "proponent")[0]
    for (path, caption), train_row in zip(proponents, shown[0]):
        enlarged = image_store["train"][train_row]["image"].resize((160, 160), resample=0)
        assert caption.startswith(f"#{train_row} ") and path.endswith(".png")
        assert np.array_equal(np.asarray(PILImage.open(path)), np.asarray(enlarged))
    assert np.array_equal(np.asarray(PILImage.open(view)), np.asarray(target["image"].resize((160, 160), resample=0)))


def test_an_image_file_is_written_once_never_in_place(tmp_path):
    """A client may be fetching an image's file while another answer shows the same image: the file is not
    written again (nor in place), and a mode PNG cannot hold is handed to Gradio as it is."""
    from hf_trak.explore.images import ImageFiles

    files, image = ImageFiles(str(tmp_path)), digit_images(1)[0]["image"]
    path = files.path(image)
    assert np.array_equal(np.asarray(PILImage.open(path)), np.asarray(image)) and path.endswith(".png")
    with open(path, "wb") as file:
        file.write(b"written before")
    assert files.path(image) == path and open(path, "rb").read() == b"written before"
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no staging file left behind
    assert files.path(image.convert("RGB")) != path
    cmyk = image.convert("CMYK")
    assert files.path(cmyk) is cmyk and files.path(None) is None


def test_the_temporary_image_folder_is_made_by_the_first_image_and_removed_with_its_files():
    """A page without images makes no folder; one with images has its folder removed with it."""
    import gc

    from hf_trak.explore.images import ImageFiles

    files = ImageFiles()
    files.path(None)
    assert files.folder is None
    path = files.path(digit_images(1)[0]["image"])
    folder = files.folder
    assert os.path.dirname(path) == folder and os.path.isfile(path)
    del files
    gc.collect()
    assert not os.path.exists(folder)


def test_a_causal_lm_is_explored_by_its_text(tmp_path):
    model, tokenizer = tiny_gpt2(), word_tokenizer()
    model.save_pretrained(str(tmp_path / "lm"))
    tokenizer.save_pretrained(str(tmp_path / "lm"))
    train = token_sequences(20).select_columns(["text"])
    expected = hf_trak.attribute(str(tmp_path / "lm"), train, train.select([3]), processor=tokenizer, k=3,
                                 save_dir=str(tmp_path / "store"), **SETTINGS)  # fmt: skip
    explorer = Explorer.from_store(str(tmp_path / "store"), train, k=3)
    query = explorer.query(explorer.new_example(train[3]["text"]))
    assert query.label is None and query.prediction.startswith("mean token log-probability")
    assert [n.row for n in query.proponents] == _top(expected, 0, "proponent")[0]


def test_the_app_shows_a_store_that_does_not_match_in_the_page(text_store):
    gradio = pytest.importorskip("gradio")
    blocks = hf_trak.explore(text_store["store"], raw_text(39), launch=False)  # one row fewer than the store
    shown = [c.value for c in blocks.blocks.values() if isinstance(c, gradio.Markdown)]
    assert any("Error:" in text and "39 rows" in text for text in shown), shown
    blocks = hf_trak.explore(text_store["store"], text_store["train"], model=tiny_vit(), launch=False)
    shown = [c.value for c in blocks.blocks.values() if isinstance(c, gradio.Markdown)]
    assert any("Error:" in text and "made for a BertForSequenceClassification" in text for text in shown), shown


def test_the_app_handlers_show_results_and_errors_in_the_page(text_store):
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"], k=5)
    app = ExplorerApp(explorer)
    message, summary, proponents, opponents, shown, last, text, label, row = app.on_target_row(2)
    assert last == (text_store["targets"][2], text_store["targets"][2]["label"]) and app.tokens is None
    rows, _ = _top(text_store["result"], 2, "proponent")
    own = explorer.label_name(text_store["targets"][2]["label"])
    assert message == "" and f"Top proponent:** train row {rows[0]}" in summary
    assert f"**attributed label:** {own} (its own)" in summary
    assert "checkpoint-1: " in summary and "checkpoint-2: " in summary  # the agreement, by checkpoint name
    assert [row[1] for row in proponents] == rows and shown[0] == rows
    assert [rank for rank, *_ in proponents] == [1, 2, 3, 4, 5]
    assert text == text_store["targets"][2]["text"] and row == 2
    assert label == "the prediction"  # the label field is not left at the row's label for the next new input

    class Click:  # what Gradio passes a Dataframe's select handler: (row, column)
        index = (0, 1)

    message, summary, *_, label, row = app.on_select(shown, Click(), 0)
    assert message == "" and f"**Target:** train row {rows[0]} ·" in summary
    assert label == "the prediction" and row is None  # the row field does not keep the old target row
    message, summary, *_ = app.on_attribute("", "the prediction")
    assert message.startswith("**Error:** Enter a text") and not isinstance(summary, str)  # summary left as it was
    message, *_ = app.on_target_row(99)
    assert "Target rows are 0 to 5" in message and "Traceback" not in message
    message, *_ = app.on_target_row(2.5)
    assert "The target row must be a whole number, got 2.5" in message


def test_a_new_input_is_attributed_for_its_prediction_after_a_row_unless_a_label_is_picked(text_store):
    """The label field after a target row holds "the prediction": a new input then gets its prediction's
    scores, not the previous row's label; a label picked for it is attributed and said so."""
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"], k=5)
    app = ExplorerApp(explorer)
    text = "5 6 7 8 9"
    predicted = explorer.query(explorer.new_example(text)).label
    for row in range(len(text_store["targets"])):  # a row whose own label is not the prediction
        if text_store["targets"][row]["label"] != predicted:
            break
    *_, label_field, _ = app.on_target_row(row)
    _, summary, proponents, *_ = app.on_attribute(text, label_field)
    expected = explorer.query(explorer.new_example(text), label=predicted)
    assert f"**attributed label:** {explorer.label_name(predicted)} (the model's prediction)" in summary
    assert [r[1] for r in proponents] == [n.row for n in expected.proponents]
    other = (predicted + 1) % len(explorer.label_names)
    _, summary, proponents, *_ = app.on_attribute(text, explorer.label_name(other))
    assert f"**attributed label:** {explorer.label_name(other)} (picked in the page)" in summary
    assert [r[1] for r in proponents] == [n.row for n in explorer.query(explorer.new_example(text), other).proponents]


def test_explore_refuses_a_missing_store_before_serving(tmp_path):
    """``hf-trak explore`` with a store that is not there exits 1 with one line, instead of serving a page."""
    pytest.importorskip("gradio")
    DatasetDict(train=raw_text(4)).save_to_disk(str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "hf_trak.cli", "explore", "--store", str(tmp_path / "missing"),
                           "--dataset", str(tmp_path / "data")], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1 and "running on" not in done.stdout
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("hf-trak: error: ") and "missing' does not exist" in error


def test_explore_refuses_a_store_of_another_split_before_serving(text_store, tmp_path):
    """A split other than the store's (one row fewer) exits 1 naming the difference and the --train-subset it
    takes, before serving."""
    pytest.importorskip("gradio")
    DatasetDict(train=raw_text(39)).save_to_disk(str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "hf_trak.cli", "explore", "--store", text_store["store"],
                           "--dataset", str(tmp_path / "data")], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    error = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "running on" not in done.stdout
    assert error.startswith("hf-trak: error: ") and "39 rows" in error and "--train-subset" in error, error


def test_importing_hf_trak_and_its_cli_does_not_import_gradio_or_faiss_and_a_missing_extra_is_named():
    script = textwrap.dedent("""
        import sys
        import hf_trak, hf_trak.cli
        assert not {"gradio", "faiss"} & set(sys.modules), sorted({"gradio", "faiss"} & set(sys.modules))
        sys.modules["gradio"] = None  # as if not installed
        try:
            hf_trak.explore("store", None)
        except ImportError as error:
            print("ERROR:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR: hf_trak's explorer needs Gradio: pip install 'hf_trak[app]'." in result.stdout
    cli = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['gradio'] = None; from hf_trak.cli import main; main()",
         "explore", "--store", os.devnull, "--dataset", os.devnull],
        env=subprocess_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert (
        cli.returncode == 1
        and cli.stderr == "hf-trak: error: hf_trak's explorer needs Gradio: pip install 'hf_trak[app]'.\n"
    )


def test_the_space_app_without_its_variables_says_which_to_set(monkeypatch):
    gradio = pytest.importorskip("gradio")
    import runpy

    for name in ("HF_TRAK_STORE", "HF_TRAK_DATASET"):
        monkeypatch.delenv(name, raising=False)
    space = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "space", "app.py")
    blocks = runpy.run_path(space)["demo"]
    shown = [c.value for c in blocks.blocks.values() if isinstance(c, gradio.Markdown)]
    assert any("Set the Space variables HF\\_TRAK\\_STORE, HF\\_TRAK\\_DATASET" in text for text in shown), shown


def test_clip_takes_a_caption_and_an_image(tmp_path):
    """CLIP with a processor function: the columns named give the page a text box and an image upload."""
    from hf_trak.testing.models import tiny_clip

    model, tokenizer = tiny_clip(), word_tokenizer()
    images = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model.save_pretrained(str(tmp_path / "clip"))

    def process(batch):
        inputs = dict(tokenizer([c + " [SEP]" for c in batch["caption"]], padding="max_length", max_length=8))
        inputs.pop("token_type_ids", None)
        inputs["pixel_values"] = images([image.convert("L") for image in batch["image"]])["pixel_values"]
        return inputs

    pairs = digit_images(24).map(lambda row, i: {"caption": " ".join(str(3 + (i * 7 + j) % 30) for j in range(4))},
                                 with_indices=True).remove_columns("label")  # fmt: skip
    train, targets = pairs.select(range(20)), pairs.select(range(20, 24))
    expected = hf_trak.attribute(str(tmp_path / "clip"), train, targets, processor=process, k=3,
                                 save_dir=str(tmp_path / "store"), **SETTINGS)  # fmt: skip
    explorer = Explorer.from_store(str(tmp_path / "store"), train, processor=process, text_column="caption",
                                   image_column_name="image", k=3)  # fmt: skip
    assert explorer.text_columns == ["caption"] and explorer.image_column == "image" and explorer.label_column is None
    target = targets[1]
    query = explorer.query(explorer.new_example(target["caption"], target["image"]))
    assert query.prediction.startswith("image–text logit") and query.label is None
    assert [n.row for n in query.proponents] == _top(expected, 1, "proponent")[0]
    assert [n.row for n in query.opponents] == _top(expected, 1, "opponent")[0]
    with pytest.raises(InvalidInputError, match="Upload an image"):
        explorer.new_example(target["caption"])
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    app = ExplorerApp(explorer)  # a text box and an image upload, no label
    assert len(app.texts) == 1 and app.image is not None and app.label is None
    message, summary, *_ = app.on_attribute(target["caption"], target["image"])
    assert message == "" and f"Top proponent:** train row {query.proponents[0].row} " in summary


def test_a_train_subset_is_explored_by_its_own_rows(text_store):
    """``train_subset=True`` (``--train-subset``): the subset's rows are matched to the store's, and a target's
    proponents are the subset's best rows, numbered in the subset; an index (over the whole split) is refused."""
    subset_rows = list(range(0, 40, 3))
    subset = text_store["train"].select(subset_rows)
    sub = Explorer.from_store(text_store["store"], subset, targets=text_store["targets"], k=4, train_subset=True)
    full = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"], k=40)
    everything = [n.row for n in full.query(full.target_example(1)).proponents]
    expected = [subset_rows.index(row) for row in everything if row in subset_rows][:4]
    found = sub.query(sub.target_example(1))
    assert [n.row for n in found.proponents] == expected
    assert [n.example["text"] for n in found.proponents] == [subset[row]["text"] for row in expected]
    with pytest.raises(InvalidArgumentError, match="faiss index covers the whole featurized split"):
        Explorer.from_store(text_store["store"], subset, index="exact", train_subset=True)
    from hf_trak.cli import build_parser

    assert build_parser().parse_args(["explore", "--store", "s", "--dataset", "d", "--train-subset"]).train_subset


def test_the_self_influence_list_is_the_stores_and_a_click_on_it_makes_the_target(text_store):
    """The list is ``TRAKer.self_scores``' highest rows (numbered in a train subset's rows for a subset); showing it
    leaves the target's results as they are (its handler's outputs are the message, the list and its rows); a
    click on a listed row makes that row the target, with its own label."""
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp
    from hf_trak.self_influence import suspicion

    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"], k=4)
    ranks, _, values = suspicion(explorer.traker)
    expected = np.argsort(-ranks, kind="stable")[:4].tolist()
    assert [n.row for n in explorer.self_influence()] == expected
    assert [n.example["text"] for n in explorer.self_influence()] == [text_store["train"][i]["text"] for i in expected]
    app = ExplorerApp(explorer)
    _, summary_before, *_ = app.on_target_row(1)
    message, table, ranked = app.on_self_influence()
    assert message == "" and ranked == expected and [row[1] for row in table] == expected
    assert [row[2] for row in table] == [round(float(values[i]), 6) for i in expected]

    class Click:
        index = (2, 0)

    message, summary, proponents, *_ = app.on_select((ranked,), Click(), 0)
    own = explorer.label_name(text_store["train"][expected[2]]["label"])
    assert message == "" and f"**Target:** train row {expected[2]} ·" in summary and f"{own} (its own)" in summary
    assert summary != summary_before
    query = explorer.query(explorer.train_example(expected[2]))
    assert [row[1] for row in proponents] == [n.row for n in query.proponents]

    subset_rows = list(range(1, 40, 2))
    sub = Explorer.from_store(text_store["store"], text_store["train"].select(subset_rows), k=3, train_subset=True)
    on_output, on_loss = (explorer.traker.self_scores(on=on)[subset_rows] for on in ("output", "loss"))
    in_subset = np.argsort(-(rankdata(on_output) + rankdata(on_loss)), kind="stable")[:3].tolist()
    assert [n.row for n in sub.self_influence()] == in_subset


def test_the_token_view_splits_the_pages_proponents_and_is_cleared_by_the_next_target(text_store, tmp_path):
    """With the factored projector, "Split the proponents' scores by token" shades the target's and each
    proponent's tokens; each proponent's shares sum to its score on the page; a new target clears the view
    (it would otherwise describe the previous target under the new one's results)."""
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    folder = text_store["folders"][-1]
    hf_trak.attribute([folder], text_store["train"], text_store["targets"], processor=word_tokenizer(),
                      save_dir=str(tmp_path / "factored"), projector="factored", proj_dim=64,
                      dtype=torch.float32)  # fmt: skip
    explorer = Explorer.from_store(str(tmp_path / "factored"), text_store["train"], targets=text_store["targets"], k=3)
    app = ExplorerApp(explorer)
    assert explorer.has_token_scores and app.tokens is not None
    message, summary, proponents, opponents, shown, last, tokens, *_ = app.on_target_row(1)
    assert tokens == "" and last[0] == text_store["targets"][1]
    message, page = app.on_tokens(last, shown)
    assert message == ""
    found = explorer.token_scores(last[0], last[1], shown[0])
    for tokens, row in zip(found, proponents):
        assert tokens.train_index == row[1]
        assert tokens.train_tokens.sum() + tokens.train_pooled == pytest.approx(row[2], rel=1e-3, abs=1e-5)
        assert f"<b>#{row[1]}</b>" in page
    words = text_store["train"][shown[0][0]]["text"].split()
    assert all(f">{word}</span>" in page for word in words)
    *_, tokens_after, _text, _label, _row = app.on_target_row(2)
    assert tokens_after == ""  # the token view of target 1 is not left under target 2's results
    message, _ = app.on_tokens(None, ([], []))
    assert "Attribute a target first" in message


def test_a_click_during_a_query_is_answered_after_it(text_store):
    """Every event of the page is ``always_last``: a click while a query runs is queued, not dropped."""
    pytest.importorskip("gradio")
    from hf_trak.explore.app import ExplorerApp

    explorer = Explorer.from_store(text_store["store"], text_store["train"], targets=text_store["targets"], k=3)
    dependencies = ExplorerApp(explorer).blocks.config["dependencies"]
    assert len(dependencies) == 6 and {d["trigger_mode"] for d in dependencies} == {"always_last"}


def test_an_upload_limit_that_is_not_positive_is_refused():
    pytest.importorskip("gradio")
    from hf_trak.cli import build_parser
    from hf_trak.explore.app import serve

    with pytest.raises(SystemExit):  # argparse's usage error, exit 2
        build_parser().parse_args(["explore", "--store", "s", "--dataset", "d", "--max-upload-mb", "0"])
    for bad in (0, -1, "10", True):
        with pytest.raises(InvalidArgumentError, match="max_upload_mb must be a number of megabytes > 0"):
            serve(None, max_upload_mb=bad)
