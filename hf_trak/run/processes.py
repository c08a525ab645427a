"""The processes hf_trak runs in: accelerate's process state, its clean end, and results gathered on the main one.

A launch (``torchrun``, ``accelerate launch``: WORLD_SIZE > 1) is split with accelerate's
``PartialState`` (``featurize``, ``scoring``). Once it runs in several processes, hf_trak destroys
their ``torch.distributed`` process group at exit (``atexit``, while the interpreter is whole), as
``Accelerator.end_training()`` would: otherwise gloo's worker threads outlive the interpreter, and
one that drops a tensor owned by a Python object after it is torn down aborts the process (SIGABRT,
"terminate called without an active exception"; ``benchmarks/exit_race.py``). The launcher then
kills the other processes, the main one possibly while it writes its results. (The destroy joins the
threads only if nothing else holds the group: ``torch._dynamo``, imported after the group was made,
keeps references to it, so a script imports transformers or hf_trak before making its Accelerator.)

When one process of a launch dies, the launcher stops the others with SIGTERM; hf_trak turns that, and a
collective that fails because a peer is gone, into a ``ProcessFailedError`` in each survivor: the process
unwinds (every file is written whole or not at all), says why in one line, and a rerun resumes. A group that
hf_trak makes waits ``process_timeout`` seconds at most in a collective (a peer that hangs instead of dying).
"""

import atexit
import contextlib
import datetime
import functools
import os
import signal
import threading
from typing import Iterator, Optional

import torch
from accelerate import PartialState

from hf_trak.errors import InvalidArgumentError, ProcessFailedError


def process_state(timeout: Optional[float] = None) -> PartialState:
    """accelerate's process state: an ``Accelerator``'s made before, else the launcher's, else one process
    (whose collectives wait ``timeout`` seconds at most, if given).

    Without an accelerator device accelerate's ``PartialState()`` counts a launch's processes only
    with ``cpu=True``, which is given here (a state made before, an ``Accelerator``'s, is kept). A state
    of one process in a ``torch.distributed`` group of several (an ``Accelerator()`` made without
    ``cpu=True`` on such a machine) would have every process featurize and score everything alone: it
    is refused.
    """
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    state = PartialState(cpu=True, **kwargs) if _launched_without_device() else PartialState(**kwargs)
    group = torch.distributed.get_world_size() if _distributed() else 1
    if state.num_processes != group:
        raise InvalidArgumentError(
            f"accelerate counts {state.num_processes} process(es) but torch.distributed has {group}: each would "
            "featurize and score everything alone. On a machine without GPU make the Accelerator with cpu=True "
            "(Accelerator(cpu=True)), or make none and let TRAKer count the processes."
        )
    if state.num_processes > 1:
        _destroy_process_group_at_exit()
        _fail_on_sigterm()
    return state


def _launched_without_device() -> bool:
    """Launched as several processes on a machine with no accelerator device (GPU, XPU, ...)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@functools.lru_cache(maxsize=None)  # registered once per process
def _destroy_process_group_at_exit() -> None:
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """What ``Accelerator.end_training()`` does to the group: nothing if it is gone already, or if
    accelerate's ``notebook_launcher`` forked the processes (it owns their group)."""
    if _distributed() and not PartialState().fork_launched:
        torch.distributed.destroy_process_group()


STOPPED = (
    "another process of the launch ended (killed, or failed: its own error is above), and the launcher stopped "
    "this one. Run the launch again: it resumes from the shards written completely."
)


@functools.lru_cache(maxsize=None)  # installed once per process
def _fail_on_sigterm() -> None:
    """A launcher's SIGTERM raises ``ProcessFailedError`` in the main thread (unless the user set a handler)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        return

    def stopped(signum, frame):
        raise ProcessFailedError(f"This process was stopped (SIGTERM): {STOPPED}")

    signal.signal(signal.SIGTERM, stopped)


@contextlib.contextmanager
def collectives(state: PartialState) -> Iterator[None]:
    """Turn a collective that fails because a process of the launch is gone into a ``ProcessFailedError``."""
    try:
        yield
    except torch.distributed.DistError as error:
        if state.num_processes == 1:
            raise
        raise ProcessFailedError(f"A collective failed ({' '.join(str(error).split())[:200]}): {STOPPED}") from error


def gather_to_main(state: PartialState, value):
    """Every process's ``value`` in rank order on the main process (None on the others).

    accelerate's ``gather_object`` is an all-gather (every process would receive every share
    of the score matrix), and its ``gather`` needs equal-shaped tensors on the device, so
    this is ``torch.distributed.gather_object`` to the main process only.
    """
    if state.num_processes == 1:
        return [value]
    gathered = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered
