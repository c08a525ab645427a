"""SFT data: a ``messages`` column through the tokenizer's chat template, with only the responses as labels.

Each conversation (a list of ``{"role", "content"}``) is rendered and tokenized by
``tokenizer.apply_chat_template``. The tokens of each assistant message (from the end of the
conversation before it, rendered with ``add_generation_prompt=True``, to the end of the conversation
rendered through it) keep their ids as ``labels``; every other token gets −100, so that a causal LM's
output f (and its training loss) counts the responses only, as TRL's ``assistant_only_loss`` does. A
template whose renderings of the earlier turns do not tokenize as a prefix of the whole is refused: the
responses' tokens could not be told apart.
"""

from typing import Callable, List, Optional

from transformers import PreTrainedTokenizerBase

from hf_trak.errors import InvalidArgumentError, InvalidInputError

MESSAGES = "messages"
IGNORED = -100


def _ids(tokenizer, messages, **kwargs) -> List[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    return list(rendered)


def chat_example(tokenizer: PreTrainedTokenizerBase, messages: list, max_length: Optional[int] = None) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` (the assistant messages' tokens, −100 elsewhere) of one
    conversation."""
    ids = _ids(tokenizer, messages)
    labels = [IGNORED] * len(ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:turn], add_generation_prompt=True) if turn else []
        through = _ids(tokenizer, messages[: turn + 1])
        if ids[: len(through)] != through or through[: len(prompt)] != prompt:
            raise InvalidInputError(
                "This chat template does not render earlier turns as a prefix of the conversation, so the "
                "responses' tokens cannot be found: tokenize the split yourself, with labels of -100 on the prompt."
            )
        labels[len(prompt) : len(through)] = ids[len(prompt) : len(through)]
    if not any(label != IGNORED for label in labels):
        raise InvalidInputError("A conversation has no assistant message: there is no response to attribute.")
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def chat_processing(tokenizer, column: str = MESSAGES, max_length: Optional[int] = None) -> Callable[[dict], dict]:
    """``batch -> model inputs`` for ``Dataset.map(batched=True)``: ``chat_example`` of each conversation."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            "chat_template=True needs a tokenizer with a chat template (tokenizer.chat_template): pass one as "
            "processor, or set its chat_template."
        )

    def process(batch):
        examples = [chat_example(tokenizer, messages, max_length) for messages in batch[column]]
        return {name: [example[name] for example in examples] for name in ("input_ids", "attention_mask", "labels")}

    return process
