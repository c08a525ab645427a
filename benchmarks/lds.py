"""The LDS suite: hf_trak's estimators against kronfluence's EK-FAC and K-FAC and a cosine baseline.

    python benchmarks/lds.py [--tasks image text lm] [--models 5] [--proj-dim auto] [--seeds 1] [--threads 2]
                             [--model-draw 0]

For each task of ``benchmarks/lds_suite.py`` (ground truth from ``lds_ground_truth.py``, shipped in
``benchmarks/lds_data``): K models trained on the whole train split (seeds 0..K-1; with ``--model-draw D``,
100·D + 0..K-1: another draw of the models), then each method's scores with the first model (K=1) and with all K
(scores averaged over models for the peers, TRAK's ensemble for hf_trak), their LDS against the retrained models
(f averaged over the two seeds of each half), and their time. With ``--seeds S`` each randomized method runs S
times (hf_trak's projector_seed, kronfluence's sampled labels for the true Fisher: seeds 0..S-1) and the table
gives the mean and standard deviation. Methods:

* ``hf_trak (default)``: hf_trak's default, ``estimator="hf_trak"`` (``hf_trak.method.estimator``: on these
  models no Q, the weights and not the biases, without the attention's query/key/value
  projections, factored projection (k = 4096, divided among the matrices by their gradients' spectra, with
  equal sides and principal factors from 10% of the train rows) with a kernel per projected matrix,
  λ_b = 0.01·tr_b/k_b, from per-token gradients: for the causal LMs each block's per-token Gram matrix shrunk
  30% toward K-FAC, for the classifiers the mean of the examples' Gram matrix and K-FAC's, and each
  checkpoint's scores of a target normalized before the mean over checkpoints);
  ``hf_trak, bf16 models`` is the default on the same models cast to bfloat16 (features and kernels are still
  accumulated in float32 and float64); each of ``hf_trak, random factors`` (``principal_share=0``),
  ``hf_trak, no shrinkage`` (``kernel_shrinkage=0``: for the classifiers, the per-token Gram matrix in place of
  K-FAC's),
  ``hf_trak, with attention q/k/v``, ``hf_trak, mean ensemble``, ``hf_trak, with biases``,
  ``hf_trak, λ_b×10``, ``hf_trak, r:c sides`` (a version-3 store: k_r:k_c ≈ r:c for the
  per-token kernels too; for the classifiers also kernels from the examples and random factors, which that
  format's defaults are) and ``hf_trak, blocks by size`` (``block_sizes="by_size"``: each matrix a share of k
  proportional to its size, not by its gradients' spectrum) undoes one of its settings, ``hf_trak, factors
  from all rows`` takes ``principal_fraction=1``; ``hf_trak, kernels from the examples``
  (``kernel_from="examples"``: each block's XᵀX_bb, with k = 2048 and random factors), ``hf_trak, per-token
  kernels`` (``kernel_from="tokens"``, the causal LMs' default), ``hf_trak, mixed kernels``
  (``kernel_from="mixed"``, the classifiers' default) and ``hf_trak, mixed kernels, per-token Gram`` (the
  per-token part the per-token Gram matrix shrunk 30% toward K-FAC) take one kernel on every task;
  ``hf_trak, random factors, no shrinkage`` undoes the first two,
  ``..., mean, q/k/v`` the first four and ``..., biases, λ_b×10, r:c`` the first seven;
* ``trak``: ``estimator="trak"``, TRAK as the seeds define it (Q, one global kernel, λ = 0.1·tr/k),
  the base of the settings below;
* ``trak, no Q``: the same features with ``train_weight="none"``; ``no Q, λ×10``: also
  ``lambda_scale=1``; ``no Q, per-module``: factored projection and ``kernel="per_module"``
  (a kernel per projected matrix, each with λ_b = 0.1·tr_b/k_b), and with ``λ×10``, and
  with ``kernel_from="tokens"`` (each block's Gram matrix sums per-token gradients) or
  ``"ekfac"`` (EK-FAC in projected space: eigenbases of the per-token Kronecker factors,
  eigenvalues fitted to the examples), with and without Q;
* ``ekfac``, ``kfac``: kronfluence 1.0 (``pip install hf_trak[bench]``), damping and modules
  at its defaults (nn.Linear and nn.Conv2d; GPT-2's Conv1D layers are converted to
  nn.Linear for it; factors of the true Fisher), f as the measurement and the training
  loss as the loss (CLIP: each pair's cross-entropy against f's contrast set, both ways: ``clip_task``);
  ``ekfac, empirical Fisher``: its factors from the training labels;
* ``cosine``: cosine of the last hidden state (CLS token; GPT-2: mean over tokens; CLIP: the pair's image and text
  embeddings, concatenated), same label only for classifiers;
* ``hf_trak + cosine ×w``: the default's scores and cosine's, each divided by its standard deviation over the
  train rows for each target, summed with cosine's weighted by w (``with_cosine``).

Noise: r is the agreement (Spearman, mean over targets) of two retrainings on the same 32
halves. The LDS is measured against their mean, whose reliability is 2r/(1 + r)
(Spearman-Brown), so no attribution can exceed a correlation of √(2r/(1 + r)) with it: the
task's noise ceiling.
"""

