"""hf_trak: TRAK data attribution for Hugging Face models and datasets.

The public names are these; the sub-packages are the design (``hf_trak.method``: the estimator's math,
``hf_trak.store``: the feature store, ``hf_trak.data``: splits to model inputs, ``hf_trak.hf``: models,
checkpoints and adapters, ``hf_trak.run``: featurize and score, ``hf_trak.check``: checks on the user's task,
``hf_trak.explore``: the explorer, ``hf_trak.cli``: the command line).
"""

from hf_trak.arguments import TRAKArguments
from hf_trak.attribute import Attribution, attribute, top_k_dataset, with_token_scores
from hf_trak.data.processing import prepare_split
from hf_trak.data.streaming import spool_stream
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
from hf_trak.report import write_report, write_self_influence_report
from hf_trak.run.token_scores import TokenScores
from hf_trak.self_influence import self_influence_dataset, suspicion
from hf_trak.store.config import TRAKConfig
from hf_trak.store.feature_store import FeatureStore
from hf_trak.trainer import TRAKCallback, TRAKHFTrainer
from hf_trak.traker import TopK, TRAKer
from hf_trak.version import __version__

__all__ = [
    "with_token_scores",
    "write_self_influence_report",
    "TokenScores",
    "self_influence_dataset",
    "suspicion",
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
    "spool_stream",
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
