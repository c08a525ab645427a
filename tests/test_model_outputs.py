import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from hf_trak import (
    AutoModelOutput,
    CausalLMModelOutput,
    CLIPModelOutput,
    ImageClassificationModelOutput,
    SequenceClassificationModelOutput,
)
from hf_trak.data.source import ExampleSource
from hf_trak.method.feature_map import FeatureMap
from hf_trak.method.gradients import PerExampleGradients, select_parameters
from hf_trak.testing.datasets import clip_pairs, digits, lm_sequences, token_sequences
from hf_trak.testing.models import tiny_bert, tiny_clip, tiny_gpt2, tiny_vit

CASES = {
    "image_classification": (tiny_vit, lambda: digits(10)),
    "text_classification": (tiny_bert, lambda: token_sequences(10)),
    "causal_lm": (tiny_gpt2, lambda: lm_sequences(10)),
    "clip": (tiny_clip, lambda: clip_pairs(10)),
}


def _setup(task_name):
    """The model at its own weights through a checkpoint view: (model, view, source)."""
    make_model, make_data = CASES[task_name]
    model, data = make_model(), make_data()
    task = AutoModelOutput.from_model(model)
    source = ExampleSource.for_model(data, model, task)
    return model, FeatureMap(model, task, None, "cpu").at(model, 0, source.sample), source


def _vmap_grads(model, view, source, batch_size, chunk_numel=None):
    names = select_parameters(model)
    gradients = PerExampleGradients(model, names, chunk_numel)
    rows = []
    for batch in source.batches(batch_size):
        merged = {}
        for chunk in gradients(view.task, view.weights, view.buffers, view.prepare(batch)):
            merged.update(chunk)
        rows.append(torch.cat([merged[name] for name in names], dim=1))
    return torch.cat(rows)


def _loop_grads(model, task, source, weights, buffers):
    """Per-example autograd on unpadded one-example batches with their 2D masks."""
    names = select_parameters(model)
    rows = []
    for example in source.batches(1):
        params = {name: weights[name].clone().requires_grad_(True) for name in names}
        output = task.get_output(model, {**weights, **params}, buffers, example)
        grads = torch.autograd.grad(output, [params[name] for name in names], allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(params[n])).reshape(-1) for n, g in zip(names, grads)]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("task_name", list(CASES))
def test_vmap_gradients_equal_autograd_loop(task_name):
    model, view, source = _setup(task_name)
    expected = _loop_grads(model, view.task, source, view.weights, view.buffers)
    for batch_size, chunk_numel in [(4, None), (10, 200)]:
        got = _vmap_grads(model, view, source, batch_size, chunk_numel)
        assert got.shape == expected.shape
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("task_name", ["image_classification", "text_classification", "causal_lm"])
def test_q_equals_one_minus_sigmoid_of_output(task_name):
    """f = log(p/(1-p)) and Q = 1 - p imply Q = 1 - sigmoid(f), example by example."""
    model, view, source = _setup(task_name)
    batch = next(source.batches(10))
    q = view.task.get_out_to_loss_grad(model, view.weights, view.buffers, batch)  # with the 2D mask
    assert q.shape == (10,)
    torch.testing.assert_close(q, 1 - torch.sigmoid(view.outputs(batch)), rtol=1e-4, atol=1e-6)


def test_classification_margin_matches_closed_form():
    model, view, source = _setup("text_classification")
    task, weights, buffers = view.task, view.weights, view.buffers
    batch = next(source.batches(10))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    for i, label in enumerate(batch["labels"].tolist()):
        others = torch.cat([logits[i, :label], logits[i, label + 1 :]])
        expected = logits[i, label] - torch.logsumexp(others, 0)
        output = task.get_output(model, weights, buffers, {k: v[i : i + 1] for k, v in batch.items()})
        assert output.item() == pytest.approx(expected.item(), rel=1e-5)


def test_causal_lm_output_is_log_odds_of_label_tokens():
    model, view, source = _setup("causal_lm")
    task, weights, buffers = view.task, view.weights, view.buffers
    example = next(source.batches(1))
    logits = model(input_ids=example["input_ids"]).logits[0].double()
    labels = example["labels"][0]
    log_p = sum(torch.log_softmax(logits[t - 1], -1)[labels[t]] for t in range(1, len(labels)) if labels[t] != -100)
    expected = log_p - torch.log1p(-torch.exp(log_p))
    assert task.get_output(model, weights, buffers, example).item() == pytest.approx(expected.item(), rel=1e-4)


