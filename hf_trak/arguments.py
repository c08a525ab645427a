"""``TRAKArguments``: every featurize and score setting, its default, its check and its JSON form.

One dataclass, read by everything that runs TRAK: ``TRAKer(model, args=...)`` (or its
keywords, which are these fields), ``TRAKHFTrainer(trak_args=...)``, ``TRAKer.from_pretrained``
(the stored settings) and the ``hf-trak`` command line, whose options are derived from the
fields (``add_arguments``): a setting added here appears everywhere. Each field's
``metadata`` holds its help text and ``scope``: ``"store"`` (recorded under its name in the
store's ``TRAKConfig``, which copies these fields both ways: scoring uses the stored value),
``"featurize"`` (shapes a featurization without being recorded by name: the task, the
estimator whose presets the store records, the parameters, where the store is and whether
to replace it), ``"run"`` (how one call computes: batch sizes, device, memory bounds) or
``"trainer"`` (``TRAKHFTrainer`` only).
"""

import argparse
import dataclasses
import json
import typing
from typing import List, Optional, Union

import torch

from hf_trak.errors import InvalidArgumentError, check_positive_int

PROJECTORS = ("auto", "rademacher", "normal", "identity", "factored")
NONFINITE_POLICIES = ("error", "exclude")
ESTIMATORS = ("hf_trak", "trak")
TRAIN_WEIGHTS = ("auto", "out_to_loss", "none")
KERNELS = ("auto", "global", "per_module")
KERNEL_SOURCES = ("auto", "examples", "tokens", "mixed", "ekfac")
ENSEMBLES = ("auto", "mean", "normalized")
STORAGE_DTYPES = ("float16", "float32")
BLOCK_SIZES = ("auto", "by_size", "spectrum")


def _field(default, help: str, scope: str = "store", **metadata):
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(**factory, metadata={"help": help, "scope": scope, **metadata})


