"""The float64 TRAK reference (per-example autograd gradients, direct inversion) and its parity cases."""

import copy

import numpy as np
import torch

from hf_trak.data.source import ExampleSource
from hf_trak.method.estimator import GLOBAL_LAMBDA_SCALE, LAMBDA_SCALE
from hf_trak.method.model_outputs import AutoModelOutput, ClassificationModelOutput, call_model, without_labels
from hf_trak.testing.datasets import clip_pairs, digits, lm_sequences, token_sequences
from hf_trak.testing.models import perturbed_state_dict, tiny_bert, tiny_clip, tiny_gpt2, tiny_vit
from hf_trak.traker import TRAKer


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