def test_clip_q_is_nonzero_and_independent_of_batch_size():
    model, view, source = _setup("clip")
    task, weights, buffers = view.task, view.weights, view.buffers
    batches = {
        size: torch.cat([task.get_out_to_loss_grad(model, weights, buffers, b) for b in source.batches(size)])
        for size in (1, 3, 10)
    }
    for size, q in batches.items():
        assert q.shape == (10,)
        assert (q > 0).all() and (q < 1).all()
        torch.testing.assert_close(q, batches[10], rtol=1e-5, atol=1e-6)
    # Closed form for example 0 against the contrast set.
    example = next(source.batches(1))
    out = model(**example)
    image, text = out.image_embeds[0].double(), out.text_embeds[0].double()
    tau = model.logit_scale.exp().double()
    s = image @ text
    image_row = torch.cat([s[None], task.contrast_text_embeds.double() @ image]) * tau
    text_row = torch.cat([s[None], task.contrast_image_embeds.double() @ text]) * tau
    expected = 1 - (torch.softmax(image_row, 0)[0] + torch.softmax(text_row, 0)[0]) / 2
    assert batches[1][0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_model_outputs_draw_clip_contrast_set_from_the_split_given():
    """``model_outputs(..., contrast=train)``: CLIP's f of each target against the train rows TRAK's f contrasts
    with (all 20 here, fewer than ``num_contrast``), in closed form; without it, against the targets themselves."""
    from hf_trak.evaluate import model_outputs

    model, train, targets = tiny_clip(), clip_pairs(20), clip_pairs(5, seed=1)
    got = model_outputs(model, targets, contrast=train)
    with torch.no_grad():
        sources = [ExampleSource.for_model(split, model, AutoModelOutput.resolve(model)) for split in (targets, train)]
        pair, contrast = [model(**source.batch(list(range(len(source))))) for source in sources]
    s_ii = (pair.image_embeds * pair.text_embeds).sum(-1, keepdim=True).double()
    expected = -torch.logsumexp(pair.image_embeds.double() @ contrast.text_embeds.double().T - s_ii, -1)
    expected -= torch.logsumexp(pair.text_embeds.double() @ contrast.image_embeds.double().T - s_ii, -1)
    assert got == pytest.approx(expected.numpy(), rel=1e-4)
    assert model_outputs(model, targets) != pytest.approx(got, rel=1e-2)  # the targets' own contrast set
    vit, images = tiny_vit(), digits(4)  # a task without a contrast set never reads ``contrast`` (rows unlabelled)
    assert model_outputs(vit, images, contrast=images.remove_columns("labels")) == pytest.approx(
        model_outputs(vit, images), rel=1e-6
    )


def test_auto_model_output_maps_every_supported_head():
    assert isinstance(AutoModelOutput.from_model(tiny_bert()), SequenceClassificationModelOutput)
    assert isinstance(AutoModelOutput.from_model(tiny_vit()), ImageClassificationModelOutput)
    assert isinstance(AutoModelOutput.from_model(tiny_gpt2()), CausalLMModelOutput)
    assert isinstance(AutoModelOutput.from_model(tiny_clip()), CLIPModelOutput)
    assert isinstance(AutoModelOutput.from_task("causal_lm"), CausalLMModelOutput)


def test_unsupported_head_and_task_are_refused_with_the_supported_list():
    model = BertForMaskedLM(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    with pytest.raises(ValueError, match="ForSequenceClassification.*CLIPModel"):
        AutoModelOutput.from_model(model)
    with pytest.raises(ValueError, match="Unknown task"):
        AutoModelOutput.from_task("segmentation")


@pytest.mark.parametrize("problem_type,num_labels", [("multi_label_classification", 3), ("regression", 1), (None, 1)])
def test_non_softmax_problem_types_are_refused(problem_type, num_labels):
    config = BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
        problem_type=problem_type,
    )
    model = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="subclass AbstractModelOutput"):
        AutoModelOutput.from_model(model).check_model(model)
