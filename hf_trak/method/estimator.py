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
  value), k divided among its matrices by their gradients' spectra (``block_sizes="spectrum"``,
  ``hf_trak.method.block_sizes``), with a kernel per projected matrix (``"per_module"``,
  λ_b = 0.01·tr_b/k_b), built from per-token gradients: for a causal LM each block's per-token Gram matrix
  (``kernel_from="tokens"``: every token is a term of its loss), shrunk 30% toward its K-FAC approximation
  (``kernel_shrinkage``, ``hf_trak.method.kernel.shrunk_gram``); for other models the mean of the examples' Gram
  matrix and the K-FAC approximation (``kernel_from="mixed"``, ``default_kernel_source``); either way the
  projector gives each matrix equal sides, 60% of each side's dimensions on the leading eigenvectors of its
  per-token second moment (``principal_share``, ``hf_trak.method.factored``); with another projector, one global
  kernel with λ = 1·tr(XᵀX)/k (the suite's best global λ); each checkpoint's scores of a target divided by their
  RMS over the train rows before the mean over checkpoints (``ensemble="normalized"``,
  ``hf_trak.method.kernel.target_rms``).
"""

import dataclasses
import logging
from typing import List, Set, Tuple

from torch import nn

from hf_trak.arguments import TRAKArguments, check_kernel_source
from hf_trak.errors import InvalidArgumentError
from hf_trak.hf.adapters import adapter_parameter_names, is_peft_model
from hf_trak.method.factored import factorable_parameter_names
from hf_trak.method.gradients import select_parameters
from hf_trak.method.model_outputs import AbstractModelOutput, CausalLMModelOutput
from hf_trak.store.versions import STORE_VERSION, has_block_shapes, has_principal_factors, keeps_kernel_blocks

logger = logging.getLogger(__name__)

LAMBDA_SCALE = 0.1  # λ = 0.1·tr/k: TRAK's kernel
PRINCIPAL_SHARE = 0.6  # hf_trak's per-token kernels: 60% of each side's dimensions on its leading eigenvectors
KERNEL_SHRINKAGE = 0.3  # hf_trak's per-token kernels: 30% of K-FAC's approximation in each block's Gram matrix
MIXED_KERNEL_SHRINKAGE = 1.0  # hf_trak's mixed kernels: their per-token part K-FAC's approximation alone
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


# projector="auto": a dense projection matrix of p·k elements up to this size (1 GiB in float32, e.g. a
# 130k-parameter model at k = 2048) is affordable; beyond it, the factored projector is used when the
# Linear/Conv1D/Embedding layers hold at least AUTO_MIN_FACTORABLE_SHARE of the p selected elements.
# (benchmarks/factored.py: on a BERT-small-sized classifier dense costs 183× factored per example.)
DEFAULT_PROJ_DIM = 2048  # proj_dim="auto": k for kernels from the examples (TRAK's 2048)
TOKENS_PROJ_DIM = 4096  # proj_dim="auto": k for per-token kernels (see auto_proj_dim)
PER_TOKEN_SOURCES = ("tokens", "mixed")  # the kernels built from per-token Gram matrices
AUTO_DENSE_MAX_ELEMENTS = 2**28
AUTO_MIN_FACTORABLE_SHARE = 0.9
# estimator="hf_trak" takes the factored projector (for its per-module kernels) when k gives each factored
# matrix at least this many dimensions on average; below, a dense projection keeps the features meaningful.
AUTO_MIN_DIMS_PER_MATRIX = 4


def choose_projector(model: nn.Module, args: TRAKArguments) -> Tuple[str, str]:
    """``(projector, why)``: ``args.projector``, or for ``"auto"`` the factored projector when the
    Linear/Conv1D/Embedding layers hold at least ``AUTO_MIN_FACTORABLE_SHARE`` of the p selected elements
    and either ``args.estimator`` is ``"hf_trak"`` (its per-module kernels need it; with k at least
    ``AUTO_MIN_DIMS_PER_MATRIX`` per factored matrix) or p·k exceeds ``AUTO_DENSE_MAX_ELEMENTS``;
    rademacher otherwise."""
    if args.projector != "auto":
        return args.projector, f"projector={args.projector!r} was asked for"
    selected = differentiated_parameters(model, dataclasses.replace(args, projector="rademacher"))
    numels = {name: parameter.numel() for name, parameter in model.named_parameters()}
    p, k = sum(numels[name] for name in selected), DEFAULT_PROJ_DIM if args.proj_dim == "auto" else args.proj_dim
    size = f"p·k = {p:,}·{k:,} = {p * k:,}"
    factorable = set(factorable_parameter_names(model))
    share = sum(numels[name] for name in selected if name in factorable) / p
    layers = "Linear/Conv1D/Embedding layers hold"
    matrices = sum(1 for name in selected if name in factorable)
    if share >= AUTO_MIN_FACTORABLE_SHARE and args.estimator == "hf_trak" and k >= AUTO_MIN_DIMS_PER_MATRIX * matrices:
        return "factored", (
            f"estimator='hf_trak', {layers} {share:.1%} of p and k = {k:,} ≥ {AUTO_MIN_DIMS_PER_MATRIX} per factored "
            f"matrix ({matrices}): the factored projector (per-module kernels)"
        )
    if p * k <= AUTO_DENSE_MAX_ELEMENTS:
        return "rademacher", f"{size} ≤ 2^28 elements: a dense Rademacher projection"
    if share >= AUTO_MIN_FACTORABLE_SHARE:
        return "factored", (
            f"{size} > 2^28 elements and {layers} {share:.1%} of p: the factored "
            "projector (a dense one would regenerate a p × k matrix per batch)"
        )
    return "rademacher", (
        f"{size} > 2^28 elements, but {layers} only {share:.1%} of p: a dense "
        "Rademacher projection (slow at this size; pass grad_wrt= to differentiate fewer parameters)"
    )


def differentiated_parameters(model: nn.Module, args: TRAKArguments) -> list:
    """The parameters to differentiate: ``args.grad_wrt``; by default the trainable ones (a PEFT model in
    inference mode: its adapter), restricted to factorable layers for the factored projector, of which the
    estimator keeps its own (``hf_trak.method.estimator.default_parameters``: hf_trak's leave the biases out, and the
    attention's query/key/value projections of a whole model)."""
    if args.grad_wrt_selection is not None:
        return select_parameters(model, args.grad_wrt_selection)
    grad_wrt, factorable = None, False
    if is_peft_model(model) and not any(p.requires_grad for p in model.parameters()):
        grad_wrt = adapter_parameter_names(model)
    elif args.projector == "factored":
        trainable = set(select_parameters(model))
        grad_wrt = [name for name in factorable_parameter_names(model) if name in trainable]
        factorable = True
    whole_model = factorable and not is_peft_model(model)  # an adapter's layers are the user's choice
    selected = select_parameters(model, grad_wrt)
    names = default_parameters(args, model, selected, whole_model=whole_model)
    if factorable:
        logger.info(
            "Factored projection: differentiating %d of %d Linear/Conv1D/Embedding parameters (estimator=%r: "
            "hf_trak leaves biases and attention query/key/value projections out); pass grad_wrt to choose them "
            "(others use the dense fallback).",
            len(names),
            len(selected),
            args.estimator,
        )
    return names


def resolve_settings(
    args: TRAKArguments, model: nn.Module, task: AbstractModelOutput, store_version: int = STORE_VERSION
) -> Tuple[TRAKArguments, str]:
    """``(settings, why this projector)``: ``args`` with every "auto" resolved, the one place that happens: the
    projector (``choose_projector``), then the estimator's presets for it (``resolve_estimator``). The result is
    what the store records (``TRAKConfig.from_settings``) and what ``FeatureMap`` makes features with."""
    projector, reason = choose_projector(model, args)
    if args.projector == "auto":
        logger.info("projector='auto' chose %s: %s.", projector, reason)
    resolved = resolve_estimator(dataclasses.replace(args, projector=projector), task, store_version)
    if resolved.proj_dim == "auto":
        resolved = dataclasses.replace(resolved, proj_dim=auto_proj_dim(model, resolved))
    return resolved, reason


def auto_proj_dim(model: nn.Module, args: TRAKArguments) -> int:
    """k for ``proj_dim="auto"``: ``TOKENS_PROJ_DIM`` (4096) for per-token kernels (``kernel_from`` "tokens" or
    "mixed"), else
    ``DEFAULT_PROJ_DIM`` (2048); at most p, the differentiated parameters' count (the factored projector then keeps
    every matrix whole: the exact gradients).

    Chosen on the LDS suite's ``lm`` task (k = 512 ... 8192, seed 0, K=1 / K=5: 2048 0.564 / 0.640, 4096 0.590 / 0.657,
    8192 0.583 / 0.654) and confirmed on ``lm_llama`` (2048 0.220 / 0.368, 4096 0.242 / 0.396): the docs' "LDS
    against k". For kernels from the examples the choice tasks disagree (``text`` gains with k, ``image`` loses at
    K=1), so they keep 2048. A store holds 4·k bytes per example and checkpoint (X and Φ in float16): 16 KiB at 4096,
    16 GB for a million examples, whatever the model's size."""
    k = TOKENS_PROJ_DIM if args.kernel_from in PER_TOKEN_SOURCES else DEFAULT_PROJ_DIM
    parameters = dict(model.named_parameters())
    p = sum(parameters[name].numel() for name in differentiated_parameters(model, args))
    return min(k, p)


def default_kernel_source(per_module: bool, task: AbstractModelOutput, store_version: int = STORE_VERSION) -> str:
    """``kernel_from="auto"``: for hf_trak's per-module kernels ``per_module``, "tokens" for a causal LM (each token
    is a term of its loss) and "mixed" for any other model output (each block's Gram matrix the mean of the
    examples' and K-FAC's, ``hf_trak.method.kernel.mixed_gram``; "examples" in a store older than version 7);
    "examples" for one global kernel.

    Chosen on the LDS suite (``benchmarks/lds.py``, projector seeds 0-4, K=1 / K=5) over kernels from the
    examples: image 0.158 / 0.253 against 0.143 / 0.240, text 0.249 / 0.319 against 0.259 / 0.321 (within a
    standard deviation, 0.012 at K=1), and confirmed on text_minilm, 0.356 / 0.419 against 0.255 / 0.378."""
    if not per_module:
        return "examples"
    if isinstance(task, CausalLMModelOutput):
        return "tokens"
    return "mixed" if keeps_kernel_blocks(store_version) else "examples"


def resolve_estimator(
    args: TRAKArguments, task: AbstractModelOutput, store_version: int = STORE_VERSION
) -> TRAKArguments:
    """``args`` (its projector chosen) with ``train_weight``, ``kernel``, ``kernel_from``, ``lambda_scale``,
    ``ensemble``, ``principal_share`` and ``kernel_shrinkage`` set: their explicit values, else ``args.estimator``'s
    for its projector and model output; features for a store of a format without principal factors
    (``hf_trak.store.versions``) get neither principal factors nor shrinkage by default. ``proj_dim`` is None for the
    identity projector (k = p) and ``principal_fraction`` 0 without principal factors: what the store records.

    Principal factors and shrinkage, for per-token kernels (the LDS suite's causal LM, ``benchmarks/lds.py``,
    K=5): over projector seeds 0-4, 0.637 ± 0.004 with neither, 0.646 ± 0.004 with both (K=1: 0.544 → 0.565),
    against EK-FAC's 0.637 ± 0.001; with seed 0, neither 0.632, shrinkage alone 0.634, principal factors alone
    0.633, both 0.640. The classifiers' kernels, from the examples, keep random factors (not measured there)."""
    classic, projector = args.estimator == "trak", args.projector
    train_weight = args.train_weight
    if train_weight == "auto":
        train_weight = "out_to_loss" if classic else "none"
    kernel = args.kernel
    if kernel == "auto":
        kernel = "per_module" if projector == "factored" and not classic else "global"
    kernel_from = args.kernel_from
    if kernel_from == "auto":
        kernel_from = default_kernel_source(kernel == "per_module" and not classic, task, store_version)
    check_kernel_source(kernel_from, kernel, projector)
    if kernel_from == "mixed" and not keeps_kernel_blocks(store_version):
        raise InvalidArgumentError(
            f"kernel_from='mixed' is a format of store version 7 or later, and this is a version-{store_version} "
            "store: pass the current store version or another kernel_from."
        )
    lambda_scale = args.lambda_scale
    if lambda_scale is None:
        lambda_scale = LAMBDA_SCALE if classic else GLOBAL_LAMBDA_SCALE if kernel == "global" else MODULE_LAMBDA_SCALE
    ensemble = args.ensemble
    if ensemble == "auto":
        ensemble = "mean" if classic else "normalized"
    per_token = kernel_from in PER_TOKEN_SOURCES and not classic and has_principal_factors(store_version)
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
        shrinkage = MIXED_KERNEL_SHRINKAGE if kernel_from == "mixed" else KERNEL_SHRINKAGE
        kernel_shrinkage = shrinkage if per_token else 0.0
    if kernel_shrinkage and kernel_from not in PER_TOKEN_SOURCES:
        raise InvalidArgumentError(
            f"kernel_shrinkage={kernel_shrinkage} shrinks per-token Gram matrices, and kernel_from={kernel_from!r}: "
            "pass kernel_from='tokens' (or 'mixed') or kernel_shrinkage=0."
        )
    block_sizes = args.block_sizes
    if block_sizes == "auto":
        spectrum = not classic and projector == "factored" and has_block_shapes(store_version)
        block_sizes = "spectrum" if spectrum else "by_size"
    if block_sizes == "spectrum" and (projector != "factored" or not has_block_shapes(store_version)):
        raise InvalidArgumentError(
            f"block_sizes='spectrum' sizes the factored projector's matrices in a store of version 6 or later; this "
            f"is the {projector} projector in a version-{store_version} store: pass projector='factored' (and the "
            "current store version) or block_sizes='by_size'."
        )
    return dataclasses.replace(
        args,
        block_sizes=block_sizes,
        train_weight=train_weight,
        kernel=kernel,
        kernel_from=kernel_from,
        lambda_scale=lambda_scale,
        ensemble=ensemble,
        principal_share=float(principal_share),
        principal_fraction=args.principal_fraction if principal_share else 0.0,
        kernel_shrinkage=float(kernel_shrinkage),
        proj_dim=None if projector == "identity" else args.proj_dim,
    )
