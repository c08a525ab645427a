"""Self-influence: the training examples that most move the model on themselves, with what it predicts for them.

``TRAKer.self_scores`` gives two: a row's influence on its own output f (``on="output"``: large when no
other example pushes the model the way the row does, so that the model bends to fit it alone, as it does
for a flipped label it has memorized) and on its own loss (``on="loss"``: that times Q_i, the loss's
derivative, large when the model still gets the row wrong). ``suspicion`` ranks rows by the mean of their
two ranks: mislabeled rows, outliers and rare cases first, typical rows with many look-alikes last. On
``benchmarks/mislabeled.py`` it ranked flipped labels (by AUC) above the models' loss and kronfluence's
self-scores on both tasks, where each score alone was the best on one task and the worst on the other
(docs: How to read a score).
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Sequence as SequenceFeature
from scipy.stats import rankdata

from hf_trak.attribute import token_names
from hf_trak.data.processing import LABEL_COLUMNS, display_columns
from hf_trak.data.source import ExampleSource
from hf_trak.errors import check_positive_int
from hf_trak.hf.checkpoints import load_checkpoint
from hf_trak.method.model_outputs import ClassificationModelOutput, call_model, eval_mode, without_labels
from hf_trak.run.token_scores import TokenScores
from hf_trak.traker import TRAKer


@torch.no_grad()
def last_checkpoint_outputs(
    traker: TRAKer, prepared: Dataset, rows: np.ndarray
) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """``(predicted class of each row, or None for heads without classes; its loss)`` at the last checkpoint,
    for ``rows`` of the train split's model inputs (one forward pass per row)."""
    weights, buffers = load_checkpoint(traker.checkpoints[-1], traker.model, traker.device)
    source = ExampleSource.for_model(prepared, traker.model, traker.task)
    classifier = isinstance(traker.task, ClassificationModelOutput)
    predictions, losses = [], []
    with eval_mode(traker.model):
        for row in rows:
            batch = {name: value.to(traker.device) for name, value in source.batch([int(row)]).items()}
            output = call_model(traker.model, weights, buffers, without_labels(batch) if classifier else batch)
            if classifier:
                logits = output.logits.float()
                predictions.append(int(logits.argmax(-1)[0]))
                losses.append(float(torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1))))
            else:
                loss = getattr(output, "loss", None)
                losses.append(float(loss) if loss is not None else float("nan"))
    return (np.asarray(predictions, dtype=np.int64) if classifier else None), np.asarray(losses, dtype=np.float32)


def suspicion(traker: TRAKer) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(suspicion, self-influence on the output, on the loss)`` of every train row: suspicion is the mean of the
    row's two ranks (by each score, highest first) divided by the number of rows, in (0, 1], 1 the most
    suspect; rows excluded for non-finite values get 0."""
    on_output, on_loss = traker.self_scores(on="both")
    finite = np.isfinite(on_output) & np.isfinite(on_loss)
    ranks = np.zeros(len(on_output))
    ranks[finite] = (rankdata(on_output[finite]) + rankdata(on_loss[finite])) / (2 * finite.sum())
    return ranks, on_output, on_loss


def self_influence_tokens(traker: TRAKer, prepared: Dataset, rows: Sequence[int]) -> List[TokenScores]:
    """Each row's self-influence on its loss split by position (its tokens as the train example, which
    ``train_tokens`` gives, and as the target): ``TRAKer.score_tokens(..., on="loss")`` of the row on itself.
    ``prepared``: the train split's model inputs, as featurized."""
    return [traker.score_tokens(prepared.select([int(row)]), train_rows=[int(row)], on="loss")[0] for row in rows]


def self_influence_dataset(
    traker: TRAKer, train: Dataset, prepared: Dataset, k: int = 50, per_token: bool = False, processor=None
) -> Dataset:
    """The ``k`` most suspect train rows (``suspicion``), most suspect first: columns ``rank`` (0 = first),
    ``train_index``, ``suspicion``, ``score`` (self-influence on its loss), ``score_on_output``, ``loss`` and, for
    classifiers, ``prediction`` (the last checkpoint's), then the raw columns of ``train`` (the split as loaded;
    ``prepared`` is its model inputs, as featurized). With
    ``per_token``, ``tokens`` and ``token_scores``: the row's tokens (named by ``processor``'s tokenizer) and
    their shares of its self-influence (``self_influence_tokens``; a forward and backward per row)."""
    check_positive_int("k", k)
    ranks, on_output, on_loss = suspicion(traker)
    order = np.argsort(-ranks, kind="stable")[: min(k, len(ranks))]
    predictions, losses = last_checkpoint_outputs(traker, prepared, order)
    columns = {"rank": np.arange(len(order)), "train_index": order, "suspicion": ranks[order].astype(np.float32),
               "score": on_loss[order], "score_on_output": on_output[order], "loss": losses}  # fmt: skip
    features = {"rank": Value("int64"), "train_index": Value("int64"), "suspicion": Value("float32"),
                "score": Value("float32"), "score_on_output": Value("float32"), "loss": Value("float32")}  # fmt: skip
    if predictions is not None:
        label = next((name for name in LABEL_COLUMNS if name in train.column_names), None)
        columns["prediction"] = predictions
        is_named = label is not None and isinstance(train.features[label], ClassLabel)
        features["prediction"] = train.features[label] if is_named else Value("int64")
    if per_token:
        found = self_influence_tokens(traker, prepared, order)
        columns["tokens"] = [token_names(processor, tokens.train_ids) for tokens in found]
        columns["token_scores"] = [tokens.train_tokens.astype(np.float32).tolist() for tokens in found]
        features["tokens"] = SequenceFeature(Value("string"))
        features["token_scores"] = SequenceFeature(Value("float32"))
    shown = train.select_columns(display_columns(train)).with_format("arrow")[order.tolist()]
    for name in shown.column_names:
        columns[name] = shown.column(name).to_pylist()
        features[name] = train.features[name]
    return Dataset.from_dict(columns, features=Features(features))
