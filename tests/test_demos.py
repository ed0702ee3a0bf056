"""``par-deploy demos``' use of the process pool without the simulator: a fake demo worker (the ``_DemoWorker``
interface: ``run(index)`` writes the episode, returns its messages) crashes; the run completes or stops with one
line naming the episode. The real generator is tested in test_sim.py (``-m sim``)."""

import functools
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from par_deploy.pool import PoolError
from par_deploy.train.demo_format import episode_path, list_episodes, load_episode, save_episode
from par_deploy.train.demos import WORKER_ATTEMPTS, DemoSummary, _make_episodes, _record
from tests.faults import fail_as, record_run, runs_of


class _FakeDemoWorker:
    """Episode ``index``: a first attempt that fails for the indices in ``fail_first``, then a kept 3-step
    episode written with ``save_episode``. ``crash`` maps an index to ``exit`` or ``kill`` on its first run
    (``always``: on every run); a marker file per run remembers runs across processes."""

    def __init__(self, out_dir, fail_first=(), crash=None, always=None):
        self.out, self.fail_first, self.crash, self.always = Path(out_dir), fail_first, crash or {}, always or {}

    def run(self, index):
        first = record_run(self.out, index) == 0
        fault = self.always.get(index) or (self.crash.get(index) if first else None)
        if fault:
            fail_as(fault, f"demo {index} failed")
        messages = [("failed", index, index, "planner found no path", 0.1, 0.0)] if index in self.fail_first else []
        seed = index + (10**6 if messages else 0)
        ep = {
            "rgb": np.zeros((4, 1, 8, 8, 3), np.uint8),
            "state": np.full((4, 2), index, np.float32),
            "actions": np.zeros((3, 2), np.float32),
            "success": np.asarray(True),
            "seed": np.asarray(seed, np.int64),
        }
        save_episode(episode_path(self.out, index), ep)
        return [*messages, ("kept", index, seed, 3, 0.1, 0.2)]

    def close(self):
        pass


def _run(out: Path, n: int, workers: int, **faults) -> tuple[DemoSummary, list[str]]:
    """What ``generate_demos`` does once its dataset directory is ready (the fake worker in place of the real)."""
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    summary, console, logged = DemoSummary("Fake", str(out), n), Console(quiet=True), []
    make = functools.partial(_FakeDemoWorker, out, **faults)
    todo = [i for i in range(n) if not episode_path(out, i).exists()]
    summary.existing = n - len(todo)
    _make_episodes(make, todo, workers, lambda msg: _record(summary, msg, console, 5), logged.append)
    return summary, logged


@pytest.mark.parametrize("fault", ["exit", "kill"])
def test_a_crashed_demo_worker_is_restarted_and_the_run_completes(tmp_path, fault):
    s, log = _run(tmp_path, 5, workers=2, fail_first=(1,), crash={3: fault})
    assert (s.kept, s.failed_attempts, s.missing, s.lengths) == (5, 1, [], [3] * 5)
    assert [int(load_episode(p)["state"][0, 0]) for p in list_episodes(tmp_path)] == [0, 1, 2, 3, 4]
    assert len(runs_of(tmp_path, 3)) == 2  # index 3 ran again, in another process
    assert len(log) == 1 and log[0].startswith("demo episode 3: worker pid ") and "(attempt 1 of 3)" in log[0]
    assert not mp.active_children()


def test_a_demo_that_always_crashes_stops_the_run_naming_it_and_resumes(tmp_path):
    with pytest.raises(PoolError) as info:
        _run(tmp_path, 4, workers=2, always={2: "kill"})
    msg = str(info.value)
    assert msg.startswith(f"demo episode 2 failed in all {WORKER_ATTEMPTS} attempts") and "\n" not in msg
    assert len(runs_of(tmp_path, 2)) == WORKER_ATTEMPTS
    assert not episode_path(tmp_path, 2).exists() and not mp.active_children()
    s, _ = _run(tmp_path, 4, workers=2)  # resumes: only the missing episodes are made
    assert s.kept + s.existing == 4 and s.kept >= 1 and episode_path(tmp_path, 2).exists()


def test_one_demo_worker_runs_in_this_process(tmp_path):
    s, log = _run(tmp_path, 3, workers=1, fail_first=(0,))
    assert (s.kept, s.failed_attempts) == (3, 1) and log == []
    assert {p.name.split("-")[2] for p in tmp_path.glob("run-*")} == {str(os.getpid())}
