"""``hf-trak``: featurize, score, top-k, report, push and demo from the command line.

    hf-trak featurize --model out/ --dataset imdb --save-dir imdb-trak --proj-dim 2048
    hf-trak score     --save-dir imdb-trak --dataset imdb --target-split test --output scores.npy
    hf-trak top-k     --save-dir imdb-trak --dataset imdb --target-split test --k 10 --output top_k --report r.html
    hf-trak report    --top-k top_k --output report.html
    hf-trak push      --save-dir imdb-trak --repo-id me/imdb-trak
    hf-trak score     --from-hub someone/imdb-trak --model someone/imdb-bert --dataset imdb
    hf-trak explore   --store imdb-trak --train-dataset imdb           (a Gradio app: pip install 'hf_trak[app]')
    hf-trak demo

The arguments mirror the Python API: ``--model`` is what ``hf_trak.attribute`` takes (a
folder, a Hub id or a Trainer ``output_dir`` of ``checkpoint-N`` folders), ``--dataset``
what ``load_dataset`` takes (or a ``save_to_disk`` folder), ``--processor`` defaults to the
one saved with the model. Errors are printed as one line, ``hf-trak: error: ...``, with exit
status 2 for usage (a bad option or setting) and 1 for a failure (bad input, a store that
does not match, an output that exists, the Hub); ``--debug`` (or ``HF_TRAK_DEBUG=1``) shows
the traceback instead. Outputs are checked before any work and never overwritten unless
``--overwrite`` is given.
"""

import argparse
import logging
import os
import sys
from typing import List, Optional

from hf_trak.arguments import FEATURIZE_SCOPES, TRAKArguments, add_arguments, parsed_settings
from hf_trak.errors import InvalidArgumentError, OutputExistsError, OutputNotWritableError
from hf_trak.store.files import check_output

logger = logging.getLogger("hf_trak")

DEBUG_VARIABLE = "HF_TRAK_DEBUG"
# score and top-k read the store's settings; they take the run settings, and the task to build f.
SCORE_SCOPES, SCORE_NAMES = ("run",), ("task",)


# ----------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _positive(text, int, "integer")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _positive(text, float, "number")


def _positive(text: str, kind, noun: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}")
    return value


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", "--train-dataset", dest="dataset", required=True,
                       help="load_dataset name or path, or a save_to_disk folder")  # fmt: skip
    group.add_argument("--dataset-config", default=None, help="load_dataset configuration name")
    group.add_argument("--data-files", nargs="+", default=None, help="load_dataset data_files")
    group.add_argument("--train-split", default="train")
    group.add_argument("--target-split", default="test")
    group.add_argument("--max-train-examples", type=positive_int, default=None, help="use the first N train examples")
    group.add_argument("--max-target-examples", type=positive_int, default=None, help="use the first N targets")
    group.add_argument("--text-column", nargs="+", default=None, help="text column(s) (default: the string ones)")
    group.add_argument("--image-column", default=None, help="image column (default: the Image one)")
    group.add_argument("--max-length", type=positive_int, default=None, help="tokenizer truncation length")


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=required,
        default=None,
        help="save_pretrained folder, Hub id, or Trainer output_dir (its checkpoint-N folders are the checkpoints)",
    )
    group.add_argument(
        "--base-model", default=None, help="base model of a PEFT adapter --model (default: its adapter_config's)"
    )
    group.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint folders (default: from --model)")
    group.add_argument("--processor", default=None, help="tokenizer/processor folder or Hub id (default: --model's)")
    group.add_argument("--no-processor", action="store_true", help="the dataset already holds model inputs")


