"""``TRAKConfig``: what determines a set of TRAK features, serialised to JSON."""

import dataclasses
import json
from typing import List, Optional

CONFIG_NAME = "trak_config.json"


@dataclasses.dataclass
class TRAKConfig:
    """Settings of a featurization; two feature sets can be scored together only if these agree.

    ``proj_dim`` is the feature dimension k (p for the identity projector), ``param_names``
    the differentiated parameters (p = ``num_params`` elements), ``dtype`` the storage
    dtype of the features, ``lambda_reg`` the requested λ (None: derived per checkpoint).
    """

    model_class: str
    name_or_path: str
    task: str
    task_settings: dict
    projector: str
    proj_dim: int
    projector_seed: int
    param_names: List[str]
    num_params: int
    lambda_reg: Optional[float]
    dtype: str
    num_checkpoints: int = 0
    num_train_examples: int = 0
    hf_trak_version: str = ""

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "TRAKConfig":
        return cls(**json.loads(text))

    def mismatches(self, other: "TRAKConfig") -> List[str]:
        """Fields that make features incompatible (model, task, parameters, projection) and differ."""
        ignored = {"name_or_path", "num_checkpoints", "num_train_examples", "hf_trak_version", "lambda_reg", "dtype"}
        return [
            f"{field.name}: stored {getattr(self, field.name)!r}, given {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name not in ignored and getattr(self, field.name) != getattr(other, field.name)
        ]
