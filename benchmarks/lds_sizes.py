"""How the factored projector divides k among its matrices, three ways, on the LDS suite.

    python benchmarks/lds_sizes.py [--tasks lm lm_llama] [--proj-dim auto] [--seeds 3] [--models 5] [--threads 2]

hf_trak's default (``hf_trak.method.factored_sizes.filled_sizes``) gives matrix b a share of k proportional to
its size r·c. The two candidates here replace only those sizes; every other setting is the default's:

* ``equal``: every matrix the same share B, or its whole size r·c where that is smaller (water-filling, so the
  shares sum to k); sides split as the default splits them.
* ``spectrum``: by how much of each matrix's gradient spectrum the sizes keep. With F_r and F_c the per-token
  second moments of its two sides (K-FAC's factors, ``FactoredGradientProjector.side_moments``' statistics,
  at the first model on 10% of the train rows, as the principal factors are estimated) and E(k) the share of a
  side's trace in its k leading eigenvalues (for an embedding's one-hot side, its k most frequent ids), the
  matrix keeps about E_r(k_r)·E_c(k_c) of its gradients' energy. Starting from k_r = k_c = 1, each step adds
  the row or column whose gain in that product per feature dimension is largest, over all matrices, until k is
  spent: every matrix weighs the same, as each has its own kernel.

The table gives the mean ± std of the LDS over projector seeds 0..S-1, at K=1 and K=5 (``benchmarks/lds.py``
for the tasks, the ground truth and the LDS).
"""

import argparse
import contextlib
import time
import warnings

import numpy as np
import torch
from lds import ground_truth, lds, trak_scores
from lds_suite import TASKS
from torch import nn

import hf_trak.method.factored as factored
from hf_trak import TRAKer
from hf_trak.data.source import ExampleSource
from hf_trak.method.token_vectors import id_counts, reaching_tokens, side_vectors

SAMPLE_SHARE = 0.1  # of the train rows, evenly spaced (the principal factors' default principal_fraction)


def kept_energy(task, model: nn.Module, proj_dim) -> tuple:
    """(the factored projector's targets, {(weight name, side): E}) where E[k - 1] is the share of the side's per-token
    second moment's trace in its k leading eigenvalues, at ``model`` on ``SAMPLE_SHARE`` of the train rows."""
    traker = TRAKer(task.make_model(0), proj_dim=proj_dim)
    projector = traker.feature_map.projector
    view = traker.feature_map.at(model.state_dict(), 0)
    source = ExampleSource.for_model(task.train, traker.feature_map.model, traker.feature_map.task)
    rows = list(range(0, len(task.train), round(1 / SAMPLE_SHARE)))
    moments = {}
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        batch = view._to_device(source.batch(chunk))
        for use, inputs, delta in projector.captured(view.task, view.weights, view.buffers, batch, len(chunk)):
            if delta is None or use.weight is None:
                continue
            alive = reaching_tokens(delta)
            for side in ("rows", "cols"):
                if isinstance(use.module, nn.Embedding) and side == "rows":  # one-hot ids: the id counts
                    moment = id_counts(use.module, inputs.reshape(-1)[alive]).double()
                else:
                    vectors = side_vectors(use.module, inputs, delta, side)[alive]
                    moment = (vectors.T @ vectors).double()
                key = (use.weight, side)
                moments[key] = moments[key] + moment if key in moments else moment
    energy = {}
    for key, moment in moments.items():
        values = moment if moment.dim() == 1 else torch.linalg.eigvalsh(moment)
        values = values.clamp(min=0).sort(descending=True).values
        energy[key] = (values.cumsum(0) / values.sum().clamp(min=1e-300)).numpy()
    return projector.targets, energy


