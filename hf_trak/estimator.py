"""What the settings left at ``"auto"`` become: the estimator presets.

``TRAKArguments.estimator`` names a preset for the fields a user did not set; explicit
values always win, and the store records the values used (``TRAKConfig``), so a store
scores the same whatever the defaults become later.

* ``"trak"``: TRAK as the seeds define it: τ = mean_m(X_m K_m T_mᵀ) ⊙ Q̄ with Q_i = ∂ℓ/∂f
  (``train_weight="out_to_loss"``), one global kernel K_m = (XᵀX + λI)⁻¹ with
  λ = 0.1·tr(XᵀX)/k, and the dense projector unless p·k is too large for it.
* ``"hf_trak"`` (the default), chosen by the LDS suite (``benchmarks/lds.py``, the README's
  table): no Q (``"none"``); the weights only, not the biases, where ``grad_wrt`` is not
  given (``default_parameters``); the factored projector when Linear/Conv1D/Embedding
  layers hold at least 0.9 of p, with a kernel per projected matrix (``"per_module"``,
  λ_b = 0.01·tr_b/k_b), built from per-token gradients for a causal LM
  (``kernel_from="tokens"``: every token is a term of its loss; the projector then gives each
  matrix equal sides, ``hf_trak.factored``) and from the examples otherwise; with another
  projector, one global kernel with λ = 1·tr(XᵀX)/k (the suite's best global λ).
"""

import dataclasses
from typing import List

from .arguments import TRAKArguments, check_kernel_source
from .model_outputs import AbstractModelOutput, CausalLMModelOutput

LAMBDA_SCALE = 0.1  # λ = 0.1·tr/k: TRAK's kernel
MODULE_LAMBDA_SCALE = 0.01  # hf_trak's per-module blocks: from 0.1 to 0.01, the suite's LDS rose on text and lm
GLOBAL_LAMBDA_SCALE = 1.0  # hf_trak with one global kernel (no Q): the suite's best λ for it


def default_parameters(args: TRAKArguments, names: List[str]) -> List[str]:
    """Of the parameters differentiated by default, ``names``, those ``args.estimator`` keeps: all for trak;
    for hf_trak the weights, without the biases (parameters named ``*.bias``), unless nothing else is left.

    On the LDS suite (``benchmarks/lds.py``) leaving biases out raised hf_trak's LDS at K=5 on text (+0.019) and
    lm (+0.005), left image within its projector-seed spread (−0.002), and moved the dense global kernel's by at
    most 0.005: a bias's block is small, and its per-module kernel weighs it like a whole matrix."""
    if args.estimator == "trak":
        return names
    weights = [name for name in names if name.rsplit(".", 1)[-1] != "bias"]
    return weights or names


def resolve_estimator(args: TRAKArguments, projector: str, task: AbstractModelOutput) -> TRAKArguments:
    """``args`` with ``train_weight``, ``kernel``, ``kernel_from`` and ``lambda_scale`` set: their explicit values,
    else ``args.estimator``'s for this ``projector`` (the one ``choose_projector`` chose) and model output."""
    classic = args.estimator == "trak"
    train_weight = args.train_weight
    if train_weight == "auto":
        train_weight = "out_to_loss" if classic else "none"
    kernel = args.kernel
    if kernel == "auto":
        kernel = "per_module" if projector == "factored" and not classic else "global"
    kernel_from = args.kernel_from
    if kernel_from == "auto":
        per_token = kernel == "per_module" and isinstance(task, CausalLMModelOutput) and not classic
        kernel_from = "tokens" if per_token else "examples"
    check_kernel_source(kernel_from, kernel, projector)
    lambda_scale = args.lambda_scale
    if lambda_scale is None:
        lambda_scale = LAMBDA_SCALE if classic else GLOBAL_LAMBDA_SCALE if kernel == "global" else MODULE_LAMBDA_SCALE
    return dataclasses.replace(
        args, train_weight=train_weight, kernel=kernel, kernel_from=kernel_from, lambda_scale=lambda_scale
    )
