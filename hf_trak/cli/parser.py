"""The ``hf-trak`` argument parser: one sub-command per step, options named like the Python API's arguments."""

import argparse

from hf_trak.arguments import FEATURIZE_SCOPES, add_arguments

DEBUG_VARIABLE = "HF_TRAK_DEBUG"
# score and top-k read the store's settings; they take the run settings, and the task to build f.
SCORE_SCOPES, SCORE_NAMES = ("run",), ("task",)


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
    group.add_argument(
        "--streaming", action="store_true",
        help="load_dataset(..., streaming=True): each split is read once, resumably, into <stream-dir>/<split> "
        "(default <save-dir>-rows), the first --max-*-examples rows only",
    )  # fmt: skip
    group.add_argument("--train-split", default="train")
    group.add_argument("--target-split", default="test")
    group.add_argument("--max-train-examples", type=positive_int, default=None, help="use the first N train examples")
    group.add_argument("--max-target-examples", type=positive_int, default=None, help="use the first N targets")
    group.add_argument("--text-column", nargs="+", default=None, help="text column(s) (default: the string ones)")
    group.add_argument("--image-column", default=None, help="image column (default: the Image one)")
    group.add_argument("--max-length", type=positive_int, default=None, help="tokenizer truncation length")
    group.add_argument(
        "--chat-template", action="store_true",
        help="the splits hold conversations (a messages column, or --text-column): apply the tokenizer's chat "
        "template and attribute the assistant responses only (prompt tokens get labels -100)",
    )  # fmt: skip


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
            command.add_argument(
                "--per-token", action="store_true",
                help="split each listed score over the train example's tokens and the target's (columns "
                "train_tokens, train_token_scores...; the HTML report shades them): a forward and backward per row",
            )  # fmt: skip

    ranking = commands.add_parser(
        "self-influence", help="the most suspect train examples by self-influence (mislabeled, outlying, rare)"
    )
    _add_features_arguments(ranking)
    _add_model_arguments(ranking, required=False)
    _add_data_arguments(ranking)
    add_arguments(ranking, SCORE_SCOPES, SCORE_NAMES)
    ranking.add_argument("--train-subset", action="store_true",
                         help="the train split is a subset of the featurized rows: rank those")  # fmt: skip
    ranking.add_argument("--top", type=positive_int, default=50, help="how many examples to list")
    ranking.add_argument("--output", default=None, help="folder for the ranking as a dataset (save_to_disk)")
    ranking.add_argument("--report", default=None, help="a report of the ranking (.png: images, .html: any)")
    ranking.add_argument("--per-token", action="store_true",
                         help="split each listed self-influence over its tokens (the report shades them)")  # fmt: skip
    ranking.add_argument("--overwrite", action="store_true", help="replace outputs that exist")

    checking = commands.add_parser(
        "check", help="retrain a Trainer run on subsets: LDS of its attributions, and a counterfactual check"
    )
    checking.add_argument("--output-dir", required=True, help="the Trainer's output_dir (checkpoints, trak/)")
    checking.add_argument("--save-dir", default=None, help="the feature store (default: OUTPUT_DIR/trak)")
    _add_model_arguments(checking, required=False)
    _add_data_arguments(checking)
    add_arguments(checking, SCORE_SCOPES, SCORE_NAMES)
    checking.add_argument("--num-subsets", type=int, default=32, help="retrained models for the LDS (0: no LDS)")
    checking.add_argument("--fraction", type=float, default=0.5, help="share of the train split each one sees")
    checking.add_argument("--max-steps", type=positive_int, default=None, help="cap each retraining at N steps")
    checking.add_argument("--counterfactual", nargs="+", type=int, default=None, metavar="TARGET",
                          help="target rows for the counterfactual check (remove their top-k proponents)")  # fmt: skip
    checking.add_argument("--k", type=positive_int, default=10, help="proponents removed per target")
    checking.add_argument("--seeds", type=positive_int, default=3, help="seeds of each counterfactual retraining")
    checking.add_argument("--folder", default=None, help="where retrained models' outputs are kept (resumable)")
    checking.add_argument("--report", default=None, help="an HTML page of the results")
    checking.add_argument("--overwrite", action="store_true", help="replace --report if it exists")

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
    explore.add_argument("--stream-dir", default=None, help="with --streaming: where the splits' rows are kept")
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
