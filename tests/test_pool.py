"""The one process pool (par_deploy.pool): a task whose worker dies is re-run in a fresh worker, a bounded number of
times; results come back as they finish. Small fake workers, no simulator (its callers: test_eval, test_demos)."""

import functools
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from par_deploy.pool import PoolError, WorkerPool, WorkerStartError
from tests.faults import fail_as, record_run, runs_of


class _Worker:
    """``run(task)`` -> ``(task * 10, pid)``; each run leaves a file ``run-<task>-<pid>`` in ``marker_dir``.
    ``once`` maps a task to a fault (``exit``, ``kill``, ``raise``, ``hang``) on its first run only; ``always`` to
    one on every run. ``wait_for`` maps a task to a task whose run it waits for (at most 60 s)."""

    def __init__(self, marker_dir, once=None, always=None, wait_for=None):
        self.dir, self.once, self.always, self.wait_for = Path(marker_dir), once or {}, always or {}, wait_for or {}

    def run(self, task):
        first = record_run(self.dir, task) == 0
        fault = self.always.get(task) or (self.once.get(task) if first else None)
        if fault:
            fail_as(fault, f"simulated\nfailure of task {task}")
        if task in self.wait_for:
            deadline = time.monotonic() + 60
            while not runs_of(self.dir, self.wait_for[task]) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the marker is written when that run starts: let its result reach the parent first
        return task * 10, os.getpid()


class _BrokenWorker:
    def __init__(self):
        raise RuntimeError("cannot load\nthe simulator")


def _pool(make_worker, **kw) -> WorkerPool:
    return WorkerPool(make_worker, name=lambda t: f"task {t}", label="test", **kw)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("exit", "died (exit code 3)"),
        ("kill", "died (exit code -9)"),
        ("raise", "worker raised RuntimeError: simulated failure of task 2"),
        ("hang", "timed out (task > 3 s)"),
    ],
)
def test_a_task_whose_worker_dies_is_rerun_in_a_fresh_worker(tmp_path, fault, reason):
    logged = []
    make = functools.partial(_Worker, tmp_path, once={2: fault})
    with _pool(make, workers=2, timeout=3 if fault == "hang" else None, log=logged.append) as pool:
        done = {d.task: d for d in pool.run(range(5))}
        assert pool.restarts == 1
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert all(d.result[0] == t * 10 and not d.failed for t, d in done.items())
    assert done[2].attempts == 2 and done[2].reasons == [done[2].reasons[0]] and reason in done[2].reasons[0]
    assert all(done[t].attempts == 1 and done[t].reasons == [] for t in (0, 1, 3, 4))
    pids = {int(p.name.split("-")[2]) for p in runs_of(tmp_path, 2)}
    assert len(pids) == 2 and done[2].result[1] in pids  # the re-run is in another process
    assert logged == [f"task 2: {done[2].reasons[0]} (attempt 1 of 3)"]
    assert not mp.active_children()


def test_a_task_that_always_crashes_ends_in_one_line_naming_it(tmp_path):
    make = functools.partial(_Worker, tmp_path, always={1: "kill"})
    with pytest.raises(PoolError) as info, _pool(make, workers=2, max_attempts=3) as pool:
        for _ in pool.run(range(4)):
            pass
    msg = str(info.value)
    assert msg.startswith("task 1 failed in all 3 attempts, each in a fresh worker; last: worker pid ")
    assert msg.endswith("died (exit code -9)") and "\n" not in msg
    assert len(runs_of(tmp_path, 1)) == 3  # bounded: exactly max_attempts runs, each in its own process
    assert not mp.active_children()  # the pool stopped its workers


def test_keep_failures_returns_the_failed_task_and_goes_on(tmp_path):
    make = functools.partial(_Worker, tmp_path, always={0: "exit"})
    with _pool(make, workers=1, max_attempts=2, keep_failures=True) as pool:
        done = {d.task: d for d in pool.run(range(3))}
    assert done[0].failed and done[0].result is None and done[0].attempts == 2 and len(done[0].reasons) == 2
    assert [done[t].result[0] for t in (1, 2)] == [10, 20]


def test_results_come_back_as_they_finish(tmp_path):
    make = functools.partial(_Worker, tmp_path, wait_for={0: 1})  # task 0 finishes only after task 1 has run
    with _pool(make, workers=2) as pool:
        order = [d.task for d in pool.run([0, 1])]
    assert order == [1, 0]


def test_a_worker_that_cannot_start_is_one_line_naming_the_cause():
    with pytest.raises(WorkerStartError) as info, _pool(_BrokenWorker, workers=2) as pool:
        list(pool.run(range(3)))
    assert str(info.value) == "test worker could not start: RuntimeError: cannot load the simulator"
    assert not info.value.is_par_error and "Traceback" in info.value.trace
    assert not mp.active_children()


def test_bad_arguments_and_no_tasks():
    with pytest.raises(ValueError, match="workers"):
        WorkerPool(_BrokenWorker, workers=0)
    with WorkerPool(_BrokenWorker) as pool:
        assert list(pool.run([])) == []  # no task: no worker is started
