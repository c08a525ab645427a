"""PEFT/LoRA models: heads detected through the wrapper, adapter checkpoints, float64 parity, Trainer, CLI."""

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import DatasetDict

from hf_trak import AutoModelOutput, TRAKArguments, TRAKer, TRAKHFTrainer
from hf_trak.method.factored import FactoredGradientProjector
from hf_trak.testing.datasets import clip_pairs, digits, lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_clip, tiny_gpt2, tiny_vit
from hf_trak.testing.reference import reference_scores

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

LORA = {
    "bert": (tiny_bert, dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "gpt2": (tiny_gpt2, dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "vit": (tiny_vit, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "clip": (tiny_clip, dict(target_modules=["q_proj", "v_proj"])),
}
DATA = {
    "bert": (lambda: token_sequences(20), lambda: token_sequences(5, seed=1)),
    "gpt2": (lambda: lm_sequences(20), lambda: lm_sequences(5, seed=1)),
    "vit": (lambda: digits(20), lambda: digits(5, offset=100)),
    "clip": (lambda: clip_pairs(20), lambda: clip_pairs(5, seed=1)),
}


def lora_model(case, r=2, seed=0, base_seed=0):
    """A LoRA model with random (not zero) B, so that every adapter parameter has a gradient."""
    make_base, options = LORA[case]
    base = make_base(seed=base_seed)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=r, init_lora_weights=False, **options)).eval()


def second_adapter(model, seed=1, scale=0.05):
    """The same PEFT model with its adapter tensors (only) moved: a later adapter checkpoint."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return other


def trainable(model):
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_weights(model):
    """What hf_trak's default differentiates: the trainable parameters without the biases."""
    return [name for name in trainable(model) if not name.endswith(".bias")]


@pytest.mark.parametrize("case", list(LORA))
def test_heads_are_detected_through_the_peft_wrapper_and_adapters_are_differentiated(case):
    model = lora_model(case)
    base_task = AutoModelOutput.from_model(LORA[case][0]())
    assert type(AutoModelOutput.from_model(model)) is type(base_task)
    traker = TRAKer(model, proj_dim=16, save_dir=None)
    assert traker.param_names == trainable_weights(model)
    assert all("lora_" in name or "modules_to_save" in name for name in traker.param_names)
    assert traker.config.adapter_config["r"] == 2 and traker.config.adapter_config["peft_type"] == "LORA"
    scores = traker.featurize(DATA[case][0](), [model.state_dict()], batch_size=8).score(DATA[case][1]())
    assert scores.shape == (20, 5) and np.isfinite(scores).all() and np.abs(scores).max() > 0


@pytest.mark.parametrize("projector", ["dense", "factored"])
@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_lora_scores_match_float64_reference_on_adapter_parameters(tmp_path, case, projector):
    """hf_trak on two adapter checkpoint folders against float64 TRAK by the formula on the adapter
    parameters of the full models. Dense: the identity projector. Factored: the factored code path
    (hooks on lora_A/lora_B, modules_to_save through the dense fallback) with identity factors,
    which gives the exact gradients in another order; TRAK scores do not depend on that order.
    The tolerance is that of the all-parameter parity test (tests/test_scores.py)."""
    first = lora_model(case)
    second = second_adapter(first)
    first.save_pretrained(tmp_path / "checkpoint-1")
    second.save_pretrained(tmp_path / "checkpoint-2")
    train, targets = DATA[case][0](), DATA[case][1]()
    traker = TRAKer(first, projector="identity", proj_dim=None, dtype=torch.float32, save_dir=None, estimator="trak")
    if projector == "factored":
        traker.feature_map.projector = FactoredGradientProjector(
            first, traker.param_names, proj_dim=1, seed=0, device="cpu", kind="identity"
        )
        assert traker.feature_map.projector.proj_dim == traker.num_params
        assert any("lora_A" in target.name for target in traker.feature_map.projector.targets)
    folders = [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    scores = traker.featurize(train, folders, batch_size=6).score(targets, batch_size=4)
    expected = reference_scores(
        first, train, targets, [first.state_dict(), second.state_dict()], param_names=trainable(first)
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_adapter_checkpoints_in_every_form_give_the_same_features(tmp_path):
    model = lora_model("bert")
    later = second_adapter(model)
    later.save_pretrained(tmp_path / "adapter")
    adapter_only = get_peft_model_state_dict(later)
    assert all(".default." not in name for name in adapter_only)  # peft's saved names, not the model's
    forms = {
        "folder": tmp_path / "adapter",
        "file": str(tmp_path / "adapter" / "adapter_model.safetensors"),
        "adapter state dict": adapter_only,
        "full state dict": later.state_dict(),
        "model": later,
    }
    data = token_sequences(9)
    features = {
        form: TRAKer(model, proj_dim=32, dtype=torch.float32, save_dir=None)
        .featurize(data, [checkpoint])
        .store.features(0)
        for form, checkpoint in forms.items()
    }
    for form, value in features.items():
        np.testing.assert_array_equal(value, features["full state dict"], err_msg=form)
    first = TRAKer(model, proj_dim=32, dtype=torch.float32, save_dir=None).featurize(data, [model])
    assert not np.array_equal(first.store.features(0), features["folder"])  # the adapter was really read


def test_an_inference_mode_peft_model_attributes_its_adapter(tmp_path):
    trained = lora_model("bert")
    trained.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")  # is_trainable=False: all frozen
    assert not trainable(loaded)
    traker = TRAKer(loaded, proj_dim=16, save_dir=None)
    assert traker.param_names == trainable_weights(trained)


def test_the_store_records_the_adapter_and_refuses_another_layout_or_base(tmp_path):
    model = lora_model("bert")
    model.save_pretrained(tmp_path / "adapter")
    train = token_sequences(12)
    TRAKer(model, proj_dim=16, save_dir=str(tmp_path / "trak")).featurize(train, [tmp_path / "adapter"])
    stored = TRAKer.from_pretrained(str(tmp_path / "trak"), model).config
    assert stored.adapter_config["r"] == 2 and stored.adapter_config["target_modules"] == ["query", "value"]
    assert stored.base_fingerprint and stored.base_model == model.get_base_model().config._name_or_path

    with pytest.raises(ValueError, match=r"adapter_config\.r: stored 2, given 4"):
        TRAKer.from_pretrained(str(tmp_path / "trak"), lora_model("bert", r=4), [tmp_path / "adapter"])
    other_base = PeftModel.from_pretrained(tiny_bert(seed=7), tmp_path / "adapter", is_trainable=True)
    with pytest.raises(ValueError, match="another base model"):
        TRAKer.from_pretrained(str(tmp_path / "trak"), other_base, [tmp_path / "adapter"])
    with pytest.raises(ValueError, match="does not fit .* adapter layout"):
        TRAKer(lora_model("bert", r=4), proj_dim=16, save_dir=None).featurize(train, [tmp_path / "adapter"])
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        TRAKer(tiny_bert(), proj_dim=16, save_dir=None).featurize(train, [tmp_path / "adapter"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trak_trainer_with_a_lora_model(tmp_path, checkpointing):
    """With gradient checkpointing too, whose hook on the input embeddings stays on the model (and on the copies
    the check retrains) and must not reach hf_trak's ``vmap``."""
    from transformers import TrainingArguments

    train, test = token_sequences(24, min_len=6, max_len=6), token_sequences(5, seed=2, min_len=6, max_len=6)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, save_strategy="epoch", per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    model = lora_model("bert")
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = TRAKHFTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=test,
        trak_args=TRAKArguments(proj_dim=32, dtype="float32"),
    )  # fmt: skip
    trainer.train()
    folders = sorted((p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")), key=lambda p: int(p[11:]))
    assert len(folders) == 2
    for folder in folders:  # Trainer checkpoints of a PEFT model hold the adapter alone
        assert os.path.exists(tmp_path / folder / "adapter_model.safetensors")
        assert not os.path.exists(tmp_path / folder / "model.safetensors")
    scores = trainer.attribute()

    # Second path: TRAKer on a fresh PEFT model with the starting weights and the Trainer's adapter folders.
    fresh = lora_model("bert")
    fresh.load_state_dict(start)
    reference = TRAKer(fresh, proj_dim=32, dtype=torch.float32, save_dir=None).featurize(
        train, [tmp_path / folder for folder in folders]
    )
    np.testing.assert_allclose(scores, reference.score(test), rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    check = trainer.check_attribution(num_subsets=2, max_steps=1)
    assert check.num_subsets == 2 and np.isfinite(check.per_target).all()


@pytest.mark.slow
def test_cli_featurizes_and_scores_an_adapter_folder(tmp_path):
    from tests.test_cli import hf_trak_cli

    tiny_bert().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=2, init_lora_weights=False, **LORA["bert"][1]))
    model.save_pretrained(tmp_path / "adapter")
    data = token_sequences(16).remove_columns("text")
    DatasetDict(train=data, test=token_sequences(4, seed=1).remove_columns("text")).save_to_disk(tmp_path / "data")
    common = ["--dataset", "data", "--no-processor"]
    done = hf_trak_cli("featurize", "--model", "adapter", *common, "--save-dir", "feats", "--proj-dim", "16",
                       "--dtype", "float32", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = hf_trak_cli("score", "--save-dir", "feats", "--model", "adapter", "--base-model", "base", *common,
                       "--output", "scores.npy", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = TRAKer(model, proj_dim=16, dtype=torch.float32, save_dir=None).featurize(data, [model])
    np.testing.assert_allclose(
        np.load(tmp_path / "scores.npy"), expected.score(token_sequences(4, seed=1).remove_columns("text")),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


@pytest.mark.slow
def test_without_peft_hf_trak_works_and_an_adapter_names_the_extra(tmp_path):
    """peft is optional: with it absent (``sys.modules["peft"] = None`` makes ``find_spec`` and
    ``import`` fail as for a missing package, transformers' availability check included),
    hf_trak and its CLI import and run, and an adapter folder gets an error naming the extra."""
    lora_model("bert").save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["peft"] = None
        import hf_trak, hf_trak.cli
        from hf_trak.hf.loading import resolve_model
        from hf_trak.testing.datasets import token_sequences
        from hf_trak.testing.models import tiny_bert
        model = tiny_bert()
        hf_trak.TRAKer(model, proj_dim=8, save_dir=None).featurize(token_sequences(4), [model])
        try:
            resolve_model({str(tmp_path / "adapter")!r})
        except ImportError as error:
            print("ImportError:", error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ImportError: This is a PEFT adapter model or folder" in done.stdout
    assert "pip install 'hf_trak[peft]'" in done.stdout


def test_the_peft_guide_attributes_the_adapter_and_the_head_copy():
    """The PEFT guide's snippet (``docs/guides/peft.md``) differentiates the LoRA matrices and the head copy only."""
    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "guides", "peft.md"), encoding="utf-8").read()
    code = guide.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "docs/guides/peft.md", "exec"), namespace)
    result = namespace["result"]
    assert result.scores.shape == (4, 1) and np.isfinite(result.scores).all()
    names = result.traker.param_names
    assert any("lora_B" in name for name in names) and names[-1].endswith("modules_to_save.default.weight")
    assert all("lora_" in name or "modules_to_save" in name for name in names)


def test_the_hooks_that_make_input_embeddings_require_grad_are_off_under_vmap_and_back_after():
    """Gradient checkpointing on a PEFT model hooks the input embeddings with ``requires_grad_`` (transformers'
    ``enable_input_require_grads``; peft's own hook where a model lacks it), which ``vmap`` refuses. f
    (``model_outputs``) and per-example gradients by ``vmap(grad)`` (``estimator="trak"``) are those of the model
    without the hooks, and each hook is back on its module after, once."""
    from hf_trak.evaluate import model_outputs

    model, (train, test) = lora_model("gpt2"), (data() for data in DATA["gpt2"])
    trak = dict(proj_dim=16, dtype=torch.float32, estimator="trak", save_dir=None)
    expected = model_outputs(model, test), TRAKer(model, **trak).featurize(train, [model.state_dict()]).score(test)
    model.enable_input_require_grads()

    def make_inputs_require_grad(module, inputs, output):  # peft's hook, by its name
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    hooks = list(model.get_input_embeddings()._forward_hooks.values())
    assert len(hooks) == 2
    np.testing.assert_allclose(model_outputs(model, test), expected[0], rtol=1e-6)
    scores = TRAKer(model, **trak).featurize(train, [model.state_dict()]).score(test)
    np.testing.assert_array_equal(scores, expected[1])
    assert list(model.get_input_embeddings()._forward_hooks.values()) == hooks
