"""``hf-trak explore`` in a real browser: the CLI serves the app, headless Chromium (Debian's ``chromium``)
driven by Playwright enters targets, reads the results and clicks through them.

Skipped where Chromium or Playwright is missing, except under ``HF_TRAK_REQUIRE_BROWSER=1``
(``.ci/run`` sets it after installing both), where that fails. With ``HF_TRAK_SCREENSHOT=path``
the image test also saves its screenshot there (the README's: ``docs/assets/explorer.png``).
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from transformers import ViTImageProcessor

import hf_trak
from hf_trak.testing.datasets import digit_images, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_vit, word_tokenizer
from hf_trak.testing.processes import subprocess_env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SETTINGS = dict(proj_dim=32, dtype=torch.float32)
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = "Chromium is not installed (apt-get install chromium)"
    if missing:
        if os.environ.get("HF_TRAK_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve(tmp_path):
    """``serve(*cli_arguments) -> url``: ``hf-trak explore ...`` in a process, stopped after the test."""
    processes = []

    def start(*arguments):
        port = _free_port()
        log = open(tmp_path / f"explore-{port}.log", "w+")
        command = [sys.executable, "-m", "hf_trak.cli", "explore", *arguments, "--port", str(port)]
        process = subprocess.Popen(command, env=subprocess_env(GRADIO_ANALYTICS_ENABLED="False"), stdout=log,
                                   stderr=subprocess.STDOUT, text=True)  # fmt: skip
        processes.append(process)
        deadline = time.time() + 180
        while time.time() < deadline:
            log.seek(0)
            output = log.read()
            if "explorer running on" in output:
                return f"http://127.0.0.1:{port}/"
            assert process.poll() is None, output[-3000:]
            time.sleep(0.5)
        raise TimeoutError(output[-3000:])

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def _summary(page) -> str:
    return page.locator("#summary").inner_text()


def _wait_for(page, selector: str, text: str) -> str:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.innerText || '').includes(text)",
        arg=[selector, text],
        timeout=TIMEOUT_MS,
    )
    return page.locator(selector).inner_text()


def _pick_target_row(page, row) -> str:
    """Attribute row ``row`` of the target split in the page; returns the summary once it names that row."""
    page.locator("#target-row input").fill(str(row))
    page.locator("#pick").click()
    return _wait_for(page, "#summary", f"Target: target row {row} ·")


def _top_row(result, target: int = 0) -> int:
    top = result.top_k.filter(lambda row: row["target"] == target and row["kind"] == "proponent")
    return int(top["train_index"][0])


def _text_store(tmp_path, num_train: int, num_targets: int):
    """A text classifier saved with its tokenizer in ``model``, raw splits in ``data`` (save_to_disk) and their
    store in ``store``: ``(model, tokenizer, splits, attribute()'s result)``."""
    model, tokenizer = tiny_bert(), word_tokenizer()
    model.save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    splits = DatasetDict(
        train=token_sequences(num_train).select_columns(["text", "labels"]).rename_column("labels", "label"),
        test=token_sequences(num_targets, seed=1).select_columns(["text", "labels"]).rename_column("labels", "label"),
    )
    splits.save_to_disk(str(tmp_path / "data"))
    result = hf_trak.attribute(str(tmp_path / "model"), splits["train"], splits["test"], processor=tokenizer,
                               save_dir=str(tmp_path / "store"), **SETTINGS)  # fmt: skip
    return model, tokenizer, splits, result


def test_typed_text_shows_attributes_top_proponent_and_a_click_makes_it_the_target(tmp_path, browser, serve):
    model, tokenizer, splits, _ = _text_store(tmp_path, 40, 5)
    store = str(tmp_path / "store")

    text = "5 6 7 8 9"
    with torch.no_grad():
        predicted = int(model(**tokenizer([text], return_tensors="pt")).logits.argmax())
    typed = splits["test"].select([0]).map(lambda row: {"text": text, "label": predicted})
    expected = _top_row(hf_trak.attribute(str(tmp_path / "model"), splits["train"], typed, processor=tokenizer,
                                          save_dir=store, **SETTINGS))  # fmt: skip

    url = serve("--store", store, "--dataset", str(tmp_path / "data"))
    page = browser.new_page()
    page.goto(url)
    page.locator("#text-0 textarea").fill(text)
    page.locator("#attribute").click()
    summary = _wait_for(page, "#summary", "Top proponent")
    assert f"Top proponent: train row {expected} " in summary, summary
    assert page.locator("#proponents [data-testid=cell-0-1]").inner_text() == str(expected)
    assert page.locator("#proponents [data-testid=cell-0-0]").inner_text() == "1"  # ranks count from 1

    page.locator("#proponents [data-testid=cell-0-1]").click()
    _wait_for(page, "#summary", f"Target: train row {expected} ·")
    assert "(its own)" in _summary(page)
    assert page.locator("#text-0 textarea").input_value() == splits["train"][expected]["text"]

    page.locator("#text-0 textarea").fill("  ")  # bad input: a message in the page, and the server lives on
    page.locator("#attribute").click()
    assert "Error: Enter a text" in _wait_for(page, "#message", "Error")
    page.locator("#text-0 textarea").fill(text)
    page.locator("#attribute").click()
    assert f"train row {expected} " in _wait_for(page, "#summary", "a new input")

    # A target row with another label than the new text's prediction, then the new text: attributed for its
    # prediction (the label field does not keep the row's label), and the page says so.
    other = [row for row in range(len(splits["test"])) if splits["test"][row]["label"] != predicted]
    assert other, "the target split needs a row whose label is not the prediction"
    assert "(its own)" in _pick_target_row(page, other[0])
    page.locator("#text-0 textarea").fill(text)
    page.locator("#attribute").click()
    summary = _wait_for(page, "#summary", "a new input")
    assert "(the model's prediction)" in summary and f"Top proponent: train row {expected} " in summary, summary

    page.locator("#target-row input").fill("2.5")  # not a row: a message, not row 2
    page.locator("#pick").click()
    assert "The target row must be a whole number, got 2.5" in _wait_for(page, "#message", "whole number")
    page.close()


def test_image_targets_rows_uploads_and_clicks(tmp_path, browser, serve):
    from PIL import Image

    model = tiny_vit()
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
    model.save_pretrained(str(tmp_path / "model"))
    processor.save_pretrained(str(tmp_path / "model"))
    splits = DatasetDict(train=digit_images(60), test=digit_images(8, offset=60))
    splits.save_to_disk(str(tmp_path / "data"))
    store = str(tmp_path / "store")
    result = hf_trak.attribute(str(tmp_path / "model"), splits["train"], splits["test"], processor=processor,
                               save_dir=store, **SETTINGS)  # fmt: skip
    url = serve("--store", store, "--dataset", str(tmp_path / "data"), "--k", "8", "--index", "exact",
                "--max-upload-mb", "1")  # fmt: skip

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    _wait_for(page, "body", "exact faiss index")  # --index exact, named so in the header
    summary = _pick_target_row(page, 3)
    assert f"Top proponent: train row {_top_row(result, 3)} " in summary, summary
    captions = page.locator("#proponents .caption-label").all_inner_texts()
    assert len(captions) == 8 and captions[0].startswith(f"#{_top_row(result, 3)} · ")
    shown = [int(caption.split(" ")[0][1:]) for caption in captions]
    np.testing.assert_array_equal(shown, np.argsort(-result.scores[:, 3], kind="stable")[:8])
    if os.environ.get("HF_TRAK_SCREENSHOT"):
        page.screenshot(path=os.environ["HF_TRAK_SCREENSHOT"], full_page=True)
    page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)

    page.locator("#proponents button.thumbnail-item").nth(1).click()
    _wait_for(page, "#summary", f"Target: train row {shown[1]} ·")
    assert page.locator("#target-row input").input_value() == ""  # the row field does not keep row 3
    page.mouse.move(0, 0)  # no hover: every thumbnail of the new results looks alike (no ring left on the clicked one)
    looks = page.eval_on_selector_all(
        "#proponents button.thumbnail-item",
        "items => items.map(i => getComputedStyle(i).borderColor + ' ' + getComputedStyle(i).boxShadow)",
    )
    assert len(set(looks)) == 1, looks

    (tmp_path / "fake.png").write_text("not an image")  # a text file named .png: one line in the page
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "fake.png"))
    page.wait_for_timeout(500)
    page.locator("#attribute").click()
    message = _wait_for(page, "#message", "Error")
    assert "The uploaded file is not an image this app can read" in message, message
    assert "Target: train row" in _summary(page)  # the last answer stays, with the message above it

    Image.new("L", (16, 16), 128).save(tmp_path / "large.png")
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "large.png"))
    page.wait_for_timeout(500)
    page.locator("#attribute").click()
    message = _wait_for(page, "#message", "16×16")  # the message of this upload replaces the one before
    assert "The image is 16×16 pixels; this model takes 8×8" in message and "Traceback" not in message
    assert "not an image" not in message

    with open(tmp_path / "huge.png", "wb") as file:  # over --max-upload-mb: refused by the server, with a message
        Image.new("L", (8, 8), 128).save(file, format="PNG")
        file.write(os.urandom(2 * 2**20))
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "huge.png"))
    page.wait_for_function("() => /maximum|too large|exceeds/i.test(document.body.innerText)", timeout=TIMEOUT_MS)
    page.close()
    log = open(next(tmp_path.glob("explore-*.log"))).read()
    assert "Traceback" not in log and log.count("not an image this app can read") == 1, log[-3000:]


