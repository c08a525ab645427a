"""For tests that start processes: their environment, and a probe of gloo's threads at a launched process's exit."""

import atexit
import os


def subprocess_env(**extra) -> dict:
    """The environment of a process a test starts: this checkout importable, one thread, no progress bars,
    and Python's stacks printed if it crashes (``PYTHONFAULTHANDLER``)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        PYTHONFAULTHANDLER="1",
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    env.update(extra)
    return env


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # a gloo process group's worker and transport threads


def register_exit_probe(out: str) -> None:
    """In a launched process, before hf_trak starts: at exit, after hf_trak's own exit handler (``atexit``
    runs them last-in first-out), write how many gloo threads are still alive to ``out/exit-<rank>.txt``."""
    rank = os.environ.get("RANK", "0")

    def probe():
        alive = "n/a"  # no /proc: thread names unknown
        if os.path.isdir("/proc/self/task"):
            alive = str(sum(_thread_name(task) in GLOO_THREADS for task in os.listdir("/proc/self/task")))
        with open(os.path.join(out, f"exit-{rank}.txt"), "w") as file:
            file.write(alive)

    atexit.register(probe)


def _thread_name(task: str) -> str:
    with open(f"/proc/self/task/{task}/comm") as file:
        return file.read().strip()


def assert_gloo_threads_joined_at_exit(out, num_processes: int = 2) -> None:
    """Every launched process (``register_exit_probe``) had joined its gloo threads before the interpreter's
    teardown (Linux: threads named in /proc)."""
    expected = "0" if os.path.isdir("/proc/self/task") else "n/a"
    for rank in range(num_processes):
        with open(os.path.join(out, f"exit-{rank}.txt")) as file:
            assert file.read() == expected, f"rank {rank} reached its exit with gloo threads alive"
