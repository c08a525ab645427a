"""``hf-trak check``: the checks of ``hf_trak.check`` on a Trainer's ``output_dir``, from the command line.

The run is read back from the folder ``TRAKHFTrainer`` (or ``Trainer`` with ``TRAKCallback``) wrote: its
``checkpoint-N`` folders (the model, and the ``TrainingArguments`` the last one saved), the store in ``trak/``
and the starting weights (``trak_initial_weights.safetensors``).
"""

import os

from hf_trak.cli.loading import loaded_traker, prepared_split
from hf_trak.errors import InvalidArgumentError, NotFoundError
from hf_trak.store.files import check_output


def training_arguments(output_dir: str):
    """The ``TrainingArguments`` the last ``checkpoint-N`` of ``output_dir`` saved (``training_args.bin``)."""
    import torch

    from hf_trak.hf.loading import trainer_checkpoints

    folders = trainer_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    path = os.path.join(folders[-1], "training_args.bin") if folders else None
    if path is None or not os.path.isfile(path):
        raise NotFoundError(
            f"{output_dir} holds no checkpoint-N folder with training_args.bin: pass the output_dir of a Trainer run "
            "that saved checkpoints."
        )
    return torch.load(path, weights_only=False)  # the Trainer's own pickle of its arguments


def check(args) -> None:
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

    from hf_trak.check.counterfactual import check_counterfactual
    from hf_trak.check.lds_check import check_lds
    from hf_trak.check.report import write_check_report
    from hf_trak.check.retraining import Retrainer
    from hf_trak.trainer import INITIAL_WEIGHTS_NAME, model_from_initial_weights

    if args.report:
        if not args.report.endswith((".html", ".htm")):
            raise InvalidArgumentError(f"The check's report is an HTML page: {args.report!r} must end in .html.")
        check_output(args.report, args.overwrite, option="--report")
    training_args = training_arguments(args.output_dir)
    args.save_dir, args.from_hub = args.save_dir or os.path.join(args.output_dir, "trak"), None
    args.model, args.train_subset = args.model or args.output_dir, False
    traker, _, train, processor = loaded_traker(args)
    _, targets = prepared_split(args, traker.model, traker.task, processor, args.target_split,
                                args.max_target_examples)  # fmt: skip
    initial = model_from_initial_weights(traker.model, os.path.join(args.output_dir, INITIAL_WEIGHTS_NAME))
    collator = DataCollatorWithPadding(processor) if isinstance(processor, PreTrainedTokenizerBase) else None
    folder = args.folder or os.path.join(args.output_dir, "trak_check")
    retrainer = Retrainer(initial, training_args, train, targets, folder, data_collator=collator, task=traker.task,
                          max_steps=args.max_steps)  # fmt: skip
    scores = traker.score(targets)
    lds = counterfactual = None
    if args.num_subsets:
        lds = check_lds(scores, retrainer, args.num_subsets, args.fraction, seed=training_args.seed)
        print(lds)
    if args.counterfactual:
        counterfactual = check_counterfactual(scores, retrainer, args.counterfactual, args.k, args.seeds,
                                              seed=training_args.seed)  # fmt: skip
        print(counterfactual)
    if args.report:
        print(f"Report written to {write_check_report(args.report, lds, counterfactual)}")