@dataclasses.dataclass
class TRAKArguments:
    """TRAK settings (see each field's help; ``hf-trak featurize --help`` lists them too)."""

    task: Optional[str] = _field(
        None,
        "model output function: text_classification, image_classification, causal_lm, clip (default: the head)",
        scope="featurize",
    )
    proj_dim: Union[int, str, None] = _field(
        "auto",
        "k, the feature dimension (ignored by the identity projector), or auto (4096 for per-token kernels, else "
        "2048, at most the number of differentiated parameters: hf_trak.method.estimator.auto_proj_dim)",
        parse="proj_dim",
    )
    estimator: str = _field(
        "hf_trak",
        "what the settings left at auto become (hf_trak.method.estimator): hf_trak (the LDS suite's choice: no Q, "
        "weights "
        "without biases or attention query/key/value projections, per-module kernels on the factored projector "
        "with λ_b = 0.01·tr_b/k_b, from per-token gradients for causal LMs (principal factors, kernels shrunk "
        "toward K-FAC), each checkpoint's scores normalized per target) or trak (TRAK as the seeds define it: Q, "
        "one global kernel, λ = 0.1·tr/k, the mean over checkpoints)",
        choices=ESTIMATORS,
        scope="featurize",
    )
    projector: str = _field(
        "auto",
        "auto (see hf_trak.method.estimator.choose_projector: hf_trak: factored when Linear/Conv1D/Embedding layers "
        "hold ≥ 0.9 of p; trak: factored for large p·k; else rademacher), rademacher, normal, identity (raw "
        "gradients) or factored",
        choices=PROJECTORS,
    )
    projector_seed: int = _field(0, "seed of the projection (checkpoint m gets its own matrix)")
    lambda_reg: Optional[float] = _field(None, "λ added to XᵀX (default: lambda_scale · tr(XᵀX)/k per checkpoint)")
    lambda_scale: Optional[float] = _field(
        None,
        "with lambda_reg unset, λ = lambda_scale · tr(XᵀX)/k (per block: tr_b/k_b) (default: trak: 0.1; hf_trak: "
        "0.01 per block, 1 with a global kernel)",
    )
    kernel: str = _field(
        "auto",
        "global (one k × k kernel) or per_module (block-diagonal: one kernel per projected matrix, each with its own "
        "λ; factored projector) (auto: hf_trak: per_module with the factored projector, else global; trak: global)",
        choices=KERNELS,
    )
    kernel_from: str = _field(
        "auto",
        "each per-module kernel from: the examples' features (XᵀX blocks), tokens (Σ_i Σ_t z_it z_itᵀ of the "
        "projected per-token gradients), mixed (the mean of the two, the tokens' scaled to the examples' trace), or "
        "ekfac (EK-FAC in projected space: the Kronecker factors' eigenbases, eigenvalues fitted to the examples); "
        "tokens, mixed and ekfac need the factored projector (auto: hf_trak: tokens "
        "for a causal LM's per-module kernels, else examples; trak: examples)",
        choices=KERNEL_SOURCES,
    )
    train_weight: str = _field(
        "auto",
        "train-side weight of the scores: out_to_loss (TRAK's Q_i = ∂ℓ/∂f, averaged over checkpoints) or none "
        "(auto: hf_trak: none; trak: out_to_loss)",
        choices=TRAIN_WEIGHTS,
    )
    ensemble: str = _field(
        "auto",
        "how the checkpoints' scores combine: mean (TRAK: τ = mean_m X_m K_m T_mᵀ) or normalized (each "
        "checkpoint's scores of a target divided by their RMS over the train rows, then averaged) (auto: hf_trak: "
        "normalized; trak: mean)",
        choices=ENSEMBLES,
    )
    principal_share: Optional[float] = _field(
        None,
        "factored projector: share of each side's dimensions (d ≤ 4096) given to the leading eigenvectors of its "
        "per-token second moment, the rest a random projection of the other directions (0: all random) (default: "
        "hf_trak: 0.6 with per-token kernels, else 0; trak: 0)",
    )
    principal_fraction: float = _field(
        0.1,
        "share of the train rows (evenly spaced) the second moments for principal_share are estimated from (0 only "
        "with principal_share=0: what a store without principal factors records)",
    )
    block_sizes: str = _field(
        "auto",
        "factored projector: how k is divided among the projected matrices: by_size (each a share ∝ its size) or "
        "spectrum (by how much of each matrix's per-token gradient spectrum the sizes keep, from principal_fraction "
        "of the train rows, 0.1 if 0, at the first checkpoint: hf_trak.method.block_sizes) (auto: hf_trak: "
        "spectrum; trak: by_size)",
        choices=BLOCK_SIZES,
    )
    kernel_shrinkage: Optional[float] = _field(
        None,
        "per-token kernels: α in (1 − α)·G_b + α·(A_b ⊗ B_b), shrinking each block's Gram matrix toward its K-FAC "
        "approximation (default: hf_trak: 0.3 with per-token kernels, else 0; trak: 0)",
    )
    dtype: str = _field("float16", "storage dtype of the train features", choices=STORAGE_DTYPES)
    grad_wrt: Optional[List[str]] = _field(
        None,
        "parameter names to differentiate, or 'all' (default: the trainable ones; hf_trak: without biases, and "
        "with the factored projector without the attention's query/key/value projections)",
        scope="featurize",
    )
    param_chunk_numel: Optional[int] = _field(
        None, "dense projectors: per-example gradients of at most this many parameter elements at a time", scope="run"
    )
    max_projector_cache_bytes: int = _field(4 * 2**30, "memory for cached projection blocks (bytes)", scope="run")
    shard_size: int = _field(4096, "train rows per stored shard (unit of resuming and of work per process)")
    save_dir: Optional[str] = _field(
        None,
        "the feature store (None: a temporary folder for TRAKer, <output_dir>/trak for TRAKHFTrainer)",
        scope="featurize",
    )
    batch_size: Optional[int] = _field(
        None,
        "examples per forward/backward pass (None: as many as fit half the free memory, at most 32, estimated from "
        "the longest sequence, the model's size and vocabulary: hf_trak.run.memory)",
        scope="run",
    )
    stream_dir: Optional[str] = _field(
        None,
        "a streamed split (load_dataset(..., streaming=True)) is read once into Arrow files in <stream_dir>/<split>, "
        "resumable (default: <save_dir>-rows)",
        scope="run",
    )
    target_block_size: int = _field(4096, "targets scored together against one train shard", scope="run")
    device: Optional[str] = _field(None, "where gradients are computed (default: the model's)", scope="run")
    on_nonfinite: str = _field(
        "error",
        "a row with NaN/inf inputs or gradients: error (names it) or exclude (scores NaN, listed in the store)",
        scope="run",
        choices=NONFINITE_POLICIES,
    )
    overwrite: bool = _field(False, "replace a store made with other settings", scope="featurize")
    lock_timeout: Optional[float] = _field(
        None,
        "seconds to wait for another process featurizing the same store before a StoreLockedError (featurize "
        "takes turns with it; scoring waits for the finished store) (None: as long as it takes; 0: at once)",
        scope="run",
    )
    process_timeout: Optional[float] = _field(
        None,
        "several processes: seconds a collective waits for the others before a ProcessFailedError, for the process "
        "group TRAKer makes (None: torch's, 30 minutes; a process that dies is noticed at once)",
        scope="run",
    )
    keep_initial_weights: bool = _field(
        True,
        "TRAKHFTrainer: keep the trained parameters' starting values (and the buffers) in output_dir when "
        "training starts, so that the checks (check_attribution, hf-trak check) can retrain the model",
        scope="trainer",
    )
    max_checkpoints: Optional[int] = _field(
        None, "TRAKHFTrainer: featurize the last N saved checkpoints (default: all)", scope="trainer"
    )

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).replace("torch.", "")
        if isinstance(self.grad_wrt, str):
            self.grad_wrt = [self.grad_wrt]
        for name in ("target_block_size", "shard_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("batch_size", "param_chunk_numel", "max_checkpoints"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.proj_dim != "auto" and (self.projector != "identity" or self.proj_dim is not None):
            valid = isinstance(self.proj_dim, int) and not isinstance(self.proj_dim, bool) and self.proj_dim > 0
            if not valid:
                raise InvalidArgumentError(f"proj_dim must be 'auto' or a positive integer, got {self.proj_dim!r}.")
        _check_choice("projector", self.projector, PROJECTORS)
        _check_choice("dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("train_weight", self.train_weight, TRAIN_WEIGHTS)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("kernel_from", self.kernel_from, KERNEL_SOURCES)
        _check_choice("ensemble", self.ensemble, ENSEMBLES)
        _check_choice("block_sizes", self.block_sizes, BLOCK_SIZES)
        check_kernel_source(self.kernel_from, self.kernel)
        if isinstance(self.projector_seed, bool) or not isinstance(self.projector_seed, int):
            raise InvalidArgumentError(f"projector_seed must be an integer, got {self.projector_seed!r}.")
        if self.process_timeout is not None and not (_is_number(self.process_timeout) and self.process_timeout > 0):
            raise InvalidArgumentError(f"process_timeout must be seconds > 0 (or None), got {self.process_timeout!r}.")
        if self.lock_timeout is not None and not (_is_number(self.lock_timeout) and self.lock_timeout >= 0):
            raise InvalidArgumentError(
                f"lock_timeout must be a number of seconds >= 0 (or None), got {self.lock_timeout!r}."
            )
        if self.lambda_reg is not None and not self.lambda_reg >= 0:
            raise InvalidArgumentError(f"lambda_reg must be >= 0 (or None to derive it), got {self.lambda_reg!r}.")
        if self.lambda_scale is not None and not self.lambda_scale > 0:
            raise InvalidArgumentError(f"lambda_scale must be > 0, got {self.lambda_scale!r}.")
        for name in ("principal_share", "kernel_shrinkage"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value <= 1):
                raise InvalidArgumentError(f"{name} must be in [0, 1] (or None for the estimator's), got {value!r}.")
        unused = self.principal_fraction == 0 and self.principal_share == 0
        if not (_is_number(self.principal_fraction) and (0 < self.principal_fraction <= 1 or unused)):
            raise InvalidArgumentError(f"principal_fraction must be in (0, 1], got {self.principal_fraction!r}.")
        if isinstance(self.max_projector_cache_bytes, bool) or not (
            isinstance(self.max_projector_cache_bytes, int) and self.max_projector_cache_bytes >= 0
        ):
            raise InvalidArgumentError(
                f"max_projector_cache_bytes must be an integer >= 0, got {self.max_projector_cache_bytes!r}."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def grad_wrt_selection(self):
        """``grad_wrt`` as ``select_parameters`` takes it ("all" rather than ["all"])."""
        return "all" if self.grad_wrt == ["all"] else self.grad_wrt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "TRAKArguments":
        return cls(**json.loads(text))


STORED = ("store",)
FEATURIZE_SCOPES = ("store", "featurize", "run")


def fields_in(scopes, names=()) -> List[dataclasses.Field]:
    """The fields of ``scopes``, and those named in ``names``."""
    return [f for f in dataclasses.fields(TRAKArguments) if f.metadata["scope"] in scopes or f.name in names]


def add_arguments(parser: argparse.ArgumentParser, scopes=FEATURIZE_SCOPES, names=()) -> None:
    """A ``--field-name`` option for each field of ``scopes`` (and of ``names``): type, default, choices and
    help from the field."""
    group = parser.add_argument_group("TRAK settings (TRAKArguments)")
    for field in fields_in(scopes, names):
        option = "--" + field.name.replace("_", "-")
        kind = _base_type(field.type)
        kwargs = {"dest": field.name, "default": field.default, "help": field.metadata["help"]}
        if kind is bool:
            group.add_argument(option, action="store_true", **kwargs)
            continue
        if _is_list(field.type):
            kwargs["nargs"] = "+"
        kwargs["type"] = PARSERS[field.metadata["parse"]] if "parse" in field.metadata else kind
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        group.add_argument(option, **kwargs)


def _proj_dim(text: str) -> Union[int, str]:
    """argparse type of ``--proj-dim``: "auto" or an integer > 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return value


PARSERS = {"proj_dim": _proj_dim}


def parsed_settings(namespace: argparse.Namespace, scopes=FEATURIZE_SCOPES, names=()) -> dict:
    """``{field: value}`` of the options ``add_arguments`` added, as parsed."""
    return {field.name: getattr(namespace, field.name) for field in fields_in(scopes, names)}


def _base_type(annotation):
    """int for Optional[int], str for Optional[List[str]], ..."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(annotation) in (list, List):
        return args[0]
    return annotation


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) is typing.Union:
        return any(_is_list(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, List)


def check_kernel_source(kernel_from: str, kernel: str, projector: Optional[str] = None) -> None:
    """Per-token statistics (``kernel_from`` "tokens" or "ekfac") make a kernel per projected matrix: refused with
    a global kernel, whether asked for or what the estimator gives ``projector``."""
    if kernel_from not in ("auto", "examples") and kernel == "global":
        because = f", and the {projector} projector gives one global kernel" if projector else ""
        raise InvalidArgumentError(
            f"kernel_from={kernel_from!r} builds a kernel per projected matrix{because}: pass kernel='per_module' "
            "(with projector='factored')."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
