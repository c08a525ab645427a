"""Raw ``load_dataset`` splits → model inputs, with the model's processor.

A processor is a tokenizer (text), an image processor (images), a multimodal processor
(CLIP: text and images), or any ``batch dict -> dict of model inputs`` function. It is
applied with ``Dataset.map(batched=True)`` (cached by ``datasets`` like any preprocessing);
the raw columns it reads are dropped and ``label``/``labels`` kept. Which columns hold
the text and the images is read from the split's features when not given: string columns,
and ``datasets.Image`` columns (or one named ``image``/``img``).

Causal LMs are attributed on their own tokens: without a ``labels`` column, ``labels`` are
the ``input_ids`` (the model shifts them), as in ``DataCollatorForLanguageModeling(mlm=False)``.
Chat data (a ``messages`` column) goes through the tokenizer's chat template with
``chat_template=True``, the responses alone as labels (``hf_trak.data.chat``).
"""

from typing import Callable, List, Optional, Sequence, Union

from datasets import Dataset, Image, Value
from torch import nn
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import ImageProcessingMixin

from hf_trak.data.chat import MESSAGES, chat_processing
from hf_trak.errors import InvalidArgumentError
from hf_trak.method.model_outputs import CausalLMModelOutput

LABEL_COLUMNS = ("labels", "label")
IMAGE_NAMES = ("image", "img")
# Columns of tokenized inputs: never shown in attribution results (they are the model's view of the text).
MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_mask")

Columns = Union[None, str, Sequence[str]]


def is_text(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def text_columns(dataset: Dataset, text_column: Columns = None) -> List[str]:
    """The one or two text columns (a pair: ``sentence1``/``sentence2``) a tokenizer reads."""
    if text_column is not None:
        names = [text_column] if isinstance(text_column, str) else list(text_column)
    else:
        names = [name for name, feature in dataset.features.items() if is_text(feature) and name not in LABEL_COLUMNS]
    missing = [name for name in names if name not in dataset.column_names]
    if not names and MESSAGES in dataset.column_names:
        raise InvalidArgumentError(
            f"The {MESSAGES!r} column holds conversations: pass chat_template=True (hf-trak: --chat-template) to "
            "render them with the tokenizer's chat template."
        )
    if missing or not 1 <= len(names) <= 2:
        raise InvalidArgumentError(
            f"Cannot tell which column holds the text (string columns: {names}, columns: {dataset.column_names}): "
            "pass text_column='my_text' (or a pair of column names)."
        )
    return names


def image_column(dataset: Dataset, image_column: Optional[str] = None) -> str:
    """The column of images an image processor reads."""
    if image_column is not None:
        names = [image_column] if image_column in dataset.column_names else []
    else:
        names = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
        names = names or [name for name in IMAGE_NAMES if name in dataset.column_names]
    if len(names) != 1:
        raise InvalidArgumentError(
            f"Cannot tell which column holds the images (columns: {dataset.column_names}): "
            "pass image_column='my_images'."
        )
    return names[0]


def _images(batch: dict, column: str, model: nn.Module) -> list:
    """PIL images as the model's channels expect them (RGB for 3 channels)."""
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    channels = channels or getattr(getattr(getattr(model, "config", None), "vision_config", None), "num_channels", 3)
    mode = {1: "L", 3: "RGB"}.get(channels)
    return [image.convert(mode) if mode and hasattr(image, "convert") else image for image in batch[column]]


def processing_function(
    dataset: Dataset,
    model: nn.Module,
    processor,
    text_column: Columns = None,
    image_column_name: Optional[str] = None,
    max_length: Optional[int] = None,
) -> tuple:
    """``(batch -> model inputs, raw columns it reads)`` for ``processor`` on ``dataset``'s columns."""
    if isinstance(processor, ProcessorMixin):
        texts, images = text_columns(dataset, text_column), image_column(dataset, image_column_name)

        def process(batch):
            return processor(
                text=batch[texts[0]],
                images=_images(batch, images, model),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="np",
            )

        return process, texts + [images]
    if isinstance(processor, PreTrainedTokenizerBase):
        texts = text_columns(dataset, text_column)

        def tokenize(batch):
            return processor(*[batch[name] for name in texts], truncation=True, max_length=max_length)

        return tokenize, texts
    if isinstance(processor, ImageProcessingMixin):
        images = image_column(dataset, image_column_name)
        return (lambda batch: processor(images=_images(batch, images, model), return_tensors="np")), [images]
    if callable(processor):
        return processor, []
    raise InvalidArgumentError(
        f"processor must be a tokenizer, an image processor, a ProcessorMixin or a function, got {type(processor)}."
    )


def prepare_split(
    dataset: Dataset,
    model: nn.Module,
    task,
    processor: Optional[Callable] = None,
    text_column: Columns = None,
    image_column: Optional[str] = None,
    max_length: Optional[int] = None,
    chat_template: bool = False,
) -> Dataset:
    """``dataset`` with model-input columns (and ``labels``), ready for ``TRAKer.featurize``/``score``.

    ``chat_template=True``: the ``messages`` column (or ``text_column``) is a conversation per row, rendered by
    ``processor``'s chat template with the prompts masked (``hf_trak.data.chat``)."""
    if chat_template:
        column = text_column if isinstance(text_column, str) else MESSAGES
        if column not in dataset.column_names:
            raise InvalidArgumentError(
                f"chat_template=True reads conversations from a {column!r} column; this split has "
                f"{dataset.column_names}: name it with text_column."
            )
        return dataset.map(chat_processing(processor, column, max_length), batched=True, remove_columns=[column],
                           desc="Applying the chat template")  # fmt: skip
    if processor is not None:
        process, consumed = processing_function(dataset, model, processor, text_column, image_column, max_length)
        dropped = [name for name in consumed if name not in LABEL_COLUMNS]
        dataset = dataset.map(process, batched=True, remove_columns=dropped, desc="Processing")
    has_labels = any(name in dataset.column_names for name in LABEL_COLUMNS)
    if isinstance(task, CausalLMModelOutput) and not has_labels and "input_ids" in dataset.column_names:
        dataset = dataset.map(lambda batch: {"labels": batch["input_ids"]}, batched=True, desc="Adding labels")
    return dataset


def display_columns(dataset: Dataset) -> List[str]:
    """The columns that show a person what an example is: all but tokenized model inputs."""
    return [name for name in dataset.column_names if name not in MODEL_INPUT_COLUMNS]
