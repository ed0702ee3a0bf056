"""One process pool: tasks run in spawned worker processes, and a task whose worker dies is re-run in a fresh one.

``par-deploy eval`` (``par_deploy/eval/rollouts.py``: one task = one episode) and ``par-deploy demos``
(``train/demos.py``: one task = one episode index) both use ``WorkerPool``; each keeps its own bookkeeping
(eval's resumable results JSON, demos' episode files).

- A worker is a ``spawn``-ed process (never ``fork``: the parent may hold a Vulkan instance or torch threads). It
  calls ``make_worker()`` once (load a policy, create simulators), then ``worker.run(task)`` for each task the
  parent sends, and ``worker.close()`` (if it has one) when it stops. ``make_worker``, the tasks and the results
  cross a pipe, so they must be picklable (a module-level class or a ``functools.partial`` of one).
- A task whose worker dies (exits, segfaults, is killed), raises, or exceeds ``timeout`` seconds is re-run in a
  fresh worker (the old one is killed), at most ``max_attempts`` runs in all. When they run out the pool stops
  with ``PoolError``, one line naming the task and the last reason, unless ``keep_failures`` (then the task comes
  back as a failed ``TaskDone``: eval records such an episode as ``crashed``).
- Results come back as they finish (``run`` yields ``TaskDone``), with the reasons of earlier failed attempts.
- A worker whose ``make_worker()`` raises stops the pool with ``WorkerStartError`` (one line: the cause); one that
  dies or exceeds ``startup_timeout`` while starting is restarted, ``max_attempts`` times at most per worker.
- Workers ignore SIGINT: Ctrl-C reaches the parent, whose ``close()`` (or ``with`` block) stops them.
  ``PAR_DEBUG=1`` logs a worker's traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

from par_deploy.errors import ParError

DEFAULT_ATTEMPTS = 3


class PoolError(ParError, RuntimeError):
    """The pool cannot go on: a task failed in every attempt, or a worker could not be started."""


class WorkerStartError(PoolError):
    """A worker's ``make_worker()`` raised. ``cause``: that error in one line; ``is_par_error``: it was one of
    par-deploy's own (its message says what to fix); ``trace``: the worker's traceback."""

    def __init__(self, label: str, cause: str, is_par_error: bool, trace: str):
        super().__init__(f"{label} worker could not start: {cause}")
        self.cause, self.is_par_error, self.trace = cause, is_par_error, trace


@dataclass
class TaskDone:
    """One finished task: ``result`` is what ``worker.run(task)`` returned (None when ``failed``); ``reasons``
    says, one line each, why earlier attempts (all of them, when ``failed``) did not finish."""

    task: Any
    result: Any = None
    reasons: list[str] = field(default_factory=list)
    failed: bool = False

    @property
    def attempts(self) -> int:
        return len(self.reasons) + (0 if self.failed else 1)


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line (a worker's error as the parent reports it)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def debug() -> bool:
    return os.environ.get("PAR_DEBUG", "") not in ("", "0")


def _worker_main(make_worker: Callable[[], Any], conn) -> None:
    """A pool worker: ``make_worker()`` once, then run the tasks the parent sends until it sends ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    try:
        worker = make_worker()
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        conn.send(("init_error", one_line(e), isinstance(e, ParError), traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            try:
                result = worker.run(task)
                conn.send(("result", result))  # inside the try: a result that cannot be sent is reported, not lost
            except BaseException as e:  # noqa: BLE001 - the parent restarts this worker and re-runs the task
                conn.send(("crash", one_line(e), traceback.format_exc()))
                return
    finally:
        close = getattr(worker, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables the spawned child inherits (only those not set by the user)."""
    added = {k: v for k, v in overrides.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclass
class _Slot:
    proc: Any = None
    conn: Any = None
    state: str = "down"  # down | starting | idle | busy
    task: int | None = None  # index into the tasks of the current ``run``
    since: float = 0.0
    start_failures: int = 0

    @property
    def live(self) -> bool:
        return self.state in ("starting", "busy")


class WorkerPool:
    """``workers`` spawned processes running tasks (see the module docstring). Use it as a context manager (or
    call ``close``): ``with WorkerPool(make_worker, workers=2) as pool: for done in pool.run(tasks): ...``.

    ``name(task)``: the task in log lines and errors; ``label``: the workers in errors; ``env``: environment
    variables for the workers (those the user has set win); ``log``: one line per failed attempt."""

    def __init__(
        self,
        make_worker: Callable[[], Any],
        *,
        workers: int = 1,
        max_attempts: int = DEFAULT_ATTEMPTS,
        timeout: float | None = None,
        startup_timeout: float | None = None,
        keep_failures: bool = False,
        name: Callable[[Any], str] = str,
        label: str = "pool",
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if workers < 1 or max_attempts < 1:
            raise ValueError(f"workers ({workers}) and max_attempts ({max_attempts}) must be >= 1")
        self.make_worker, self.workers, self.max_attempts = make_worker, workers, max_attempts
        self.timeout, self.startup_timeout, self.keep_failures = timeout, startup_timeout, keep_failures
        self.name, self.label, self.env = name, label, dict(env or {})
        self.log = log or (lambda msg: None)
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Slot] = []
        self._tasks: list[Any] = []
        self._pending: deque[int] = deque()
        self._reasons: dict[int, list[str]] = {}
        self._done: deque[TaskDone] = deque()
        self.restarts = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, tasks: Iterable[Any]) -> Iterator[TaskDone]:
        """Run ``tasks``; yield each as it finishes (in any order). Raises ``PoolError`` (see the class)."""
        self._tasks = list(tasks)
        self._pending, self._reasons, self._done = deque(range(len(self._tasks))), {}, deque()
        if not self._tasks:
            return
        self._start_workers()
        while self._pending or self._busy():
            self._dispatch()
            live = [s for s in self._slots if s.live]
            if live:
                mp_wait([s.conn for s in live] + [s.proc.sentinel for s in live], timeout=1.0)
                for slot in live:
                    self._drain(slot)
                    self._check(slot)
            while self._done:
                yield self._done.popleft()

    def _busy(self) -> bool:
        return any(s.state == "busy" for s in self._slots)

    def _start_workers(self) -> None:
        while len(self._slots) < min(self.workers, len(self._pending)):
            self._slots.append(_Slot())
        for slot in self._slots:
            if slot.state == "down":
                self._start(slot)

    def _dispatch(self) -> None:
        """Give every idle worker the next task; stop idle workers when none is left."""
        for slot in self._slots:
            if slot.state != "idle":
                continue
            if not self._pending:
                self._stop_idle(slot)
                continue
            i = self._pending.popleft()
            slot.state, slot.task, slot.since = "busy", i, time.monotonic()
            try:
                slot.conn.send(self._tasks[i])
            except (OSError, ValueError) as e:
                self._fail(slot, f"worker unreachable ({e})")

    def _drain(self, slot: _Slot) -> None:
        try:
            while slot.live and slot.conn.poll():
                self._handle(slot, slot.conn.recv())
        except (EOFError, OSError):
            pass  # the process is gone: ``_check`` handles it

    def _check(self, slot: _Slot) -> None:
        """Restart a worker that died or exceeded its time limit."""
        if not slot.live:
            return
        if not slot.proc.is_alive():
            self._fail(slot, f"worker pid {slot.proc.pid} died (exit code {slot.proc.exitcode})")
            return
        limit = self.startup_timeout if slot.state == "starting" else self.timeout
        if limit is not None and time.monotonic() - slot.since > limit:
            what = "start-up" if slot.state == "starting" else "task"
            self._fail(slot, f"worker pid {slot.proc.pid} timed out ({what} > {limit:g} s)")

    # -- messages and failures -----------------------------------------------------------------------------
    def _handle(self, slot: _Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.state, slot.since = "idle", time.monotonic()
        elif kind == "init_error":
            self.close()
            if debug():
                self.log(msg[3].rstrip())
            raise WorkerStartError(self.label, *msg[1:])
        elif kind == "result":
            i = slot.task
            slot.state, slot.task = "idle", None
            self._done.append(TaskDone(self._tasks[i], msg[1], self._reasons.pop(i, [])))
        elif kind == "crash":
            if debug():
                self.log(msg[2].rstrip())
            self._fail(slot, f"worker raised {msg[1]}")

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Kill the worker, re-queue (or give up) its task, restart the worker when work is left."""
        i = slot.task
        if slot.state == "starting":
            slot.start_failures += 1
            if slot.start_failures >= self.max_attempts:
                self.close()
                raise PoolError(f"a {self.label} worker failed to start {slot.start_failures} times; last: {reason}")
        self._stop(slot, kill=True)
        if i is not None:
            self._retry_or_give_up(i, reason)
        if self._pending or self._busy():
            self.restarts += 1
            self._start(slot)

    def _retry_or_give_up(self, i: int, reason: str) -> None:
        rs = self._reasons.setdefault(i, [])
        rs.append(reason)
        name = self.name(self._tasks[i])
        self.log(f"{name}: {reason} (attempt {len(rs)} of {self.max_attempts})")
        if len(rs) < self.max_attempts:
            self._pending.appendleft(i)
        elif self.keep_failures:
            self._done.append(TaskDone(self._tasks[i], None, self._reasons.pop(i), failed=True))
        else:
            self.close()
            raise PoolError(f"{name} failed in all {len(rs)} attempts, each in a fresh worker; last: {reason}")

    # -- processes -----------------------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        with _environ(self.env):
            proc = self._ctx.Process(target=_worker_main, args=(self.make_worker, child), daemon=True)
            proc.start()
        child.close()
        slot.proc, slot.conn, slot.state, slot.task, slot.since = proc, parent, "starting", None, time.monotonic()

    def _stop(self, slot: _Slot, kill: bool) -> None:
        if slot.proc is None:
            return
        if kill and slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(timeout=10 if not kill else None)
        if slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join()
        with contextlib.suppress(Exception):
            slot.conn.close()
        slot.proc, slot.conn, slot.state, slot.task = None, None, "down", None

    def _stop_idle(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            slot.conn.send(None)
        self._stop(slot, kill=False)

    def close(self) -> None:
        """Stop every worker (idle ones are asked to finish, others are killed)."""
        for slot in self._slots:
            if slot.state == "idle":
                self._stop_idle(slot)
            else:
                self._stop(slot, kill=True)
        self._slots = []
