"""Rollout backends: run episode jobs of one policy and report one ``EpisodeRecord`` per job.

``ProcessPoolRollouts`` (CPU) runs the episodes on the project's one process pool (``par_deploy.pool``):
``workers`` spawned processes, each loading its policy once (and a new environment per episode, see
``episode``). A worker that crashes (exits, segfaults, raises) or exceeds the per-episode ``timeout`` is
killed and restarted and its episode re-run, at most ``max_retries`` times; the retries are kept in the record
(``attempts``, ``retry_reasons``), and an episode that still fails is recorded as a failure with
``crashed: true`` (never dropped; a resumed evaluation re-runs it). A worker that cannot start (the policy or
the simulator does not load) stops the evaluation with one line naming the cause and the fix;
``PAR_DEBUG=1`` also prints the worker's traceback. ``InlineRollouts`` (``workers=0``) runs in the calling
process with no isolation.

A batched engine (``par-deploy export --batch N``) makes each task a group of up to N episodes that one
worker steps in lockstep through one engine call per control step (``batched.BatchEpisodeRunner``, one
environment per episode); the per-task timeout then scales with the group, and a group that fails every
attempt records each of its episodes as crashed. No GPU-vectorised simulator backend is included (it cannot be
run here); it would implement the same ``Rollouts`` protocol over ``gym.make(..., num_envs=N,
sim_backend="physx_cuda")`` with the same batched policies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from par_deploy.eval.batched import BatchEpisodeRunner
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
from par_deploy.pool import PoolError, TaskDone, WorkerPool, WorkerStartError

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


def jobs_of(task) -> tuple[EpisodeJob, ...]:
    """The jobs of a pool task (``tasks_of``): one job, or a group's tuple."""
    return task if isinstance(task, tuple) else (task,)


def _task_name(task) -> str:
    return ", ".join(f"state {job.state} seed {job.policy_seed}" for job in jobs_of(task))


class Rollouts(Protocol):
    """Runs episode jobs of one ``RolloutSetup`` and calls ``on_record`` (in the caller's thread) once per job.

    The CPU process pool implements it; a GPU-vectorised ManiSkill backend (one ``physx_cuda`` environment with
    ``num_envs`` sub-scenes stepped in lockstep, a batched policy) would implement the same two methods."""

    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None: ...

    def close(self) -> None: ...


def make_runner(setup: RolloutSetup):
    """The worker of ``setup``: an ``EpisodeRunner`` (task: one job), or a ``BatchEpisodeRunner`` (task: a tuple
    of jobs) for a batched engine."""
    return BatchEpisodeRunner(setup) if setup.policy.batch > 1 else EpisodeRunner(setup)


def tasks_of(jobs: Sequence[EpisodeJob], batch: int) -> list:
    """The pool's tasks: the jobs themselves (batch 1) or consecutive groups of ``batch`` jobs."""
    jobs = list(jobs)
    return jobs if batch == 1 else [tuple(jobs[i : i + batch]) for i in range(0, len(jobs), batch)]


def records_of(result) -> list[EpisodeRecord]:
    """A worker's result (one record, or a group's list) as a list."""
    return list(result) if isinstance(result, list) else [result]


class InlineRollouts:
    """Episodes in the calling process (``workers=0``): no isolation, no timeout; an exception propagates."""

    def __init__(self, setup: RolloutSetup):
        self.setup = setup
        self._runner = None

    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None:
        if jobs and self._runner is None:
            self._runner = make_runner(self.setup)
        for task in tasks_of(jobs, self.setup.policy.batch):
            for record in records_of(self._runner.run(task)):
                on_record(record)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


class ProcessPoolRollouts:
    """``workers`` spawned CPU processes (``par_deploy.pool.WorkerPool``), each with its own policy (see the module
    docstring).

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
        self.setup, self.batch = setup, setup.policy.batch
        self._pool = WorkerPool(
            functools.partial(make_runner, setup),
            workers=workers,
            max_attempts=max_retries + 1,
            timeout=timeout * self.batch,  # a group of N episodes runs N environments
            startup_timeout=max(timeout, STARTUP_TIMEOUT),  # imports, policy load, Vulkan/scene set-up
            keep_failures=True,  # an episode that fails every attempt is recorded as crashed
            name=_task_name,
            label=setup.label,
            env={"OMP_NUM_THREADS": str(setup.policy.threads), "LP_NUM_THREADS": "0"},
            log=log,
        )

    @property
    def restarts(self) -> int:
        return self._pool.restarts

    def run(self, jobs: Sequence[EpisodeJob], on_record: OnRecord) -> None:
        try:
            for done in self._pool.run(tasks_of(jobs, self.batch)):
                for record in self._records(done):
                    on_record(record)
        except WorkerStartError as e:
            s = self.setup
            fix = "" if e.is_par_error else "; run with --workers 0 (or PAR_DEBUG=1) to see the traceback"
            raise EvalError(
                f"{s.label} worker could not load {s.policy.name} or the {s.task} environment: {e.cause}{fix}"
            ) from None
        except PoolError as e:
            raise EvalError(str(e)) from None

    def _records(self, done: TaskDone) -> list[EpisodeRecord]:
        if done.failed:
            return [self.setup.crash_record(job, done.reasons) for job in jobs_of(done.task)]
        records = records_of(done.result)
        for record in records:
            record.attempts, record.retry_reasons = done.attempts, done.reasons
        return records

    def close(self) -> None:
        self._pool.close()
