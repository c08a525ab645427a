"""What each ``hf-trak`` sub-command does, given its parsed arguments (imports are deferred: ``--help`` stays fast)."""

import logging
import os

from hf_trak.arguments import FEATURIZE_SCOPES, TRAKArguments, parsed_settings
from hf_trak.cli.loading import load_split, loaded_traker, prepared_split, processor_of, target_scores, text_column
from hf_trak.errors import InvalidArgumentError, OutputExistsError, OutputNotWritableError
from hf_trak.store.files import check_output

logger = logging.getLogger("hf_trak")


def featurize(args) -> None:
    from hf_trak.hf.loading import resolve_model
    from hf_trak.traker import TRAKer

    settings = TRAKArguments(**parsed_settings(args, FEATURIZE_SCOPES))  # checked before anything is loaded
    if settings.save_dir is None:
        raise InvalidArgumentError("featurize writes a feature store: pass --save-dir.")
    model, checkpoints = resolve_model(args.model, args.base_model)
    traker = TRAKer(model, args=settings)
    processor = processor_of(args, args.model)
    _, train = prepared_split(args, model, traker.task, processor, args.train_split, args.max_train_examples)
    traker.featurize(train, args.checkpoints or checkpoints)
    if traker.state.is_main_process:
        print(f"Featurized {len(train)} examples at {len(traker.checkpoints)} checkpoint(s) into {args.save_dir}")


def _npy_path(path: str) -> str:
    return path if path.endswith(".npy") else path + ".npy"


def score(args) -> None:
    from hf_trak.store.feature_store import FeatureStore
    from hf_trak.store.files import save_npy
    from hf_trak.store.saved_scores import scores_path

    in_store = bool(args.save_dir) and not args.train_subset  # a subset's scores are not the store's rows
    if args.output:
        check_output(_npy_path(args.output), args.overwrite)
    if in_store:
        FeatureStore.load(args.save_dir)  # a store is there
        path = scores_path(args.save_dir, args.name or args.target_split)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            check_output(path, args.overwrite, option="--name (scores in the store)")
        except (PermissionError, FileExistsError, NotADirectoryError, FileNotFoundError) as error:
            if isinstance(error, OutputExistsError):
                raise
            raise OutputNotWritableError(
                f"Cannot write scores into {args.save_dir} ({error}): pass --output scores.npy to write them "
                "elsewhere, or make the store writable."
            ) from error
    elif not args.output:
        raise InvalidArgumentError("Pass --output scores.npy: these scores cannot be kept in the store.")
    scores, traker, *_ = target_scores(args)
    if scores is None:
        return
    if args.output:
        print(f"Scores {scores.shape} written to {save_npy(args.output, scores)}")
    if in_store:
        path = traker.save_scores(scores, args.name or args.target_split, overwrite=args.overwrite)
        print(f"Scores {scores.shape} saved to {path}")


def top_k(args) -> None:
    from hf_trak.attribute import top_k_dataset, with_token_scores
    from hf_trak.report import check_report_path, write_report
    from hf_trak.store.files import atomic_folder

    check_output(args.output, args.overwrite)
    if args.report:
        check_report_path(args.report)
        check_output(args.report, args.overwrite, option="--report")
    scores, traker, train, raw_targets, targets, processor = target_scores(args)
    if scores is None:
        return
    top = top_k_dataset(scores, train, raw_targets, args.k)
    if args.per_token:
        top = with_token_scores(top, traker, targets, processor)
    atomic_folder(args.output, top.save_to_disk, overwrite=args.overwrite)
    print(f"Top-{args.k} proponents and opponents of {scores.shape[1]} targets written to {args.output}")
    if args.report:
        print(f"Report written to {write_report(top, args.report)}")


def self_influence(args) -> None:
    from hf_trak.report import check_report_path, write_self_influence_report
    from hf_trak.self_influence import self_influence_dataset
    from hf_trak.store.files import atomic_folder

    if args.output:
        check_output(args.output, args.overwrite)
    if args.report:
        check_report_path(args.report)
        check_output(args.report, args.overwrite, option="--report")
    if not args.output and not args.report:
        raise InvalidArgumentError("Pass --report report.html (or .png) and/or --output FOLDER for the ranking.")
    traker, train, prepared, processor = loaded_traker(args)
    if not traker.state.is_main_process:
        return
    ranking = self_influence_dataset(
        traker, train, prepared, k=args.top, per_token=args.per_token, processor=processor
    )
    print(f"The {len(ranking)} most suspect train examples (of {len(prepared)}), by self-influence:")
    for row in ranking.select(range(min(10, len(ranking)))):
        print(f"  #{row['train_index']}: suspicion {row['suspicion']:.3f}, score {row['score']:+.4f}, "
              f"loss {row['loss']:.3f}")  # fmt: skip
    if args.output:
        atomic_folder(args.output, ranking.save_to_disk, overwrite=args.overwrite)
        print(f"Ranking written to {args.output}")
    if args.report:
        print(f"Report written to {write_self_influence_report(ranking, args.report)}")


def report(args) -> None:
    from datasets import load_from_disk

    from hf_trak.report import check_report_path, write_report

    check_report_path(args.output)
    check_output(args.output, args.overwrite)
    path = write_report(load_from_disk(args.top_k), args.output, num_targets=args.num_targets, k=args.k)
    print(f"Report written to {path}")


def push(args) -> None:
    from hf_trak.store.feature_store import FeatureStore
    from hf_trak.store.hub import push_store

    url = push_store(FeatureStore.load(args.save_dir), args.repo_id, private=args.private or None, token=args.token,
                     revision=args.revision)  # fmt: skip
    print(f"Pushed {args.save_dir} to {url}")


def explore(args) -> None:
    from hf_trak.explore.app import ExplorerApp, require_gradio, serve
    from hf_trak.explore.explorer import Explorer

    require_gradio()  # before any loading
    if args.chat_template:
        raise InvalidArgumentError("The explorer takes text targets, not conversations: leave out --chat-template.")
    train = load_split(args, args.train_split, args.max_train_examples)
    try:
        targets = load_split(args, args.target_split, args.max_target_examples)
    except (ValueError, KeyError) as error:  # a dataset without that split: new inputs only
        logger.warning("No target split %r (%s): targets are new inputs and train rows.", args.target_split, error)
        targets = None
    processor = None if args.no_processor else (args.processor or "auto")
    # A missing store, or one that does not match the model or split, fails here: one line, exit 1, nothing served.
    explorer = Explorer.from_store(
        args.save_dir or args.from_hub, train, model=args.model, processor=processor, targets=targets,
        checkpoints=args.checkpoints, index=args.index, k=args.k, base_model=args.base_model,
        train_subset=args.train_subset,
        text_column=text_column(args), image_column_name=args.image_column, max_length=args.max_length,
    )  # fmt: skip
    blocks = serve(ExplorerApp(explorer).blocks, block=False, quiet=True, server_name=args.host, server_port=args.port,
                   max_upload_mb=args.max_upload_mb)  # fmt: skip
    print(f"hf_trak explorer running on {blocks.local_url} (Ctrl+C stops it)", flush=True)
    blocks.block_thread()


def demo(args) -> None:
    from hf_trak.demo.pipeline import run_demo

    run_demo(args.output_dir, num_subsets=args.num_subsets)
