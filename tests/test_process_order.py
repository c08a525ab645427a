"""Every process of a launch makes the same collectives whatever the timing: a process that looks at the store late
must not see what the main process wrote after the others had looked, and skip a barrier (the launch would hang)."""

import os
import threading
import time
from types import SimpleNamespace

from hf_trak.run.featurize import _write_principal_factors
from hf_trak.run.side_samples import SideMoments


class ThreadState:
    """A process of a launch of two, run as a thread: ``wait_for_everyone`` is a barrier shared with the other."""

    def __init__(self, barrier: threading.Barrier, main: bool):
        self.barrier, self.is_main_process = barrier, main
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1
        self.barrier.wait()


class FactorFile:
    """The part of a store the principal factors use: one file, written by the main process."""

    def __init__(self, path: str, delay: float):
        self.path, self.delay = path, delay
        self.config = SimpleNamespace(principal_share=0.6)

    def has_principal_factors(self, model_id: int) -> bool:
        time.sleep(self.delay)  # a process descheduled just before it looks
        return os.path.exists(self.path)

    def save_principal_factors(self, model_id: int, factors: dict) -> None:
        with open(self.path, "w") as file:
            file.write("factors")

    def principal_factors(self, model_id: int) -> dict:
        return {}


def test_a_late_process_makes_the_main_process_s_barriers_when_it_writes_the_principal_factors(tmp_path):
    barrier = threading.Barrier(2, timeout=10)
    projector = SimpleNamespace(principal_factors=lambda *args: {}, set_factors=lambda *args: None)
    view = SimpleNamespace(map=SimpleNamespace(projector=projector), model_id=0)
    path = str(tmp_path / "factors")
    states = {"main": ThreadState(barrier, True), "late": ThreadState(barrier, False)}
    errors = []

    def run(name: str, delay: float):
        try:
            store = FactorFile(path, delay)
            _write_principal_factors(store, view, None, states[name], 8, SideMoments({}, {}))
        except Exception as error:  # a broken barrier: the other thread left it
            errors.append(error)

    threads = [threading.Thread(target=run, args=("main", 0.0)), threading.Thread(target=run, args=("late", 0.5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert os.path.exists(path) and states["main"].barriers == states["late"].barriers == 2