def test_a_train_subset_and_the_checkpoints_by_name(tmp_path, browser, serve):
    """``--train-subset``: the page ranks the subset's rows (numbered in it); with two checkpoints the agreement
    line names them by their folders."""
    from hf_trak.testing.models import perturbed_state_dict

    model, tokenizer = tiny_bert(), word_tokenizer()
    folders = []
    for step, seed in ((1, None), (2, 3)):
        if seed is not None:
            model.load_state_dict(perturbed_state_dict(model, seed, scale=0.3))
        folders.append(str(tmp_path / f"checkpoint-{step}"))
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    raw = token_sequences(30).select_columns(["text", "labels"]).rename_column("labels", "label")
    targets = token_sequences(4, seed=1).select_columns(["text", "labels"]).rename_column("labels", "label")
    store = str(tmp_path / "store")
    hf_trak.attribute(folders, raw, targets, processor=tokenizer, save_dir=store, **SETTINGS)
    rows = list(range(0, 30, 2))
    subset = DatasetDict(train=raw.select(rows), test=targets)
    subset.save_to_disk(str(tmp_path / "subset"))
    full = hf_trak.attribute(folders, raw, targets, processor=tokenizer, save_dir=store, k=30, **SETTINGS)
    ranked = full.top_k.filter(lambda r: r["target"] == 2 and r["kind"] == "proponent")["train_index"]
    expected = rows.index(next(row for row in ranked if row in rows))  # the best subset row, numbered in the subset

    url = serve("--store", store, "--dataset", str(tmp_path / "subset"), "--train-subset", "--k", "3")
    page = browser.new_page()
    page.goto(url)
    summary = _pick_target_row(page, 2)
    assert f"Top proponent: train row {expected} " in summary, summary
    assert "checkpoint-1: " in summary and "checkpoint-2: " in summary, summary
    page.close()