import argparse
import copy
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from lds_ground_truth import DATA
from lds_suite import TASKS
from scipy.stats import rankdata
from torch import nn

from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.evaluate import lds
from hf_trak.method.estimator import KERNEL_SHRINKAGE, PRINCIPAL_SHARE, attention_input_parameters
from hf_trak.method.factored import factorable_parameter_names
from hf_trak.method.model_outputs import AutoModelOutput, CausalLMModelOutput, CLIPModelOutput
from hf_trak.store.versions import STORE_VERSION


def ground_truth(name: str, folder: str = DATA):
    data = np.load(os.path.join(folder, f"{name}.npz"))
    masks = np.unpackbits(data["masks"], axis=1)[:, : int(data["num_train"])].astype(bool)
    return masks, data["outputs"]


def seed_agreement(outputs: np.ndarray) -> float:
    """r: mean over targets of the Spearman correlation, across subsets, of the two seeds' outputs."""
    a, b = (rankdata(outputs[i], axis=0) for i in (0, 1))
    a, b = a - a.mean(0), b - b.mean(0)
    return float(((a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))).mean())


# ---------------------------------------------------------------------------------------------- hf_trak
def noise_ceiling(outputs: np.ndarray) -> float:
    """√(2r/(1+r)): the highest correlation any attribution can have with the two seeds' mean."""
    r = seed_agreement(outputs)
    return float(np.sqrt(max(0.0, 2 * r / (1 + r))))


def trak_scores(
    task, models, proj_dim, estimator: str = "trak", store_version=STORE_VERSION, seed: int = 0,
    model_dtype=None, **settings,
):  # fmt: skip
    """Scores of hf_trak with ``settings`` over ``estimator``'s (the seeds' TRAK unless named), in a store of
    ``store_version``'s format, with projector seed ``seed``; ``model_dtype``: the models cast to it (bf16)."""
    if model_dtype is not None:
        models = [copy.deepcopy(model).to(model_dtype) for model in models]
    traker = TRAKer(
        task.make_model(0).to(model_dtype or torch.float32),
        proj_dim=proj_dim,
        estimator=estimator,
        store_version=store_version,
        projector_seed=seed,
        **settings,
    )
    traker.featurize(task.train, [model.state_dict() for model in models], batch_size=50)
    return traker.score(task.targets, batch_size=50)


