"""Faults for the process-pool tests (test_pool, test_demos, test_eval): how a worker process can fail, and marker
files that let a fault fire on a task's first run only (they count runs across processes). No heavy imports:
spawned workers import it."""

import os
import signal
import time
from pathlib import Path


def fail_as(kind: str, message: str) -> None:
    """``exit`` (``os._exit(3)``), ``kill`` (SIGKILL to this process), ``hang``, ``interrupt``
    (KeyboardInterrupt), anything else: ``RuntimeError(message)``."""
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise RuntimeError(message)


def runs_of(marker_dir, key) -> list[Path]:
    """The runs of ``key`` recorded by ``record_run`` (one file each, named by the process)."""
    return sorted(Path(marker_dir).glob(f"run-{key}-*"))


def record_run(marker_dir, key) -> int:
    """Record a run of ``key`` in this process; return how many runs of it came before."""
    before = len(runs_of(marker_dir, key))
    (Path(marker_dir) / f"run-{key}-{os.getpid()}").touch()
    return before