def _add_features_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save-dir", help="a feature store written by featurize")
    group.add_argument("--from-hub", metavar="REPO_ID", help="a features repo pushed with push")


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line, ``hf-trak: error: ...`` (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"hf-trak: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hf-trak", description="TRAK data attribution for Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    featurize = commands.add_parser("featurize", help="project per-example gradients of the train split")
    _add_model_arguments(featurize, required=True)
    _add_data_arguments(featurize)
    add_arguments(featurize, FEATURIZE_SCOPES)

    for name, help_text in (
        ("score", "TRAK scores of the target split (saved in the store, or --output .npy)"),
        ("top-k", "each target's top proponents and opponents, as a datasets folder"),
    ):
        command = commands.add_parser(name, help=help_text)
        _add_features_arguments(command)
        _add_model_arguments(command, required=False)
        _add_data_arguments(command)
        add_arguments(command, SCORE_SCOPES, SCORE_NAMES)
        command.add_argument(
            "--train-subset", action="store_true",
            help="the train split is a subset of the featurized rows (e.g. --max-train-examples): score those",
        )  # fmt: skip
        command.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
        if name == "score":
            command.add_argument("--output", default=None, help="also write the scores to this .npy file")
            command.add_argument("--name", default=None, help="name in the store (default: the target split)")
        else:
            command.add_argument("--k", type=positive_int, default=10)
            command.add_argument("--output", required=True, help="folder for the top-k dataset (save_to_disk)")
            command.add_argument("--report", default=None, help="also write a report (.png or .html)")

    report = commands.add_parser("report", help="PNG grid (images) or HTML page (text) of a top-k dataset")
    report.add_argument("--top-k", required=True, help="a folder written by hf-trak top-k")
    report.add_argument("--output", required=True, help="report.png or report.html")
    report.add_argument("--num-targets", type=positive_int, default=8)
    report.add_argument("--k", type=positive_int, default=None, help="show the first k of each (default: all)")
    report.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    explore = commands.add_parser("explore", help="browse targets' proponents and opponents in a Gradio app")
    stores = explore.add_mutually_exclusive_group(required=True)
    stores.add_argument("--store", "--save-dir", dest="save_dir", help="a feature store written by featurize")
    stores.add_argument("--from-hub", metavar="REPO_ID", help="a features repo pushed with push")
    _add_model_arguments(explore, required=False)
    _add_data_arguments(explore)
    explore.add_argument("--k", type=positive_int, default=10, help="proponents and opponents shown")
    explore.add_argument(
        "--index", default=None,
        help="query a faiss index: 'exact', or a faiss factory string such as IVF1024,Flat (approximate); "
        "default: exact scores read from the store",
    )  # fmt: skip
    explore.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1; 0.0.0.0: all)")
    explore.add_argument("--port", type=positive_int, default=None, help="port (default: Gradio's, 7860 up)")
    explore.add_argument(
        "--train-subset",
        action="store_true",
        help="the train split is a subset of the featurized one (its rows are matched to the store's)",
    )
    explore.add_argument(
        "--max-upload-mb", type=positive_float, default=10.0, help="uploads over this size are refused"
    )

    push = commands.add_parser("push", help="upload a feature store as a Hub dataset repo")
    push.add_argument("--save-dir", required=True)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--revision", default=None)

    demo = commands.add_parser("demo", help="train a small ViT on digits with TRAKHFTrainer and attribute it")
    demo.add_argument("--output-dir", default="trak_demo")
    demo.add_argument("--num-subsets", type=positive_int, default=24, help="retrained models for the LDS figure")
    return parser