# ------------------------------------------------------------------------------------------- kronfluence
def margin_task(is_lm: bool):
    """A kronfluence ``Task``: the head's loss to train (sampled labels for the true Fisher), hf_trak's f
    (the margin) as the measurement."""
    from kronfluence.task import Task

    def logits_of(batch, model):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = logits_of(batch, model)
            labels = batch["labels"]
            if is_lm:
                logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach().float(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = logits_of(batch, model).float()
            if is_lm:
                token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
                log_p = (-token_loss.sum(1)).clamp(max=-1e-6)
                return (log_p - torch.log(-torch.expm1(log_p))).sum()
            is_label = torch.arange(logits.shape[-1]) == batch["labels"][:, None]
            others = logits.masked_fill(is_label, -torch.inf).logsumexp(-1)
            return (logits[is_label] - others).sum()

        def get_attention_mask(self, batch):
            return batch.get("attention_mask")

    return MarginTask()


def clip_task(contrast_images, contrast_texts):
    """A kronfluence ``Task`` for CLIP: each pair's loss against the contrast set C (embeddings of the train rows
    hf_trak's f contrasts with, constants), image to texts and text to images at the model's temperature (sampled
    matches for the true Fisher), and hf_trak's CLIP f as the measurement."""
    from kronfluence.task import Task

    def similarities(batch, model):
        output = model(**batch)
        image, text = output.image_embeds, output.text_embeds
        s_ii = (image * text).sum(-1, keepdim=True)
        return s_ii, image @ contrast_texts.T, text @ contrast_images.T, model.logit_scale.exp()

    class ContrastTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            s_ii, image_vs_texts, text_vs_images, temperature = similarities(batch, model)
            loss = 0
            for others in (image_vs_texts, text_vs_images):
                logits = torch.cat([s_ii, others], dim=-1) * temperature
                labels = torch.zeros(len(logits), dtype=torch.long)
                if sample:
                    with torch.no_grad():
                        labels = torch.multinomial(F.softmax(logits.detach().float(), -1), 1).squeeze(-1)
                loss = loss + F.cross_entropy(logits, labels, reduction="sum")
            return loss

        def compute_measurement(self, batch, model):
            s_ii, image_vs_texts, text_vs_images, _ = similarities(batch, model)
            return (-torch.logsumexp(image_vs_texts - s_ii, -1) - torch.logsumexp(text_vs_images - s_ii, -1)).sum()

        def get_attention_mask(self, batch):
            return batch.get("attention_mask")

    return ContrastTask()


def contrast_embeddings(task, model):
    """The image and text embeddings of the contrast set hf_trak's CLIP f draws from the train split
    (``CLIPModelOutput.at_checkpoint``)."""
    output_function = AutoModelOutput.resolve(model)
    sampler = ExampleSource.for_model(task.train, model, output_function).sample
    bound = output_function.at_checkpoint(model, dict(model.named_parameters()), dict(model.named_buffers()), sampler)
    return bound.contrast_image_embeds, bound.contrast_text_embeds


def as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose transformers ``Conv1D`` layers (GPT-2) are ``nn.Linear``, which kronfluence tracks."""
    import copy

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data.copy_(child.weight.data.T)
                linear.bias.data.copy_(child.bias.data)
                setattr(parent, name, linear)
    return model


def kronfluence_scores(task, models, strategy: str, empirical_fisher: bool = False, seed: int = 0) -> np.ndarray:
    """Mean over models of kronfluence's pairwise scores (K-FAC or EK-FAC factors of the true Fisher, labels
    sampled with ``seed``, as kronfluence defaults; ``empirical_fisher``: of the training labels' gradients)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    is_lm = isinstance(AutoModelOutput.resolve(models[0]), CausalLMModelOutput)
    is_clip = isinstance(AutoModelOutput.resolve(models[0]), CLIPModelOutput)
    total = 0
    for number, trained in enumerate(models):
        torch.manual_seed(1000 * seed + number)  # the sampled labels of kronfluence's true Fisher
        model = as_linear(trained).eval()
        influence_task = clip_task(*contrast_embeddings(task, trained)) if is_clip else margin_task(is_lm)
        model = prepare_model(model, influence_task)
        train = ExampleSource.for_model(task.train, trained, AutoModelOutput.resolve(trained))
        targets = ExampleSource.for_model(task.targets, trained, AutoModelOutput.resolve(trained))
        with tempfile.TemporaryDirectory() as folder:
            analyzer = Analyzer(f"{task.name}-{number}", model, influence_task, cpu=True, disable_tqdm=True,
                                output_dir=folder)  # fmt: skip
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lambda rows: _either(rows, train, targets)))
            factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher)
            analyzer.fit_all_factors(strategy, _Tagged(len(train), "train"), per_device_batch_size=50,
                                     factor_args=factor_args)  # fmt: skip
            analyzer.compute_pairwise_scores(
                "scores", strategy, query_dataset=_Tagged(len(targets), "target"),
                train_dataset=_Tagged(len(train), "train"), per_device_query_batch_size=50,
                per_device_train_batch_size=50,
            )  # fmt: skip
            scores = analyzer.load_pairwise_scores("scores")["all_modules"].numpy().T  # (n × T)
        total = total + scores
    # kronfluence scores ∇f·H⁻¹∇ℓ_i; upweighting example i moves f by −that, TRAK's sign is +.
    return -total / len(models)


