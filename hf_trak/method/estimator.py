"""What the settings left at ``"auto"`` become: the estimator presets.

``TRAKArguments.estimator`` names a preset for the fields a user did not set; explicit
values always win, and the store records the values used (``TRAKConfig``), so a store
scores the same whatever the defaults become later.

* ``"trak"``: TRAK as the seeds define it: τ = mean_m(X_m K_m T_mᵀ) ⊙ Q̄ with Q_i = ∂ℓ/∂f
  (``train_weight="out_to_loss"``, ``ensemble="mean"``), one global kernel K_m = (XᵀX + λI)⁻¹ with
  λ = 0.1·tr(XᵀX)/k, and the dense projector unless p·k is too large for it.
* ``"hf_trak"`` (the default), chosen by the LDS suite (``benchmarks/lds.py``, the README's
  table): no Q (``"none"``); the weights only, not the biases, where ``grad_wrt`` is not
  given (``default_parameters``); the factored projector when Linear/Conv1D/Embedding
  layers hold at least 0.9 of p, without the attention's input projections (query, key,
  value), with a kernel per projected matrix (``"per_module"``,
  λ_b = 0.01·tr_b/k_b), built from per-token gradients for a causal LM
  (``kernel_from="tokens"``: every token is a term of its loss; the projector then gives each
  matrix equal sides, 60% of each side's dimensions on the leading eigenvectors of its per-token second
  moment, ``principal_share``, ``hf_trak.method.factored``, and each block's Gram matrix is shrunk 30% toward its
  K-FAC approximation, ``kernel_shrinkage``, ``hf_trak.method.kernel.shrunk_gram``) and from the examples
  otherwise; with another projector, one global kernel with λ = 1·tr(XᵀX)/k (the suite's best global
  λ); each checkpoint's scores of a target divided by their RMS over the train rows before the mean over checkpoints
  (``ensemble="normalized"``, ``hf_trak.method.kernel.target_rms``).
"""

import dataclasses
from typing import List, Set

from torch import nn

from hf_trak.arguments import TRAKArguments, check_kernel_source
from hf_trak.errors import InvalidArgumentError
from hf_trak.method.model_outputs import AbstractModelOutput, CausalLMModelOutput
from hf_trak.store.config import STORE_VERSION

LAMBDA_SCALE = 0.1  # λ = 0.1·tr/k: TRAK's kernel
PRINCIPAL_SHARE = 0.6  # hf_trak's per-token kernels: 60% of each side's dimensions on its leading eigenvectors
KERNEL_SHRINKAGE = 0.3  # hf_trak's per-token kernels: 30% of K-FAC's approximation in each block's Gram matrix
MODULE_LAMBDA_SCALE = 0.01  # hf_trak's per-module blocks: from 0.1 to 0.01, the suite's LDS rose on text and lm
GLOBAL_LAMBDA_SCALE = 1.0  # hf_trak with one global kernel (no Q): the suite's best λ for it


# Layers of an attention module (its class name contains "Attention") that map its input to queries, keys
# or values, by their names in transformers' models (GPT-2's c_attn holds all three).
ATTENTION_INPUTS = frozenset(
    ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "q_attn", "qkv", "qkv_proj",
     "query_key_value", "Wqkv", "q", "k", "v", "q_lin", "k_lin", "v_lin")
)  # fmt: skip


def attention_input_parameters(model: nn.Module) -> Set[str]:
    """Names of the parameters of the query, key and value projections of ``model``'s attention modules
    (``ATTENTION_INPUTS`` children of a module whose class name contains "Attention")."""
    names_by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    found = set()
    for module in model.modules():
        if "Attention" not in type(module).__name__:
            continue
        for child_name, child in module.named_children():
            if child_name in ATTENTION_INPUTS:
                found.update(names_by_id[id(p)] for p in child.parameters() if id(p) in names_by_id)
    return found