# ----------------------------------------------------------------------------- loading
def load_split(args, split: str, limit: Optional[int]):
    """One split of ``--dataset`` (load_dataset, or a save_to_disk folder), its first ``limit`` rows."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from hf_trak.hf.loading import local_or_hub

    local_or_hub(args.dataset, "dataset")
    if os.path.isdir(args.dataset) and os.path.exists(os.path.join(args.dataset, "dataset_dict.json")):
        splits = load_from_disk(args.dataset)
        if split not in splits:
            raise InvalidArgumentError(f"{args.dataset} has no split {split!r} (splits: {list(splits)}).")
        data = splits[split]
    else:
        data = load_dataset(args.dataset, args.dataset_config, data_files=args.data_files, split=split)
        if isinstance(data, DatasetDict):
            data = data[split]
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def _processor(args, model: Optional[str]):
    """``--processor``, else the one saved with the model (None with ``--no-processor``)."""
    from hf_trak.hf.loading import processor_for

    return None if args.no_processor else processor_for(model, args.processor, args.base_model)


def _text_column(args):
    """``--text-column``: one name, a pair, or None."""
    return args.text_column[0] if args.text_column and len(args.text_column) == 1 else args.text_column


def _prepared_split(args, model, task, processor, split: str, limit: Optional[int]):
    """``(raw split, model inputs)`` of one split of ``--dataset``."""
    from hf_trak.data.processing import prepare_split

    raw = load_split(args, split, limit)
    return raw, prepare_split(raw, model, task, processor, _text_column(args), args.image_column, args.max_length)


def _target_scores(args):
    """``(scores, TRAKer, raw train split, raw target split)`` against the features of ``--save-dir``
    or ``--from-hub``; scores are None on processes other than the main one."""
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
    task, processor = AutoModelOutput.resolve(model, args.task), _processor(args, model_path)
    train, prepared = _prepared_split(args, model, task, processor, args.train_split, args.max_train_examples)
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
    raw_targets, targets = _prepared_split(args, model, task, processor, args.target_split, args.max_target_examples)
    return traker.score(targets), traker, train, raw_targets


# ----------------------------------------------------------------------------- commands
def featurize(args) -> None:
    from hf_trak.hf.loading import resolve_model
    from hf_trak.traker import TRAKer

    settings = TRAKArguments(**parsed_settings(args, FEATURIZE_SCOPES))  # checked before anything is loaded
    if settings.save_dir is None:
        raise InvalidArgumentError("featurize writes a feature store: pass --save-dir.")
    model, checkpoints = resolve_model(args.model, args.base_model)
    traker = TRAKer(model, args=settings)
    processor = _processor(args, args.model)
    _, train = _prepared_split(args, model, traker.task, processor, args.train_split, args.max_train_examples)
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
    scores, traker, _, _ = _target_scores(args)
    if scores is None:
        return
    if args.output:
        print(f"Scores {scores.shape} written to {save_npy(args.output, scores)}")
    if in_store:
        path = traker.save_scores(scores, args.name or args.target_split, overwrite=args.overwrite)
        print(f"Scores {scores.shape} saved to {path}")


def top_k(args) -> None:
    from hf_trak.attribute import top_k_dataset
    from hf_trak.report import check_report_path, write_report
    from hf_trak.store.files import atomic_folder

    check_output(args.output, args.overwrite)
    if args.report:
        check_report_path(args.report)
        check_output(args.report, args.overwrite, option="--report")
    scores, _, train, raw_targets = _target_scores(args)
    if scores is None:
        return
    top = top_k_dataset(scores, train, raw_targets, args.k)
    atomic_folder(args.output, top.save_to_disk, overwrite=args.overwrite)
    print(f"Top-{args.k} proponents and opponents of {scores.shape[1]} targets written to {args.output}")
    if args.report:
        print(f"Report written to {write_report(top, args.report)}")


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
        text_column=_text_column(args), image_column_name=args.image_column, max_length=args.max_length,
    )  # fmt: skip
    blocks = serve(ExplorerApp(explorer).blocks, block=False, quiet=True, server_name=args.host, server_port=args.port,
                   max_upload_mb=args.max_upload_mb)  # fmt: skip
    print(f"hf_trak explorer running on {blocks.local_url} (Ctrl+C stops it)", flush=True)
    blocks.block_thread()


def demo(args) -> None:
    from hf_trak.demo.pipeline import run_demo

    run_demo(args.output_dir, num_subsets=args.num_subsets)


COMMANDS = {
    "featurize": featurize,
    "score": score,
    "top-k": top_k,
    "report": report,
    "explore": explore,
    "push": push,
    "demo": demo,
}


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        COMMANDS[args.command](args)
    except Exception as error:  # one line for every failure; the traceback on request
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(2 if isinstance(error, InvalidArgumentError) else 1, f"hf-trak: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