PUSH = """
import sys
from hf_trak import TRAKer
from hf_trak.hf.loading import load_model
store, model, repo = sys.argv[1:4]
print(TRAKer.from_pretrained(store, load_model(model)).push_to_hub(repo))
"""


def test_the_space_app_serves_a_store_pulled_from_the_hub(tmp_path, browser):
    """``examples/space/app.py`` on a features repo of the loopback Hub (``tests/hub_server.py``), as a Space
    runs it: ``python app.py`` with the Space variables and Gradio's port variable."""
    import urllib.request

    from tests.hub_server import HubServer

    _, _, _, result = _text_store(tmp_path, 30, 4)
    space = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "space", "app.py")
    with HubServer() as hub:
        pushed = subprocess.run(
            [sys.executable, "-c", PUSH, str(tmp_path / "store"), str(tmp_path / "model"), "someone/space-trak"],
            env=hub.client_env(tmp_path / "pusher"), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        port = _free_port()
        variables = dict(HF_TRAK_STORE="someone/space-trak", HF_TRAK_DATASET=str(tmp_path / "data"),
                         HF_TRAK_MODEL=str(tmp_path / "model"), GRADIO_SERVER_PORT=str(port))  # fmt: skip
        env = {**hub.client_env(tmp_path / "space"), **variables, "GRADIO_ANALYTICS_ENABLED": "False"}
        log = open(tmp_path / "space.log", "w+")
        process = subprocess.Popen([sys.executable, space], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError:
                    log.seek(0)
                    assert process.poll() is None and time.time() < deadline, log.read()[-3000:]
                    time.sleep(0.5)
            page = browser.new_page()
            page.goto(url)
            summary = _pick_target_row(page, 2)
            assert f"Top proponent: train row {_top_row(result, 2)} " in summary, summary
            page.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
        assert any(path.startswith("/datasets/someone/space-trak/resolve/") for _, path in hub.state.requests)
