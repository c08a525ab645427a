"""``TRAKConfig``: what determines a set of TRAK features, serialised to JSON as the store's ``trak_config.json``."""

import dataclasses
import json
from typing import Dict, List, Optional

from hf_trak.arguments import STORED, TRAKArguments, fields_in
from hf_trak.store.versions import upgrade

CONFIG_NAME = "trak_config.json"

# Fields that give the features their meaning: scoring with another value is wrong.
FEATURE_FIELDS = (
    "model_class",
    "task",
    "task_settings",
    "projector",
    "proj_dim",
    "feature_dim",
    "projector_seed",
    "param_names",
    "num_params",
    "adapter_config",
    "principal_share",
    "block_sizes",
    "block_shapes",
)
# Fields that a resumed featurization must also share (checkpoint fingerprints are checked
# checkpoint by checkpoint as featurize loads them: ``hf_trak.run.featurize``). The store version
# fixes the factored projector's sizes, so features of two versions cannot share a store.
RESUME_FIELDS = FEATURE_FIELDS + (
    "store_version",
    "dtype",
    "lambda_reg",
    "lambda_scale",
    "train_weight",
    "kernel",
    "kernel_blocks",
    "kernel_from",
    "ensemble",
    "principal_fraction",
    "kernel_shrinkage",
    "num_checkpoints",
    "num_train_examples",
    "train_hashes",
    "shard_size",
)


@dataclasses.dataclass
class TRAKConfig:
    """Settings and provenance of a featurization.

    ``proj_dim`` is the requested projection size and ``feature_dim`` the feature dimension
    k it gave (p for the identity projector, at most ``proj_dim`` when factored); ``param_names``
    the differentiated parameters (p = ``num_params`` elements), ``dtype`` the storage
    dtype of the features, ``lambda_reg`` the requested λ (None: derived per checkpoint).
    ``projector`` is the projector used (``projector_reason`` says why, e.g. what
    ``projector="auto"`` chose). ``lambda_scale`` gives λ = lambda_scale · tr(XtX)/k when ``lambda_reg`` is None;
    ``ensemble`` how the checkpoints' scores combine (stores without it: "mean"); ``principal_share`` and
    ``principal_fraction`` the factored projector's principal factors (``hf_trak.method.factored``; 0: random),
    ``kernel_shrinkage`` α of the per-token kernels (``hf_trak.method.kernel.shrunk_gram``); stores without them: 0.
    ``block_sizes`` how the factored projector divided k among its matrices, and ``block_shapes`` the [k_r, k_c] of
    each weight where they came from the data (``"spectrum"``: made by featurize at the first checkpoint; {} until
    then, and for ``"by_size"``, whose sizes follow from the model and k).
    ``train_hashes`` identify the train split's rows in order (sha256 per shard of its row
    hashes, ``hf_trak.store.provenance``; ``train_fingerprint`` is ``datasets``' fingerprint, for
    information), ``excluded_rows`` the rows excluded for non-finite values (scores NaN), and
    ``checkpoint_fingerprints[m]`` the weights of checkpoint m (sha256 of its parameters; ""
    until featurize has loaded it);
    ``checkpoint_sources[m]`` says where they came from (a path, or "state_dict").
    For a PEFT model, ``adapter_config`` is the adapter's layout (peft's config without paths
    or versions), ``base_model`` where the base model came from, and ``base_fingerprint``
    the sha256 of checkpoint 0's non-adapter weights (the base the adapters were trained on).
    """

    # what the features were made of
    model_class: str
    name_or_path: str
    task: str
    task_settings: dict
    param_names: List[str]
    num_params: int
    store_version: int
    feature_dim: int
    kernel_blocks: List[List[int]]
    # the settings (TRAKArguments' fields of scope "store", resolved: ``from_settings``/``settings``)
    projector: str
    proj_dim: Optional[int]
    projector_seed: int
    lambda_reg: Optional[float]
    lambda_scale: float
    kernel: str
    kernel_from: str
    train_weight: str
    ensemble: str
    principal_share: float
    principal_fraction: float
    kernel_shrinkage: float
    block_sizes: str
    dtype: str
    shard_size: int
    # provenance, filled in as featurize goes
    projector_reason: str = ""
    model_revision: Optional[str] = None
    hf_trak_version: str = ""
    num_checkpoints: int = 0
    num_train_examples: int = 0
    train_fingerprint: str = ""
    train_hashes: List[str] = dataclasses.field(default_factory=list)
    checkpoint_fingerprints: List[str] = dataclasses.field(default_factory=list)
    checkpoint_sources: List[str] = dataclasses.field(default_factory=list)
    adapter_config: Optional[dict] = None
    base_model: str = ""
    base_fingerprint: str = ""
    excluded_rows: List[int] = dataclasses.field(default_factory=list)
    block_shapes: Dict[str, List[int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, args: TRAKArguments, **fields) -> "TRAKConfig":
        """The config of features made with ``args`` (resolved: ``hf_trak.method.estimator.resolve_settings``), its
        fields of scope "store" copied by name, and the other ``fields``."""
        return cls(**{field.name: getattr(args, field.name) for field in fields_in(STORED)}, **fields)

    def settings(self, **settings) -> TRAKArguments:
        """The ``TRAKArguments`` the features were made with (the fields of scope "store"), with ``settings``."""
        return TRAKArguments(**{field.name: getattr(self, field.name) for field in fields_in(STORED)}, **settings)

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str, root: str = "") -> "TRAKConfig":
        """The config of a store of any version up to ``STORE_VERSION`` (``hf_trak.store.versions.upgrade``)."""
        return cls(**upgrade(json.loads(text), root))

    def mismatches(self, other: "TRAKConfig", resume: bool = False) -> List[str]:
        """Human-readable differences in the fields that matter (``resume``: for continuing a run)."""
        fields = RESUME_FIELDS if resume else FEATURE_FIELDS
        if resume and not self.train_hashes:  # a store written before row hashes: datasets' fingerprint
            fields = tuple("train_fingerprint" if name == "train_hashes" else name for name in fields)
        found = []
        for name in fields:
            stored, given = getattr(self, name), getattr(other, name)
            if isinstance(stored, dict) and isinstance(given, dict):
                found += [
                    f"{name}.{key}: stored {_short(stored.get(key))}, given {_short(given.get(key))}"
                    for key in sorted(set(stored) | set(given))
                    if stored.get(key) != given.get(key)
                ]
            elif name == "train_hashes" and stored != given:
                found.append(_split_difference(stored, given))
            elif stored != given:
                found.append(f"{name}: stored {_short(stored)}, given {_short(given)}")
        return found


def _split_difference(stored: List[str], given: List[str]) -> str:
    if len(stored) != len(given):
        return f"train split: {len(given)} shard(s) of rows given, {len(stored)} stored"
    shard = next(i for i, (a, b) in enumerate(zip(stored, given)) if a != b)
    return f"train split: other rows in shard {shard} (shuffled, filtered or re-tokenized?)"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
