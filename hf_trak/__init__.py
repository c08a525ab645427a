"""hf_trak: TRAK data attribution for Hugging Face models and datasets."""

__version__ = "0.1.0"

from .app import explore  # noqa: E402  (Gradio is imported when explore is called)
from .arguments import TRAKArguments  # noqa: E402
from .attribute import Attribution, attribute  # noqa: E402
from .config import TRAKConfig  # noqa: E402
from .errors import (  # noqa: E402
    CorruptStoreError,
    HubError,
    InvalidArgumentError,
    InvalidInputError,
    OutputExistsError,
    StoreMismatchError,
    TRAKError,
)
from .model_outputs import (  # noqa: E402
    AbstractModelOutput,
    AutoModelOutput,
    CausalLMModelOutput,
    ClassificationModelOutput,
    CLIPModelOutput,
    ImageClassificationModelOutput,
    SequenceClassificationModelOutput,
)
from .trainer import TRAKCallback, TRAKHFTrainer  # noqa: E402
from .traker import TopK, TRAKer  # noqa: E402

__all__ = [
    "AbstractModelOutput",
    "Attribution",
    "attribute",
    "AutoModelOutput",
    "CausalLMModelOutput",
    "ClassificationModelOutput",
    "CLIPModelOutput",
    "CorruptStoreError",
    "explore",
    "HubError",
    "InvalidArgumentError",
    "InvalidInputError",
    "OutputExistsError",
    "StoreMismatchError",
    "TRAKError",
    "ImageClassificationModelOutput",
    "SequenceClassificationModelOutput",
    "TopK",
    "TRAKArguments",
    "TRAKCallback",
    "TRAKConfig",
    "TRAKer",
    "TRAKHFTrainer",
]
