"""How often a two-process gloo launch aborts at exit after gathering its results on the main process.

Each launch (``torchrun --nproc_per_node 2``, CPU) all-reduces a few tensors, gathers an object on
the main process, and the main process then works 0.5 s longer (as a script saving the scores
would) while the other exits at once. Two ways, launched alternately:

* ``gather_object``: accelerate's ``PartialState(cpu=True)`` and ``torch.distributed.gather_object``,
  the process group left alive at exit (``score``/``top_k`` before ``hf_trak.run.processes``): the
  exiting process can abort (SIGABRT, "terminate called without an active exception") and the
  launcher then kills the main process;
* ``hf_trak``: ``hf_trak.run.processes.process_state`` and ``gather_to_main``, the process group
  destroyed at exit.

    python benchmarks/exit_race.py --launches 40

prints the aborted launches of each. A launch takes about 6 s on 2 CPU cores.
"""

import argparse
import subprocess
import sys
import time

from hf_trak.testing.processes import subprocess_env

WAYS = ("gather_object", "hf_trak")


def worker(way: str) -> None:
    """One process of a launch (hf_trak imported first, as a script would)."""
    import torch
    from accelerate import PartialState

    from hf_trak.run.processes import gather_to_main, process_state

    torch.set_num_threads(1)
    state = process_state() if way == "hf_trak" else PartialState(cpu=True)
    for _ in range(20):
        torch.distributed.all_reduce(torch.ones(1000))
    share = {"scores": torch.randn(100, 100).numpy()}
    if way == "hf_trak":
        gather_to_main(state, share)
    else:
        torch.distributed.gather_object(share, [None] * state.num_processes if state.is_main_process else None, dst=0)
    if state.is_main_process:
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=40, help="launches of each way")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    env = subprocess_env()  # this checkout importable, one thread
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    aborted = dict.fromkeys(WAYS, 0)
    for launch in range(args.launches):
        for way in WAYS:
            done = subprocess.run([*command, "--worker", way], env=env, capture_output=True, text=True)
            if done.returncode != 0 and "SIGABRT" not in done.stderr:
                raise RuntimeError(f"a launch of {way} failed otherwise than by an abort:\n{done.stderr[-3000:]}")
            aborted[way] += done.returncode != 0
        counts = ", ".join(f"{way} {count} aborted" for way, count in aborted.items())
        print(f"after {launch + 1} launches of each: {counts}", flush=True)
    print("\n| way | launches | aborted |\n| --- | --- | --- |")
    for way, count in aborted.items():
        print(f"| {way} | {args.launches} | {count} |")


if __name__ == "__main__":
    main()
