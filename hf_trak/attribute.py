"""``hf_trak.attribute``: TRAK scores and each target's top proponents and opponents, in one call.

    result = hf_trak.attribute("my-finetuned-model", train=ds["train"], targets=ds["test"], processor=tokenizer)
    result.scores          # (len(train), len(targets)) numpy, τ(z_target)_i
    result.top_k           # datasets.Dataset: one row per (target, kind, rank), with the train example shown
    result.save_report("report.html")

The model is a model object, a ``save_pretrained`` folder or Hub id, a list of checkpoint
folders (the ensemble TRAK averages over), or a Trainer ``output_dir`` holding
``checkpoint-N`` folders. Splits are raw ``load_dataset`` splits: the processor turns them
into model inputs (``hf_trak.data.processing``); results show the raw columns (text, image, label).
"""

import dataclasses
import logging
from typing import List, Optional

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value

from hf_trak.data.processing import display_columns, prepare_split
from hf_trak.data.streaming import spooled
from hf_trak.errors import check_positive_int
from hf_trak.hf.loading import ModelOrCheckpoints, resolve_model
from hf_trak.method.kernel import merge_top_k
from hf_trak.traker import TRAKer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Attribution:
    """What ``attribute`` returns (on the main process; ``scores``/``top_k`` are None on the others).

    ``scores``: (n_train, n_targets) float32. ``top_k``: a ``datasets.Dataset`` with columns
    ``target`` (row of the target split), ``kind`` ("proponent": largest scores, "opponent":
    smallest), ``rank`` (0 = strongest), ``train_index``, ``score``, the train example's raw
    columns (text, image, label...) and the target's, prefixed ``target_``.
    """

    scores: Optional[np.ndarray]
    top_k: Optional[Dataset]
    traker: TRAKer

    def save_report(self, path: str, num_targets: int = 8, k: Optional[int] = None) -> str:
        """Write the PNG grid (image tasks) or HTML page (text) of ``hf_trak.report``; returns its path."""
        from hf_trak.report import write_report

        return write_report(self.top_k, path, num_targets=num_targets, k=k)


