"""Rollout backends: run episode jobs of one policy and report one ``EpisodeRecord`` per job.

``ProcessPoolRollouts`` (CPU) starts ``workers`` spawned processes, each loading its policy once (and a new
environment per episode, see ``episode``). A worker that crashes (exits, segfaults, raises) or exceeds the
per-episode ``timeout`` is killed and restarted and its episode re-run, at most ``max_retries`` times; the
retries are kept in the record (``attempts``, ``retry_reasons``), and an episode that still fails is recorded as
a failure with ``crashed: true`` (never dropped; a resumed evaluation re-runs it). A worker that cannot start
(the policy or the simulator does not load) stops the evaluation with one line naming the cause and the fix;
``PAR_DEBUG=1`` also prints the worker's traceback. ``InlineRollouts`` (``workers=0``) runs in the calling
process with no isolation. No GPU-vectorised backend is included: it would need batched policies (the engines
are batch-1 with a static cache) and it cannot be run here; it would implement the same ``Rollouts`` protocol
over ``gym.make(..., num_envs=N, sim_backend="physx_cuda")``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Any, Protocol

from par_deploy.errors import ParError
from par_deploy.eval.episode import EpisodeRecord, EpisodeRunner
from par_deploy.eval.protocol import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    EVAL_SEED_BASE,
    STARTUP_TIMEOUT,
    EpisodeJob,
    EvalError,
)
from par_deploy.eval.sources import PolicySource

OnRecord = Callable[[EpisodeRecord], None]


def _default_env_factory(task: str, *, control_mode: str, image_size: int, max_episode_steps: int):
    from par_deploy.sim.env import make_env

    return make_env(task, control_mode=control_mode, image_size=image_size, max_episode_steps=max_episode_steps)


@dataclass(frozen=True)
class RolloutSetup:
    """Everything a worker needs to run episodes (picklable). ``env_factory(task, control_mode=, image_size=,
    max_episode_steps=)`` returns an object with the ``ParEnv`` interface (default: ``par_deploy.sim.make_env``)."""

    task: str
    policy: PolicySource
    instruction: str
    control_mode: str
    image_size: int
    max_steps: int
    state_seed_base: int = EVAL_SEED_BASE
    stop_on_success: bool = False
    video_dir: str | None = None
    label: str = "policy"
    env_factory: Callable[..., Any] | None = None

    def make_env(self):
        factory = self.env_factory or _default_env_factory
        return factory(
            self.task, control_mode=self.control_mode, image_size=self.image_size, max_episode_steps=self.max_steps
        )

    def crash_record(self, job: EpisodeJob, reasons: Sequence[str]) -> EpisodeRecord:
        return EpisodeRecord.crashed_job(job, self.state_seed_base, self.stop_on_success, reasons)


class Rollouts(Protocol):
    """Runs episode jobs of one ``RolloutSetup`` and calls ``on_record`` (in the caller's thread) once per job.

    The CPU process pool implements it; a GPU-vectorised ManiSkill backend (one ``physx_cuda`` environment with
    ``num_envs`` sub-scenes stepped in lockstep, a batched policy) would implement the same two methods."""

    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None: ...

    def close(self) -> None: ...


class InlineRollouts:
    """Episodes in the calling process (``workers=0``): no isolation, no timeout; an exception propagates."""

    def __init__(self, setup: RolloutSetup):
        self.setup = setup
        self._runner: EpisodeRunner | None = None

    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None:
        if jobs and self._runner is None:
            self._runner = EpisodeRunner(self.setup)
        for job in jobs:
            on_record(self._runner.run(job))

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line (a worker's error as the parent reports it)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def debug() -> bool:
    return os.environ.get("PAR_DEBUG", "") not in ("", "0")


def _worker_main(setup: RolloutSetup, conn) -> None:
    """A pool worker: load the policy once, then run the jobs the parent sends until it sends ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers (JSON is saved)
    try:
        runner = EpisodeRunner(setup)
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        conn.send(("init_error", one_line(e), isinstance(e, ParError), traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            try:
                record = runner.run(job)
            except BaseException as e:  # noqa: BLE001 - the parent restarts this worker and re-runs the job
                conn.send(("crash", one_line(e), traceback.format_exc()))
                return
            conn.send(("result", record))
    finally:
        runner.close()


@contextlib.contextmanager
def _environ(overrides: dict[str, str]) -> Iterator[None]:
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
    job: EpisodeJob | None = None
    since: float = 0.0
    start_failures: int = 0

    @property
    def live(self) -> bool:
        return self.state in ("starting", "busy")


class ProcessPoolRollouts:
    """``workers`` spawned CPU processes, each with its own policy (see the module docstring).

    Each worker gets ``OMP_NUM_THREADS=<policy threads>`` and ``LP_NUM_THREADS=0`` (single-threaded lavapipe:
    one core per worker) unless those variables are already set. ``STARTUP_TIMEOUT`` bounds a worker's start."""

    def __init__(
        self,
        setup: RolloutSetup,
        workers: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        log: Callable[[str], None] | None = None,
    ):
        if workers < 1:
            raise EvalError(f"workers must be >= 1, got {workers}")
        self.setup, self.workers, self.timeout, self.max_retries = setup, workers, timeout, max_retries
        self.startup_timeout = max(timeout, STARTUP_TIMEOUT)  # imports, policy load, Vulkan/scene set-up
        self.log = log or (lambda msg: None)
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold a Vulkan instance
        self._slots: list[_Slot] = []
        self._pending: deque[EpisodeJob] = deque()
        self._reasons: dict[tuple[int, int], list[str]] = {}
        self._on_record: OnRecord = lambda record: None
        self.restarts = 0

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None:
        self._pending, self._reasons, self._on_record = deque(jobs), {}, on_record
        if not self._pending:
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

    def _busy(self) -> bool:
        return any(s.state == "busy" for s in self._slots)

    def _start_workers(self) -> None:
        while len(self._slots) < min(self.workers, len(self._pending)):
            self._slots.append(_Slot())
        for slot in self._slots:
            if slot.state == "down":
                self._start(slot)

    def _dispatch(self) -> None:
        """Give every idle worker the next job; stop idle workers when none is left."""
        for slot in self._slots:
            if slot.state != "idle":
                continue
            if not self._pending:
                self._stop_idle(slot)
                continue
            job = self._pending.popleft()
            slot.state, slot.job, slot.since = "busy", job, time.monotonic()
            try:
                slot.conn.send(job)
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
        if time.monotonic() - slot.since > limit:
            what = "start-up" if slot.state == "starting" else "episode"
            self._fail(slot, f"worker pid {slot.proc.pid} timed out ({what} > {limit:g} s)")

    # -- messages and failures -----------------------------------------------------------------------------
    def _handle(self, slot: _Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.state, slot.since = "idle", time.monotonic()
        elif kind == "init_error":
            self._init_error(*msg[1:])
        elif kind == "result":
            record: EpisodeRecord = msg[1]
            rs = self._reasons.pop(slot.job.key, [])
            record.attempts, record.retry_reasons = len(rs) + 1, rs
            slot.state, slot.job = "idle", None
            self._on_record(record)
        elif kind == "crash":
            if debug():
                self.log(msg[2].rstrip())
            self._fail(slot, f"worker raised {msg[1]}")

    def _init_error(self, message: str, is_par_error: bool, trace: str) -> None:
        self.close()
        if debug():
            self.log(trace.rstrip())
        fix = "" if is_par_error else "; run with --workers 0 (or PAR_DEBUG=1) to see the traceback"
        raise EvalError(
            f"{self.setup.label} worker could not load {self.setup.policy.name} or the "
            f"{self.setup.task} environment: {message}{fix}"
        )

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Kill the worker, re-queue (or record as crashed) its job, restart it when work is left."""
        job = slot.job
        if slot.state == "starting":
            slot.start_failures += 1
            if slot.start_failures > self.max_retries:
                self.close()
                raise EvalError(f"a worker failed to start {slot.start_failures} times; last: {reason}")
        self._stop(slot, kill=True)
        if job is not None:
            self._retry_or_record(job, reason)
        if self._pending or self._busy():
            self.restarts += 1
            self._start(slot)

    def _retry_or_record(self, job: EpisodeJob, reason: str) -> None:
        rs = self._reasons.setdefault(job.key, [])
        rs.append(reason)
        self.log(f"state {job.state} seed {job.policy_seed}: {reason} (attempt {len(rs)})")
        if len(rs) > self.max_retries:
            self._on_record(self.setup.crash_record(job, rs))
        else:
            self._pending.appendleft(job)

    # -- processes -----------------------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        env = {"OMP_NUM_THREADS": str(self.setup.policy.threads), "LP_NUM_THREADS": "0"}
        with _environ(env):
            proc = self._ctx.Process(target=_worker_main, args=(self.setup, child), daemon=True)
            proc.start()
        child.close()
        slot.proc, slot.conn, slot.state, slot.job, slot.since = proc, parent, "starting", None, time.monotonic()

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
        slot.proc, slot.conn, slot.state, slot.job = None, None, "down", None

    def _stop_idle(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            slot.conn.send(None)
        self._stop(slot, kill=False)

    def close(self) -> None:
        for slot in self._slots:
            if slot.state == "idle":
                self._stop_idle(slot)
            else:
                self._stop(slot, kill=True)
        self._slots = []