def spectrum_sizes(targets, energy: dict, proj_dim: int) -> dict:
    """{weight name: [k_r, k_c]}: greedy steps of largest gain in E_r(k_r)·E_c(k_c) per dimension (see the module's
    docstring)."""

    def kept(name, side, k):
        curve = energy[(name, side)]
        return 1.0 if k >= len(curve) else float(curve[k - 1])

    sizes = {t.name: [1, 1] for t in targets}
    used = len(targets)
    while True:
        best = None  # (gain per dimension, name, side index, cost)
        for t in targets:
            k_rows, k_cols = sizes[t.name]
            rows, cols = kept(t.name, "rows", k_rows), kept(t.name, "cols", k_cols)
            if k_rows < t.rows and used + k_cols <= proj_dim:
                gain = (kept(t.name, "rows", k_rows + 1) - rows) * cols / k_cols
                best = max(best, (gain, t.name, 0, k_cols)) if best else (gain, t.name, 0, k_cols)
            if k_cols < t.cols and used + k_rows <= proj_dim:
                gain = rows * (kept(t.name, "cols", k_cols + 1) - cols) / k_rows
                best = max(best, (gain, t.name, 1, k_rows)) if best else (gain, t.name, 1, k_rows)
        if best is None:
            return sizes
        sizes[best[1]][best[2]] += 1
        used += best[3]


def equal_sizes(targets, proj_dim: int, square: bool) -> dict:
    """{weight name: [k_r, k_c]}: each matrix min(r·c, B), B by water-filling from the smallest matrix up."""
    sizes, left = {}, proj_dim
    ordered = sorted(targets, key=lambda t: t.rows * t.cols)
    for index, t in enumerate(ordered):
        budget = min(t.rows * t.cols, left / (len(ordered) - index))
        k_rows = int(np.sqrt(budget if square else budget * t.rows / t.cols))
        k_rows = max(1, min(t.rows, k_rows, int(budget)))
        k_cols = max(1, min(t.cols, int(budget // k_rows)))
        sizes[t.name] = [k_rows, k_cols]
        left -= k_rows * k_cols
    return sizes


@contextlib.contextmanager
def given_sizes(sizes: dict):
    """The factored projectors made inside take ``sizes`` instead of ``filled_sizes``' (no dense fallback block)."""

    def take(targets, proj_dim, fallback_numel, square):
        if fallback_numel is not None:
            raise ValueError("given sizes cover the factored matrices only, and this model has a fallback block")
        for target in targets:
            target.k_rows, target.k_cols = sizes[target.name]
        return 0

    original = factored.filled_sizes
    factored.filled_sizes = take
    try:
        yield
    finally:
        factored.filled_sizes = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["lm", "lm_llama"], choices=list(TASKS))
    parser.add_argument("--proj-dim", type=lambda text: text if text == "auto" else int(text), default="auto")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for name in args.tasks:
        task = TASKS[name]()
        masks, outputs = ground_truth(name)
        models = [task.train_model(seed) for seed in range(args.models)]
        default = TRAKer(task.make_model(0), proj_dim=args.proj_dim)
        k, square = default.config.proj_dim, default.feature_map.projector.sizing == "square"
        targets, energy = kept_energy(task, models[0], k)
        candidates = {"by size (default)": None, "equal": equal_sizes(targets, k, square),
                      "spectrum": spectrum_sizes(targets, energy, k)}  # fmt: skip
        for way, sizes in candidates.items():
            for count in sorted({1, args.models}):
                values, started = [], time.perf_counter()
                for seed in range(args.seeds):
                    with given_sizes(sizes) if sizes else contextlib.nullcontext():
                        scores = trak_scores(task, models[:count], k, estimator="hf_trak", seed=seed)
                    values.append(lds(scores, masks, outputs.mean(0)).mean)
                seconds = (time.perf_counter() - started) / args.seeds
                print(f"{name} k={k} {way} K={count}: {np.mean(values):.3f} ± {np.std(values):.3f}", flush=True)
                rows.append((name, k, way, count, np.mean(values), np.std(values), seconds))
    print("\n| task | k | sizes | K | LDS ± std (seeds) | seconds per run |\n| --- | --- | --- | --- | --- | --- |")
    for name, k, way, count, value, spread, seconds in rows:
        print(f"| {name} | {k} | {way} | {count} | {value:.3f} ± {spread:.3f} ({args.seeds}) | {seconds:.1f} |")


if __name__ == "__main__":
    main()
