"""The ``hf-trak`` console script: featurize, score, top-k, report, push and score from the Hub.

Each command runs as a user runs it (the installed script, in its own process); the Hub is
the loopback server of ``tests/hub_server.py``.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import DatasetDict, load_from_disk

import hf_trak
from hf_trak.attribute import top_k_dataset
from hf_trak.testing.datasets import token_sequences
from hf_trak.testing.models import tiny_bert, word_tokenizer
from hf_trak.testing.processes import subprocess_env
from tests.hub_server import HubServer

pytestmark = pytest.mark.slow  # every test here starts processes or trains models

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hf-trak")


def raw_text(n, seed=0):
    return token_sequences(n, seed=seed).select_columns(["text", "labels"]).rename_column("labels", "label")


@pytest.fixture
def workspace(tmp_path):
    """A model folder (tiny BERT + its tokenizer) and a ``save_to_disk`` DatasetDict of raw text."""
    tiny_bert().save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    DatasetDict(train=raw_text(30), test=raw_text(5, seed=1)).save_to_disk(tmp_path / "data")
    return tmp_path


def hf_trak_cli(*args, cwd, env=None):
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_console_script_is_installed():
    assert os.path.exists(SCRIPT), "pip install -e . installs the hf-trak console script"
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("featurize", "score", "push", "top-k", "report", "demo"))


def test_featurize_score_top_k_report_match_the_python_api(workspace):
    data = ["--dataset", "data"]
    done = hf_trak_cli("featurize", "--model", "model", *data, "--save-dir", "feats", "--proj-dim", "32",
                       "--dtype", "float32", cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = hf_trak_cli("score", "--save-dir", "feats", *data, "--output", "scores.npy", cwd=workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = np.load(workspace / "scores.npy")

    # Second path: the Python one-call API on the same splits, model and processor.
    train, test = raw_text(30), raw_text(5, seed=1)
    expected = hf_trak.attribute(
        tiny_bert(), train, test, processor=word_tokenizer(), proj_dim=32, dtype=torch.float32
    )
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    stored = hf_trak.TRAKer.from_pretrained(str(workspace / "feats"), tiny_bert()).store.load_scores("test")
    np.testing.assert_array_equal(stored, scores)

    done = hf_trak_cli("top-k", "--save-dir", "feats", *data, "--k", "3", "--output", "top", "--report", "r.html",
                       cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    top = load_from_disk(str(workspace / "top"))
    assert top.to_dict() == top_k_dataset(scores, train, test, k=3).to_dict()
    assert test[0]["text"] in open(workspace / "r.html").read()

    done = hf_trak_cli("report", "--top-k", "top", "--output", "again.html", "--num-targets", "2", cwd=workspace)
    assert done.returncode == 0 and open(workspace / "again.html").read().count("<section>") == 2

    refused = hf_trak_cli("top-k", "--save-dir", "feats", *data, "--output", "top", cwd=workspace)
    assert refused.returncode == 1 and refused.stderr == (
        "hf-trak: error: top exists: choose another --output, or pass --overwrite to replace it.\n"
    )
    assert load_from_disk(str(workspace / "top")).to_dict() == top.to_dict()
    refused = hf_trak_cli("report", "--top-k", "top", "--output", "grid.png", cwd=workspace)
    assert refused.returncode == 2 and "no image column" in refused.stderr  # a bad option: usage

    done = hf_trak_cli("self-influence", "--save-dir", "feats", *data, "--top", "4", "--output", "ranking",
                       "--report", "self.html", cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    from hf_trak.self_influence import suspicion

    ranks, _, values = suspicion(hf_trak.TRAKer.from_pretrained(str(workspace / "feats"), tiny_bert()))
    ranking = load_from_disk(str(workspace / "ranking"))
    first = int(np.argmax(ranks))
    assert ranking["train_index"] == np.argsort(-ranks, kind="stable")[:4].tolist()
    assert ranking["text"] == [train[i]["text"] for i in ranking["train_index"]]
    assert f"#{first}: suspicion {ranks[first]:.3f}, score {values[first]:+.4f}" in done.stdout
    assert train[ranking["train_index"][3]]["text"] in open(workspace / "self.html").read()
    refused = hf_trak_cli("self-influence", "--save-dir", "feats", *data, cwd=workspace)
    assert refused.returncode == 2 and "--report" in refused.stderr


def test_bad_input_is_one_clear_line_and_nothing_is_overwritten(workspace):
    DatasetDict(train=raw_text(8).remove_columns("label")).save_to_disk(workspace / "unlabeled")
    done = hf_trak_cli("featurize", "--model", "model", "--dataset", "unlabeled", "--save-dir", "feats", cwd=workspace)
    assert done.returncode == 1 and "labels" in done.stderr and "Traceback" not in done.stderr

    args = ["featurize", "--model", "model", "--dataset", "data", "--save-dir", "feats"]
    assert hf_trak_cli(*args, "--proj-dim", "16", cwd=workspace).returncode == 0
    before = open(workspace / "feats" / "trak_config.json").read()
    done = hf_trak_cli(*args, "--proj-dim", "24", cwd=workspace)
    assert done.returncode == 1 and "overwrite" in done.stderr and "proj_dim" in done.stderr
    assert open(workspace / "feats" / "trak_config.json").read() == before

    done = hf_trak_cli("score", "--save-dir", "nowhere", "--dataset", "data", cwd=workspace)
    assert done.returncode == 1 and "nowhere" in done.stderr

    # a bad setting is a usage error (exit 2) however deep it is found: grad_wrt is checked against the model
    done = hf_trak_cli(*args, "--grad-wrt", "nope.weight", "--save-dir", "other", cwd=workspace)
    assert (
        done.returncode == 2 and "grad_wrt names parameters" in done.stderr and not os.path.exists(workspace / "other")
    )


def test_push_then_score_against_the_pushed_features(workspace):
    featurize = ["featurize", "--model", "model", "--dataset", "data", "--save-dir", "feats", "--proj-dim", "16"]
    assert hf_trak_cli(*featurize, cwd=workspace).returncode == 0
    assert hf_trak_cli("score", "--save-dir", "feats", "--dataset", "data", "--output", "local.npy",
                       cwd=workspace).returncode == 0  # fmt: skip
    with HubServer() as hub:
        pushed = hf_trak_cli("push", "--save-dir", "feats", "--repo-id", "someone/cli-trak", cwd=workspace,
                             env=hub.client_env(workspace / "pusher"))  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert "trak_config.json" in hub.state.repos["someone/cli-trak"]["files"]
        score = ["score", "--from-hub", "someone/cli-trak", "--model", "model", "--dataset", "data"]
        scored = hf_trak_cli(*score, "--output", "hub.npy", cwd=workspace, env=hub.client_env(workspace / "loader"))
        assert scored.returncode == 0, scored.stderr[-3000:]
    np.testing.assert_array_equal(np.load(workspace / "hub.npy"), np.load(workspace / "local.npy"))


def test_grad_wrt_selects_the_differentiated_parameters(workspace):
    names = ["classifier.weight", "classifier.bias"]
    done = hf_trak_cli("featurize", "--model", "model", "--dataset", "data", "--save-dir", "feats",
                       "--proj-dim", "8", "--grad-wrt", *names, cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = hf_trak.TRAKer.from_pretrained(str(workspace / "feats"), tiny_bert()).config
    assert config.param_names == names and config.num_params == 8 * 3 + 3


def test_check_reads_a_trainer_run_back_and_gives_the_python_checks(workspace):
    """``hf-trak check`` on a TRAKHFTrainer's output_dir (checkpoints, saved TrainingArguments, store, initial
    weights) gives the LDS and counterfactual numbers of ``check_attribution``/``check_counterfactual`` run in
    Python on the same splits (its own folder of retrained models: every model is trained again)."""
    from transformers import DataCollatorWithPadding, TrainingArguments

    from hf_trak import TRAKArguments, TRAKHFTrainer, prepare_split

    model, tokenizer = tiny_bert(), word_tokenizer()
    train, test = (prepare_split(split, model, None, tokenizer) for split in (raw_text(30), raw_text(5, seed=1)))
    args = TrainingArguments(output_dir=str(workspace / "out"), num_train_epochs=2, save_strategy="epoch",
                             per_device_train_batch_size=8, learning_rate=5e-3, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, seed=4)  # fmt: skip
    trainer = TRAKHFTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                            data_collator=DataCollatorWithPadding(tokenizer),
                            trak_args=TRAKArguments(proj_dim=16, dtype="float32"))  # fmt: skip
    trainer.train()
    expected = trainer.check_attribution(num_subsets=3, max_steps=2)
    counterfactual = trainer.check_counterfactual([1], k=3, num_seeds=1, max_steps=2)

    done = hf_trak_cli("check", "--output-dir", "out", "--dataset", "data", "--num-subsets", "3", "--max-steps", "2",
                       "--counterfactual", "1", "--k", "3", "--seeds", "1", "--folder", "cli_check",
                       "--report", "check.html", cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(expected) in done.stdout and str(counterfactual) in done.stdout
    assert len(list((workspace / "cli_check").iterdir())) == 3 + 3  # 3 subsets; all data, random, top: 1 seed
    page = open(workspace / "check.html").read()
    assert f"{expected.lds:.3f}" in page and f"{counterfactual.removed_top[0]:+.3f}" in page

    refused = hf_trak_cli("check", "--output-dir", "data", "--dataset", "data", cwd=workspace)
    assert refused.returncode == 1 and "no checkpoint-N folder" in refused.stderr


def test_top_k_per_token_writes_the_token_splits_and_a_shaded_report(workspace):
    featurize = ["featurize", "--model", "model", "--dataset", "data", "--save-dir", "feats", "--projector",
                 "factored", "--proj-dim", "64", "--dtype", "float32"]  # fmt: skip
    assert hf_trak_cli(*featurize, cwd=workspace).returncode == 0
    done = hf_trak_cli("top-k", "--save-dir", "feats", "--dataset", "data", "--k", "2", "--per-token", "--output",
                       "top", "--report", "tokens.html", cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    top = load_from_disk(str(workspace / "top"))
    for row in top:
        total = sum(row["train_token_scores"]) + row["train_pooled"]
        assert total == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert [t for t in row["train_tokens"] if t not in ("[CLS]", "[SEP]")] == row["text"].split()
    assert open(workspace / "tokens.html").read().count('<span class="token"') > len(top)


def test_chat_data_with_the_chat_template_option(tmp_path):
    from hf_trak.testing.models import tiny_gpt2
    from tests.test_chat import chat_tokenizer, conversations

    tiny_gpt2(0).save_pretrained(tmp_path / "lm")
    chat_tokenizer().save_pretrained(tmp_path / "lm")
    DatasetDict(train=conversations(12), test=conversations(2, seed=1)).save_to_disk(tmp_path / "chats")
    common = ["--dataset", "chats", "--chat-template"]
    done = hf_trak_cli("featurize", "--model", "lm", *common, "--save-dir", "feats", "--proj-dim", "32", "--dtype",
                       "float32", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = hf_trak_cli("score", "--save-dir", "feats", *common, "--output", "s.npy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = hf_trak.attribute(tiny_gpt2(0), conversations(12), conversations(2, seed=1), processor=chat_tokenizer(),
                                 chat_template=True, proj_dim=32, dtype="float32").scores  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    refused = hf_trak_cli("featurize", "--model", "lm", "--dataset", "chats", "--save-dir", "other", cwd=tmp_path)
    assert refused.returncode == 2 and "--chat-template" in refused.stderr  # conversations without the option


def test_streamed_splits_are_read_once_into_the_stream_dir(workspace):
    for split, rows in (("train", raw_text(30)), ("test", raw_text(5, seed=1))):
        rows.to_json(str(workspace / "jsonl" / f"{split}.jsonl"))
    data = ["--dataset", "jsonl", "--streaming", "--max-train-examples", "20"]
    done = hf_trak_cli("featurize", "--model", "model", *data, "--save-dir", "feats", "--proj-dim", "32", "--dtype",
                       "float32", cwd=workspace)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = hf_trak_cli("score", "--save-dir", "feats", *data, "--output", "scores.npy", cwd=workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(workspace / "feats-rows")) == ["test", "train"]

    expected = hf_trak.attribute(tiny_bert(), raw_text(30).select(range(20)), raw_text(5, seed=1),
                                 processor=word_tokenizer(), proj_dim=32, dtype=torch.float32)  # fmt: skip
    scores = np.load(workspace / "scores.npy")
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-6 * np.abs(scores).max())
