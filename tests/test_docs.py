"""Every code block of the README and the docs runs, as a reader would run it: the ``python`` blocks of a page in
one namespace and its ``bash`` blocks in a shell, in page order, in a fresh folder holding what the pages name (a
Trainer ``output_dir`` ``out/`` of a small BERT classifier with its tokenizer), against a loopback Hub that holds a
small ``stanfordnlp/imdb``. The site itself builds strictly (broken links and references fail)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
RUN = ("python", "bash")
# Lines of bash blocks that are not run here, and why: CI runs them itself (.ci/run: make test, make demo, make
# docs), and this environment has the packages the install lines name.
NOT_RUN = ("make ", "pip install ")
DRIVER = """
import json, subprocess, sys
namespace = {"__name__": "__main__"}
for number, (language, code) in enumerate(json.load(open(sys.argv[1]))):
    print(f"--- block {number} ({language})", flush=True)
    if language == "python":
        exec(compile(code, f"block {number}", "exec"), namespace)
    else:
        subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True)
"""

ADJECTIVES = ["great", "superb", "moving", "fine", "dull", "boring", "weak", "awful"]
NOUNS = ["film", "movie", "plot", "cast", "script", "score"]


def blocks(page: Path):
    """The (language, code) blocks of ``page`` that run, without the ``NOT_RUN`` lines."""
    found = []
    for language, code in BLOCK.findall(page.read_text()):
        if language not in RUN:
            continue
        if language == "bash":
            code = "\n".join(line for line in code.splitlines() if not line.startswith(NOT_RUN))
        if code.strip():
            found.append((language, code))
    return found


def reviews(n: int, seed: int) -> Dataset:
    """Templated reviews: positive adjectives give label 1 ("pos"), negative ones 0 ("neg")."""
    rng = np.random.default_rng(seed)
    rows = {"text": [], "label": []}
    for _ in range(n):
        picks = rng.integers(0, len(ADJECTIVES), size=2)
        noun = NOUNS[rng.integers(len(NOUNS))]
        rows["text"].append(f"a {ADJECTIVES[picks[0]]} {noun} with a {ADJECTIVES[picks[1]]} cast")
        rows["label"].append(int(picks[0] < 4))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return Dataset.from_dict(rows, features=features)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "with", *ADJECTIVES, *NOUNS, "cast"]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def write_output_dir(folder: Path) -> None:
    """``folder/checkpoint-500`` and ``folder/checkpoint-1000``: a small BERT classifier and its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})  # fmt: skip
    model = BertForSequenceClassification(config)
    for step in (500, 1000):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(folder / f"checkpoint-{step}")
        tokenizer().save_pretrained(folder / f"checkpoint-{step}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(a folder to copy for each page, the environment of a process that uses the loopback Hub)."""
    root = tmp_path_factory.mktemp("docs")
    template = root / "template"
    write_output_dir(template / "out")
    with HubServer() as hub:
        env = hub.client_env(root / "hf_home")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        push = "from datasets import load_from_disk; load_from_disk(r'{}').push_to_hub('stanfordnlp/imdb')"
        DatasetDict(train=reviews(64, 0), test=reviews(100, 1)).save_to_disk(root / "imdb")
        subprocess.run([sys.executable, "-c", push.format(root / "imdb")], env=env, check=True, capture_output=True)
        yield template, env


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [page for page in PAGES if blocks(page)], ids=lambda page: str(page.relative_to(ROOT))
)
def test_the_code_blocks_of_a_page_run(page, workspace, tmp_path):
    template, env = workspace
    folder = tmp_path / "page"
    shutil.copytree(template, folder)
    (folder / "blocks.json").write_text(json.dumps(blocks(page)))
    done = subprocess.run([sys.executable, "-c", DRIVER, "blocks.json"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, f"{page.name}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_the_pages_have_code_that_runs():
    """The check above is not vacuous: the README and the quickstart hold python and bash blocks."""
    assert {language for language, _ in blocks(ROOT / "README.md")} == {"python", "bash"}
    assert blocks(ROOT / "docs" / "quickstart.md")


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or an unresolved API reference fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "api" / "index.html").read_text().count("TRAKer") > 5


def test_the_readme_links_to_files_that_exist():
    """The README is read on GitHub and PyPI, outside the site: its relative links and images must exist."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", (ROOT / "README.md").read_text())
    local = [target for target in targets if "://" not in target]
    assert local and all((ROOT / target).exists() for target in local), [t for t in local if not (ROOT / t).exists()]
