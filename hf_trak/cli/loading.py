"""Splits, processors and stores named on the command line, loaded as the Python API loads them."""

import os
from typing import Optional

from hf_trak.arguments import parsed_settings
from hf_trak.cli.parser import SCORE_SCOPES
from hf_trak.errors import InvalidArgumentError


def load_split(args, split: str, limit: Optional[int]):
    """One split of ``--dataset`` (load_dataset, or a save_to_disk folder), its first ``limit`` rows; with
    ``--streaming``, read once from the stream into ``--stream-dir`` (``hf_trak.data.streaming``)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from hf_trak.hf.loading import local_or_hub

    local_or_hub(args.dataset, "dataset")
    if os.path.isdir(args.dataset) and os.path.exists(os.path.join(args.dataset, "dataset_dict.json")):
        splits = load_from_disk(args.dataset)
        if split not in splits:
            raise InvalidArgumentError(f"{args.dataset} has no split {split!r} (splits: {list(splits)}).")
        data = splits[split]
    elif args.streaming:  # read once into <stream-dir>/<split>, resumably; the first rows: take(limit)
        from hf_trak.data.streaming import spooled
        from hf_trak.run.processes import process_state

        data = load_dataset(args.dataset, args.dataset_config, data_files=args.data_files, split=split, streaming=True)
        data = data.take(limit) if limit is not None else data
        return spooled(data, args.stream_dir, args.save_dir, split, process_state())
    else:
        data = load_dataset(args.dataset, args.dataset_config, data_files=args.data_files, split=split)
        if isinstance(data, DatasetDict):
            data = data[split]
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def processor_of(args, model: Optional[str]):
    """``--processor``, else the one saved with the model (None with ``--no-processor``)."""
    from hf_trak.hf.loading import processor_for

    return None if args.no_processor else processor_for(model, args.processor, args.base_model)


def text_column(args):
    """``--text-column``: one name, a pair, or None."""
    return args.text_column[0] if args.text_column and len(args.text_column) == 1 else args.text_column


def prepared_split(args, model, task, processor, split: str, limit: Optional[int]):
    """``(raw split, model inputs)`` of one split of ``--dataset``."""
    from hf_trak.data.processing import prepare_split

    raw = load_split(args, split, limit)
    return raw, prepare_split(raw, model, task, processor, text_column(args), args.image_column, args.max_length,
                              chat_template=args.chat_template)  # fmt: skip


def loaded_traker(args):
    """``(TRAKer, raw train split, its model inputs, processor)`` against the features of ``--save-dir`` or
    ``--from-hub``, with the train split checked row by row against the store."""
    from hf_trak.hf.loading import resolve_store_model
    from hf_trak.method.model_outputs import AutoModelOutput
    from hf_trak.store.feature_store import FeatureStore
    from hf_trak.store.hub import download_store
    from hf_trak.traker import TRAKer

    save_dir = args.save_dir or download_store(args.from_hub)
    stored = FeatureStore.load(save_dir).config
    model, model_path, checkpoints = resolve_store_model(stored, args.model, args.base_model, save_dir)
    if args.checkpoints:
        checkpoints = args.checkpoints
    task, processor = AutoModelOutput.resolve(model, args.task), processor_of(args, model_path)
    train, prepared = prepared_split(args, model, task, processor, args.train_split, args.max_train_examples)
    settings = parsed_settings(args, SCORE_SCOPES)
    traker = TRAKer.from_pretrained(
        save_dir,
        model,
        checkpoints=checkpoints,
        task=task,
        train_dataset=prepared,
        train_subset=args.train_subset,
        **settings,
    )
    return traker, train, prepared, processor


def target_scores(args):
    """``(scores, TRAKer, raw train split, raw target split, the targets' model inputs, processor)`` of
    ``--target-split``; scores are None on processes other than the main one."""
    traker, train, _, processor = loaded_traker(args)
    raw_targets, targets = prepared_split(args, traker.model, traker.task, processor, args.target_split,
                                           args.max_target_examples)  # fmt: skip
    return traker.score(targets), traker, train, raw_targets, targets, processor