def default_parameters(args: TRAKArguments, model: nn.Module, names: List[str], whole_model: bool) -> List[str]:
    """Of the parameters differentiated by default, ``names``, those ``args.estimator`` keeps: all for trak;
    for hf_trak the weights, without the biases (parameters named ``*.bias``), and, where ``names`` are the
    factored projector's layers of the whole model (``whole_model``; not a PEFT adapter, whose layers the user
    chose), without the attention's query, key and value projections; each rule only if something is left.

    On the LDS suite (``benchmarks/lds.py``), at K=5: leaving biases out raised hf_trak's LDS on text (+0.019)
    and lm (+0.005) and left image within its projector-seed spread (−0.002): a bias's block is small, and its
    per-module kernel weighs it like a whole matrix. Leaving the query/key/value projections out, over
    projector seeds 0-3 (with the mean ensemble): text 0.278 → 0.305, lm 0.627 → 0.637 (K=1: 0.521 → 0.541),
    image 0.229 → 0.223. Their gradients pass through the softmax of the attention scores, where the model is
    least linear in its parameters, and alone they rank the training data worst of all matrices (lm: 0.29-0.34
    against the MLP's 0.54-0.57)."""
    if args.estimator == "trak":
        return names
    kept = [name for name in names if name.rsplit(".", 1)[-1] != "bias"] or names
    if whole_model:
        attention = attention_input_parameters(model)
        kept = [name for name in kept if name not in attention] or kept
    return kept


def resolve_estimator(
    args: TRAKArguments, projector: str, task: AbstractModelOutput, store_version: int = STORE_VERSION
) -> TRAKArguments:
    """``args`` with ``train_weight``, ``kernel``, ``kernel_from``, ``lambda_scale``, ``ensemble``,
    ``principal_share`` and ``kernel_shrinkage`` set: their explicit values, else ``args.estimator``'s for this
    ``projector`` (the one ``choose_projector`` chose) and model output; features for a store of a ``store_version``
    before 5 get neither principal factors nor shrinkage by default (that format had none).

    Principal factors and shrinkage, for per-token kernels (the LDS suite's causal LM, ``benchmarks/lds.py``,
    K=5): over projector seeds 0-4, 0.637 ± 0.004 with neither, 0.646 ± 0.004 with both (K=1: 0.544 → 0.565),
    against EK-FAC's 0.637 ± 0.001; with seed 0, neither 0.632, shrinkage alone 0.634, principal factors alone
    0.633, both 0.640. The classifiers' kernels, from the examples, keep random factors (not measured there)."""
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
    ensemble = args.ensemble
    if ensemble == "auto":
        ensemble = "mean" if classic else "normalized"
    per_token = kernel_from == "tokens" and not classic and store_version >= 5
    principal_share = args.principal_share
    if principal_share is None:
        principal_share = PRINCIPAL_SHARE if per_token and projector == "factored" else 0.0
    if principal_share and projector != "factored":
        raise InvalidArgumentError(
            f"principal_share={principal_share} sets the factored projector's factors; the {projector} projector "
            "has none: pass projector='factored' or principal_share=0."
        )
    kernel_shrinkage = args.kernel_shrinkage
    if kernel_shrinkage is None:
        kernel_shrinkage = KERNEL_SHRINKAGE if per_token else 0.0
    if kernel_shrinkage and kernel_from != "tokens":
        raise InvalidArgumentError(
            f"kernel_shrinkage={kernel_shrinkage} shrinks per-token Gram matrices, and kernel_from={kernel_from!r}: "
            "pass kernel_from='tokens' or kernel_shrinkage=0."
        )
    return dataclasses.replace(
        args,
        train_weight=train_weight,
        kernel=kernel,
        kernel_from=kernel_from,
        lambda_scale=lambda_scale,
        ensemble=ensemble,
        principal_share=float(principal_share),
        kernel_shrinkage=float(kernel_shrinkage),
    )
