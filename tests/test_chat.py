"""SFT data through the tokenizer's chat template: the responses alone are labels, through ``attribute``, the
Trainer and the command line."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import hf_trak
from hf_trak import TRAKArguments, TRAKer, TRAKHFTrainer, prepare_split
from hf_trak.data.chat import chat_example
from hf_trak.errors import InvalidArgumentError, InvalidInputError
from hf_trak.testing.models import tiny_gpt2, word_tokenizer

# Roles are the words "3" (user) and "4" (assistant); a turn ends with [SEP] (id 2); content words are ids.
TEMPLATE = (
    "{% for m in messages %}{{ '3' if m['role'] == 'user' else '4' }} {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}4 {% endif %}"
)


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(int(rng.integers(1, 3))):
            turns.append({"role": "user", "content": " ".join(map(str, rng.integers(5, 30, size=2)))})
            turns.append({"role": "assistant", "content": " ".join(map(str, rng.integers(5, 30, size=2)))})
        rows.append(turns)
    return Dataset.from_dict({"messages": rows})


def by_hand(messages):
    """The same example built without the template code: role word, content words, [SEP] per turn; labels on
    the assistant turns' content and [SEP] (the "4" that starts them is the prompt's generation prompt)."""
    ids, labels = [], []
    for message in messages:
        words = [3 if message["role"] == "user" else 4] + [int(w) for w in message["content"].split()] + [2]
        ids += words
        labels += [-100] + (words[1:] if message["role"] == "assistant" else [-100] * (len(words) - 1))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def test_the_responses_alone_are_labels():
    tokenizer = chat_tokenizer()
    for messages in conversations(6)["messages"]:
        assert chat_example(tokenizer, messages) == by_hand(messages)
    with pytest.raises(InvalidInputError, match="no assistant message"):
        chat_example(tokenizer, [{"role": "user", "content": "5 6"}])
    with pytest.raises(InvalidArgumentError, match="chat template"):
        prepare_split(conversations(2), tiny_gpt2(), None, word_tokenizer(), chat_template=True)


def test_attribute_with_the_template_scores_as_the_split_made_by_hand():
    train, targets = conversations(16), conversations(3, seed=1)
    result = hf_trak.attribute(tiny_gpt2(0), train, targets, processor=chat_tokenizer(), chat_template=True,
                               proj_dim=32, dtype="float32")  # fmt: skip
    manual = [Dataset.from_list([by_hand(m) for m in split["messages"]]) for split in (train, targets)]
    model = tiny_gpt2(0)
    expected = TRAKer(model, proj_dim=32, dtype="float32").featurize(manual[0], [model.state_dict()]).score(manual[1])
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    prompts_changed = [[dict(m, content="7 7") if m["role"] == "user" else m for m in c] for c in targets["messages"]]
    changed = hf_trak.attribute(tiny_gpt2(0), train, Dataset.from_dict({"messages": prompts_changed}),
                                processor=chat_tokenizer(), chat_template=True, proj_dim=32,
                                dtype="float32")  # fmt: skip
    assert not np.allclose(changed.scores, result.scores)  # the prompt still conditions the responses


def test_the_trainer_trains_and_attributes_on_the_responses(tmp_path):
    tokenizer, model = chat_tokenizer(), tiny_gpt2(0)
    train = prepare_split(conversations(16), model, None, tokenizer, chat_template=True)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, save_strategy="steps", save_steps=2,
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = TRAKHFTrainer(model=model, args=args, train_dataset=train,
                            data_collator=DataCollatorForSeq2Seq(tokenizer),
                            trak_args=TRAKArguments(proj_dim=32, dtype="float32"))  # fmt: skip
    trainer.train()
    targets = prepare_split(conversations(3, seed=1), model, None, tokenizer, chat_template=True)
    scores = trainer.traker.score(targets)
    checkpoints = [str(tmp_path / "out" / f"checkpoint-{step}") for step in (2, 4)]
    again = TRAKer(tiny_gpt2(0), proj_dim=32, dtype="float32").featurize(train, checkpoints).score(targets)
    np.testing.assert_allclose(scores, again, rtol=1e-5, atol=1e-6 * np.abs(again).max())
    assert torch.equal(
        torch.tensor(train[0]["labels"]), torch.tensor(by_hand(conversations(16)[0]["messages"])["labels"])
    )
