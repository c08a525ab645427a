"""``hf-trak``: featurize, score, top-k, report, push and demo from the command line.

    hf-trak featurize --model out/ --dataset imdb --save-dir imdb-trak --proj-dim 2048
    hf-trak score     --save-dir imdb-trak --dataset imdb --target-split test --output scores.npy
    hf-trak top-k     --save-dir imdb-trak --dataset imdb --target-split test --k 10 --output top_k --report r.html
    hf-trak report    --top-k top_k --output report.html
    hf-trak self-influence --save-dir imdb-trak --dataset imdb --top 50 --report self.html
    hf-trak check     --output-dir out --dataset imdb --num-subsets 32 --counterfactual 0 1 2 --report check.html
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

import logging
import os
from typing import List, Optional

from hf_trak.cli import checks, commands
from hf_trak.cli.parser import DEBUG_VARIABLE, SCORE_NAMES, SCORE_SCOPES, build_parser
from hf_trak.errors import InvalidArgumentError

__all__ = ["main", "build_parser", "SCORE_SCOPES", "SCORE_NAMES", "DEBUG_VARIABLE", "COMMANDS"]

COMMANDS = {
    "featurize": commands.featurize,
    "score": commands.score,
    "top-k": commands.top_k,
    "self-influence": commands.self_influence,
    "check": checks.check,
    "report": commands.report,
    "explore": commands.explore,
    "push": commands.push,
    "demo": commands.demo,
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