class _Tagged(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.tag, index


def _either(rows, train, targets):
    source = train if rows[0][0] == "train" else targets
    return source.batch([index for _, index in rows])


# ------------------------------------------------------------------------------------------------ cosine
@torch.no_grad()
def cosine_scores(task, models) -> np.ndarray:
    total = 0
    for model in models:
        embeddings, output_function = [], AutoModelOutput.resolve(model)
        for split in (task.train, task.targets):
            source = ExampleSource.for_model(split, model, output_function)
            batch = source.batch(list(range(len(split))))
            if isinstance(output_function, CLIPModelOutput):  # the pair's two embeddings
                output = model(**batch)
                embeddings.append(F.normalize(torch.cat([output.image_embeds, output.text_embeds], -1), dim=-1))
                continue
            hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
            last = hidden.hidden_states[-1]
            if isinstance(output_function, CausalLMModelOutput):
                mask = batch["attention_mask"][..., None].float()
                last = (last * mask).sum(1) / mask.sum(1)
            else:
                last = last[:, 0]
            embeddings.append(F.normalize(last.float(), dim=-1))
        total = total + (embeddings[0] @ embeddings[1].T).numpy()
    scores = total / len(models)
    if "labels" in task.train.column_names and not isinstance(AutoModelOutput.resolve(models[0]), CausalLMModelOutput):
        same = np.asarray(task.train["labels"])[:, None] == np.asarray(task.targets["labels"])[None]
        scores = np.where(same, scores, 0.0)
    return scores


def per_target_unit(scores: np.ndarray) -> np.ndarray:
    """Scores (n × m) divided by their standard deviation over the train rows, target by target (0 stays 0)."""
    spread = scores.std(0, keepdims=True)
    return scores / np.where(spread > 0, spread, 1.0)


def with_cosine(weight: float):
    """A method: τ/sd(τ) + w · c/sd(c) for the default's scores τ and cosine's c (sd over the train rows, per
    target)."""

    def method(task, models, k, seed):
        default = hf_trak()(task, models, k, seed)
        return per_target_unit(default) + weight * per_target_unit(cosine_scores(task, models))

    return method


def parameters(models, biases: bool = False, attention: bool = False) -> dict:
    """``grad_wrt``: the factored projector's layers, without the biases and the attention's query/key/value
    projections (hf_trak's default) unless asked for."""
    left_out = set() if attention else attention_input_parameters(models[0])
    names = [n for n in factorable_parameter_names(models[0]) if n not in left_out]
    return dict(grad_wrt=[n for n in names if biases or not n.endswith(".bias")])


def hf_trak(**settings):
    """A method: hf_trak's default estimator with ``settings`` (``grad_wrt`` from ``parameters(models, ...)``
    for ``parameters={...}``)."""

    def method(task, models, k, seed):
        chosen = dict(settings)
        if "parameters" in chosen:
            chosen.update(parameters(models, **chosen.pop("parameters")))
        return trak_scores(task, models, k, estimator="hf_trak", seed=seed, **chosen)

    return method


def rc_sides(task, models, k, seed):
    """The default with a version-3 store's r:c sides; for per-token kernels, its principal factors and shrinkage
    given explicitly (the estimator gives a version-3 store neither)."""
    per_token = isinstance(AutoModelOutput.resolve(models[0]), CausalLMModelOutput)
    extra = dict(principal_share=PRINCIPAL_SHARE, kernel_shrinkage=KERNEL_SHRINKAGE) if per_token else {}
    return trak_scores(task, models, k, estimator="hf_trak", store_version=3, seed=seed, **extra)


def trak(**settings):
    return lambda task, models, k, seed: trak_scores(task, models, k, seed=seed, **settings)


PER_MODULE = dict(projector="factored", kernel="per_module")
RANDOM_FACTORS = dict(principal_share=0.0, kernel_shrinkage=0.0)
METHODS = {
    "hf_trak (default)": hf_trak(),
    "hf_trak, bf16 models": hf_trak(model_dtype=torch.bfloat16),
    "hf_trak, random factors": hf_trak(principal_share=0.0),
    "hf_trak, no shrinkage": hf_trak(kernel_shrinkage=0.0),
    "hf_trak, factors from all rows": hf_trak(principal_fraction=1.0),
    "hf_trak, with attention q/k/v": hf_trak(parameters=dict(attention=True)),
    "hf_trak, mean ensemble": hf_trak(ensemble="mean"),
    "hf_trak, with biases": hf_trak(parameters=dict(biases=True)),
    "hf_trak, λ_b×10": hf_trak(lambda_scale=0.1),
    "hf_trak, r:c sides": lambda task, models, k, seed: rc_sides(task, models, k, seed),
    "hf_trak, blocks by size": hf_trak(block_sizes="by_size"),
    "hf_trak, mixed kernels": hf_trak(kernel_from="mixed"),
    "hf_trak, mixed kernels, per-token Gram": hf_trak(kernel_from="mixed", kernel_shrinkage=KERNEL_SHRINKAGE),
    "hf_trak, kernels from the examples": hf_trak(kernel_from="examples"),
    "hf_trak, per-token kernels": hf_trak(kernel_from="tokens"),
    "hf_trak, random factors, no shrinkage": hf_trak(**RANDOM_FACTORS),
    "hf_trak, random factors, no shrinkage, mean, q/k/v": hf_trak(
        ensemble="mean", parameters=dict(attention=True), **RANDOM_FACTORS
    ),
    "hf_trak, random factors, no shrinkage, mean, q/k/v, biases, λ_b×10, r:c": hf_trak(
        ensemble="mean",
        lambda_scale=0.1,
        store_version=3,
        parameters=dict(attention=True, biases=True),
        **RANDOM_FACTORS,
    ),
    "trak": trak(),
    "trak, no Q": trak(train_weight="none"),
    "no Q, λ×10": trak(train_weight="none", lambda_scale=1.0),
    "no Q, per-module": trak(train_weight="none", **PER_MODULE),
    "no Q, per-module, λ×10": trak(train_weight="none", lambda_scale=1.0, **PER_MODULE),
    "no Q, per-module, tokens": trak(train_weight="none", kernel_from="tokens", **PER_MODULE),
    "no Q, per-module, ekfac": trak(train_weight="none", kernel_from="ekfac", **PER_MODULE),
    "per-module, ekfac": trak(kernel_from="ekfac", **PER_MODULE),
    "ekfac": lambda task, models, k, seed: kronfluence_scores(task, models, "ekfac", seed=seed),
    "ekfac, empirical Fisher": lambda task, models, k, seed: kronfluence_scores(task, models, "ekfac", True),
    "kfac": lambda task, models, k, seed: kronfluence_scores(task, models, "kfac", seed=seed),
    "cosine": lambda task, models, k, seed: cosine_scores(task, models),
    "hf_trak + cosine ×0.1": with_cosine(0.1),
    "hf_trak + cosine ×0.3": with_cosine(0.3),
}
DETERMINISTIC = {"ekfac, empirical Fisher", "cosine"}  # no seed to vary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument(
        "--proj-dim",
        type=lambda text: text if text == "auto" else int(text),
        default="auto",
        help="k of hf_trak's methods (auto: hf_trak.method.estimator.auto_proj_dim; trak: 2048)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs of each randomized method (seeds 0..S-1)")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (another count trains the models to "
                        "other weights: the sums run in another order)")  # fmt: skip
    parser.add_argument("--model-draw", type=int, default=0, help="train the K models with seeds 100·D + 0..K-1 "
                        "(0: seeds 0..K-1): another draw of the models attributed")  # fmt: skip
    parser.add_argument("--data", default=DATA, help="folder of the ground truth (lds_ground_truth.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # vmap fallbacks, kronfluence's GradScaler
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = []
    for name in args.tasks:
        task = TASKS[name]()
        masks, outputs = ground_truth(name, args.data)
        truth = outputs.mean(0)
        started = time.perf_counter()
        models = [task.train_model(100 * args.model_draw + seed) for seed in range(args.models)]
        print(f"{name}: n={len(task.train)}, {len(task.targets)} targets, {masks.shape[0]} halves × "
              f"{outputs.shape[0]} seeds, seed agreement r={seed_agreement(outputs):.3f}, noise ceiling "
              f"{noise_ceiling(outputs):.3f}; "
              f"{args.models} models (draw {args.model_draw}) trained in {time.perf_counter() - started:.0f} s",
              flush=True)  # fmt: skip
        for method in args.methods:
            for count in sorted({1, args.models}):
                values, seconds = [], []
                for seed in range(1 if method in DETERMINISTIC else args.seeds):
                    started = time.perf_counter()
                    scores = METHODS[method](task, models[:count], args.proj_dim, seed)
                    seconds.append(time.perf_counter() - started)
                    values.append(lds(scores, masks, truth).mean)
                    print(f"  {method:<29} K={count} seed {seed}: LDS {values[-1]:.3f} ({seconds[-1]:.1f} s)",
                          flush=True)  # fmt: skip
                rows.append((name, method, count, np.mean(values), np.std(values), len(values), np.median(seconds)))
    print("\n| task | method | K | LDS | ± std (seeds) | seconds (median) |\n| --- | --- | --- | --- | --- | --- |")
    for name, method, count, value, spread, runs, seconds in rows:
        print(f"| {name} | {method} | {count} | {value:.3f} | {spread:.3f} ({runs}) | {seconds:.1f} |")


if __name__ == "__main__":
    main()