def _extreme_rows(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """(m, k) train rows of the k largest (or smallest) scores of each target, strongest first."""
    return merge_top_k(None, torch.from_numpy(np.ascontiguousarray(scores)), 0, k, largest)[1].T.numpy()


def top_k_dataset(scores: np.ndarray, train: Dataset, targets: Dataset, k: int = 10) -> Dataset:
    """Each target's k proponents and k opponents with their scores and raw columns (see ``Attribution``)."""
    k = min(k, scores.shape[0])
    num_targets = scores.shape[1]
    target_rows, kinds, ranks, train_rows = [], [], [], []
    for kind, rows in (("proponent", _extreme_rows(scores, k, True)), ("opponent", _extreme_rows(scores, k, False))):
        target_rows.append(np.repeat(np.arange(num_targets), k))
        kinds += [kind] * (num_targets * k)
        ranks.append(np.tile(np.arange(k), num_targets))
        train_rows.append(rows.reshape(-1))
    target_rows, ranks, train_rows = map(np.concatenate, (target_rows, ranks, train_rows))
    order = np.lexsort((ranks, np.array(kinds) == "opponent", target_rows))  # per target: proponents, opponents
    target_rows, ranks, train_rows, kinds = target_rows[order], ranks[order], train_rows[order], np.array(kinds)[order]
    columns = {
        "target": target_rows,
        "kind": kinds.tolist(),
        "rank": ranks,
        "train_index": train_rows,
        "score": scores[train_rows, target_rows].astype(np.float32),
    }
    features = Features(
        {"target": Value("int64"), "kind": Value("string"), "rank": Value("int64"), "train_index": Value("int64"),
         "score": Value("float32")}
    )  # fmt: skip
    for split, rows, prefix in ((train, train_rows, ""), (targets, target_rows, "target_")):
        if not display_columns(split):
            continue
        shown = split.select_columns(display_columns(split)).with_format("arrow")[rows.tolist()]
        for name in shown.column_names:
            columns[prefix + name] = shown.column(name).to_pylist()
            features[prefix + name] = split.features[name]
    return Dataset.from_dict(columns, features=features)


def token_names(processor, ids) -> List[str]:
    """The tokens of ``ids`` as the processor's tokenizer writes them (their ids as text without one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(token) for token in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
    return [str(int(i)) for i in ids]


def with_token_scores(top: Dataset, traker: TRAKer, targets: Dataset, processor=None) -> Dataset:
    """``top`` (``top_k_dataset``) with each row's score split by position (``TRAKer.score_tokens``): columns
    ``train_tokens``/``train_token_scores`` (the example's attended tokens and their shares), ``train_pooled``
    (the share of layers without positions), and ``target_tokens``/``target_token_scores``/``target_pooled``.
    ``targets``: the target split's model inputs. Cost: per target, a forward and backward of it and of each of
    its listed train rows, per checkpoint."""
    columns = {name: [None] * len(top) for name in TOKEN_COLUMNS}
    table = top.select_columns(["target", "train_index"]).to_pandas()
    for target, rows in table.groupby("target"):
        found = traker.score_tokens(targets.select([int(target)]), train_rows=rows["train_index"].tolist())
        for position, tokens in zip(rows.index, found):
            values = {
                "train_tokens": token_names(processor, tokens.train_ids),
                "train_token_scores": tokens.train_tokens.astype(np.float32).tolist(),
                "train_pooled": float(tokens.train_pooled),
                "target_tokens": token_names(processor, tokens.target_ids),
                "target_token_scores": tokens.target_tokens.astype(np.float32).tolist(),
                "target_pooled": float(tokens.target_pooled),
            }
            for name, value in values.items():
                columns[name][position] = value
    for name in TOKEN_COLUMNS:
        top = top.add_column(name, columns[name], feature=TOKEN_COLUMNS[name])
    return top


TOKEN_COLUMNS = {
    "train_tokens": Sequence(Value("string")),
    "train_token_scores": Sequence(Value("float32")),
    "train_pooled": Value("float32"),
    "target_tokens": Sequence(Value("string")),
    "target_token_scores": Sequence(Value("float32")),
    "target_pooled": Value("float32"),
}


def attribute(
    model_or_checkpoints: ModelOrCheckpoints,
    train: Dataset,
    targets: Dataset,
    processor=None,
    k: int = 10,
    task=None,
    text_column=None,
    image_column: Optional[str] = None,
    max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    save_dir: Optional[str] = None,
    overwrite: bool = False,
    per_token: bool = False,
    chat_template: bool = False,
    **traker_kwargs,
) -> Attribution:
    """TRAK attribution of ``targets`` to ``train`` (raw splits, processed with ``processor``).

    Featurizes ``train`` at every checkpoint (resumable in ``save_dir``; None: a temporary
    folder; a streamed ``train`` is first read once into ``<save_dir>-rows/train``: ``hf_trak.data.streaming``), scores
    ``targets`` and collects each target's ``k`` proponents and opponents.
    ``processor``: a tokenizer, image processor, multimodal processor or ``batch -> inputs``
    function (None: the splits already hold model inputs). ``per_token``: add each listed row's score split by
    position (``with_token_scores``; a forward and backward per listed row). ``chat_template``: the splits hold
    conversations (a ``messages`` column), rendered by the tokenizer's chat template with the prompts masked
    (``hf_trak.data.chat``). ``traker_kwargs`` go to ``TRAKer``
    (``proj_dim``, ``projector``, ``accelerator``...).
    """
    check_positive_int("k", k)
    model, checkpoints = resolve_model(model_or_checkpoints)
    traker = TRAKer(model, task=task, save_dir=save_dir, **traker_kwargs)

    def prepare(split):
        with traker.state.main_process_first():
            return prepare_split(split, model, traker.task, processor, text_column, image_column, max_length,
                                 chat_template=chat_template)  # fmt: skip

    train = spooled(train, traker.args.stream_dir, save_dir, "train", traker.state, overwrite)  # a stream: on disk
    traker.featurize(prepare(train), checkpoints, batch_size=batch_size, overwrite=overwrite)
    prepared_targets = prepare(targets)
    scores = traker.score(prepared_targets, batch_size=batch_size)
    if scores is None:
        return Attribution(None, None, traker)
    top = top_k_dataset(scores, train, targets, k)
    return Attribution(
        scores, with_token_scores(top, traker, prepared_targets, processor) if per_token else top, traker
    )
