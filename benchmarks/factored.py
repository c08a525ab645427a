"""Per-example projected gradients vs. a training step: dense, factored (Kronecker) and traker.

    python benchmarks/factored.py [--device cpu] [--model bert-small|bert-base|gpt2] [--batch-size 16]

On one model and batch, prints examples/s of: a plain training step (forward + backward of
the summed loss), hf_trak dense (vmap per-example gradients × cached Rademacher matrix),
hf_trak factored (one forward + backward with hooks), and traker 0.3.2 (BasicProjector;
``--no-traker`` to skip), each as a ratio to the training step. All differentiate the same
parameters (Linear and Embedding weights and biases) at the same proj_dim. Steady state:
one warm-up batch, then the mean of ``--repeats`` batches. ``--model gpt2`` featurizes a
random-init GPT-2-small in factored mode and prints its peak memory.
"""

import argparse
import resource
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_trak import TRAKer
from hf_trak.method.factored import factorable_parameter_names
from hf_trak.method.masks import to_4d_attention_mask

MODELS = {
    "bert-small": lambda: BertForSequenceClassification(
        BertConfig(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            num_labels=3,
        )
    ),
    "bert-base": lambda: BertForSequenceClassification(BertConfig(num_labels=3)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config()),
}


def make_batch(model, batch_size: int, seq_len: int, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(model, GPT2LMHeadModel):
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=generator)
    return {name: value.to(device) for name, value in batch.items()}


def timed(step, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def hf_trak_step(model, batch, projector: str, proj_dim: int, grad_wrt, device):
    traker = TRAKer(model, projector=projector, proj_dim=proj_dim, grad_wrt=grad_wrt, save_dir=None, device=device)
    view = traker.feature_map.at(model, 0)
    return lambda: view.features(batch)


def traker_step(model, batch, proj_dim: int, grad_wrt, device):
    from trak import TRAKer as MadryTRAKer
    from trak.projectors import BasicProjector, ProjectionType

    class Logits(torch.nn.Module):
        """What a traker user must hand-write: positional inputs, logits out, and a 4D mask (2D breaks vmap)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, token_type_ids, attention_mask):
            mask = to_4d_attention_mask(attention_mask, "bidirectional", torch.float32)
            return self.model(input_ids=input_ids, attention_mask=mask).logits

    wrapped = Logits().eval()
    names = [f"model.{name}" for name in grad_wrt]
    num_params = sum(dict(wrapped.named_parameters())[name].numel() for name in names)
    projector = BasicProjector(
        grad_dim=num_params,
        proj_dim=proj_dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=device,
        dtype=torch.float32,
    )
    save_dir = tempfile.mkdtemp()
    traker = MadryTRAKer(
        model=wrapped,
        task="text_classification",
        train_set_size=10**6,
        save_dir=save_dir,
        device=device,
        projector=projector,
        proj_dim=proj_dim,
        use_half_precision=False,
        grad_wrt=names,
    )
    traker.load_checkpoint(wrapped.state_dict(), model_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    inputs = (ids, torch.zeros_like(ids), mask, batch["labels"])
    return lambda: traker.featurize(batch=inputs, num_samples=len(ids))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bert-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-traker", action="store_true")
    parser.add_argument("--no-dense", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MODELS[args.model]().to(args.device).eval()
    batch = make_batch(model, args.batch_size, args.seq_len, args.device)
    grad_wrt = factorable_parameter_names(model)
    num_params = sum(dict(model.named_parameters())[name].numel() for name in grad_wrt)
    print(
        f"{args.model}: {num_params / 1e6:.1f}M differentiated parameters, batch {args.batch_size} × "
        f"{args.seq_len} tokens, proj_dim {args.proj_dim}, {args.device}"
    )

    def training_step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    results = {"training step (forward+backward)": timed(training_step, args.repeats)}
    model.zero_grad(set_to_none=True)
    results["hf_trak factored"] = timed(
        hf_trak_step(model, batch, "factored", args.proj_dim, grad_wrt, args.device), args.repeats
    )
    if not args.no_dense:
        results["hf_trak dense"] = timed(
            hf_trak_step(model, batch, "rademacher", args.proj_dim, grad_wrt, args.device), args.repeats
        )
    if not args.no_traker and not isinstance(model, GPT2LMHeadModel):
        results["traker 0.3.2 (BasicProjector)"] = timed(
            traker_step(model, batch, args.proj_dim, grad_wrt, args.device), args.repeats
        )
    baseline = results["training step (forward+backward)"]
    for name, seconds in results.items():
        print(f"{name:34s} {args.batch_size / seconds:9.1f} examples/s   {seconds / baseline:6.2f}x a training step")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak host memory: {peak:.1f} GiB")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
