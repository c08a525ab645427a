"""hf_trak: TRAK data attribution for Hugging Face models and datasets.

The public names are these; the sub-packages are the design (``hf_trak.method``: the estimator's math,
``hf_trak.store``: the feature store, ``hf_trak.data``: splits to model inputs, ``hf_trak.hf``: models,
checkpoints and adapters, ``hf_trak.run``: featurize and score, ``hf_trak.explore``: the explorer).
"""

from hf_trak.arguments import TRAKArguments
from hf_trak.attribute import Attribution, attribute, top_k_dataset
from hf_trak.data.processing import prepare_split
from hf_trak.errors import (
    CorruptStoreError,
    DiskFullError,
    HubError,
    IncompleteStoreError,
    InvalidArgumentError,
    InvalidInputError,
    MissingDependencyError,
    NotFeaturizedError,
    NotFoundError,
    OutputExistsError,
    OutputNotWritableError,
    ProcessFailedError,
    StoreLockedError,
    StoreMismatchError,
    TRAKError,
)
from hf_trak.explore.app import explore  # Gradio is imported when explore is called
from hf_trak.method.model_outputs import (
    AbstractModelOutput,
    AutoModelOutput,
    CausalLMModelOutput,
    ClassificationModelOutput,
    CLIPModelOutput,
    ImageClassificationModelOutput,
    SequenceClassificationModelOutput,
    call_model,
)
from hf_trak.report import write_report
from hf_trak.store.config import TRAKConfig
from hf_trak.store.feature_store import FeatureStore
from hf_trak.trainer import TRAKCallback, TRAKHFTrainer
from hf_trak.traker import TopK, TRAKer
from hf_trak.version import __version__

__all__ = [
    "__version__",
    "AbstractModelOutput",
    "Attribution",
    "attribute",
    "AutoModelOutput",
    "call_model",
    "CausalLMModelOutput",
    "ClassificationModelOutput",
    "CLIPModelOutput",
    "CorruptStoreError",
    "DiskFullError",
    "explore",
    "FeatureStore",
    "HubError",
    "ImageClassificationModelOutput",
    "IncompleteStoreError",
    "InvalidArgumentError",
    "InvalidInputError",
    "MissingDependencyError",
    "NotFeaturizedError",
    "NotFoundError",
    "OutputExistsError",
    "OutputNotWritableError",
    "prepare_split",
    "ProcessFailedError",
    "SequenceClassificationModelOutput",
    "StoreLockedError",
    "StoreMismatchError",
    "TopK",
    "top_k_dataset",
    "TRAKArguments",
    "TRAKCallback",
    "TRAKConfig",
    "TRAKError",
    "TRAKer",
    "TRAKHFTrainer",
    "write_report",
]
