"""Demonstrations: ManiSkill's motion planner, converted to the project's observation format.

Pipeline, per episode (``generate_demos``):

1. Plan: ManiSkill's scripted motion-planning solution for the task (``mani_skill.examples.motionplanning.
   panda.solutions``) drives a ``pd_joint_pos`` environment without observations; its actions are recorded.
2. Convert: a ``ParEnv`` (``par_deploy.sim``, the environment evaluation uses) is reset with the same seed
   and ManiSkill's action converter (``mani_skill.trajectory.utils.actions.conversion.from_pd_joint_pos``, the
   function behind ``replay_trajectory -c``) replays the plan in the target control mode, stepping the
   ``ParEnv``. Every observation the ``ParEnv`` returns and every action sent to ``ParEnv.step`` is stored, so
   training observations are exactly what the policy sees at evaluation.
3. Keep: only episodes whose converted replay ends in success are written.

Episode ``i`` uses seed ``seed + i``; if planning or conversion fails it retries with ``seed + i + k * 10**6``
(k = 1, 2, ...), so seeds never collide between episodes, runs with a different ``n``, or workers.

Dataset format: ``train/demo_format.py`` (``meta.json`` + one ``.npz`` per episode).

Workers: with ``workers > 1`` the episode indices run on the project's one process pool (``par_deploy.pool``),
each worker taking the next index; an index whose worker crashes (segfault, kill, an exception) is re-run in a
fresh worker, ``WORKER_ATTEMPTS`` runs at most, and then the run stops with one line naming the episode (the
episodes already written stay). With one worker the episodes run in the calling process.

Resuming: an episode file is written to a temporary name and moved into place (``os.replace``), so a file that
exists is complete; a new run skips the indices whose files exist. One run per ``out_dir`` at a time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy.errors import ConfigError
from par_deploy.pool import WorkerPool
from par_deploy.train.demo_format import episode_path, make_meta, save_episode, write_or_check_meta

SEED_STRIDE = 10**6  # retry k of episode i uses seed + i + k * SEED_STRIDE
PLANNERS = {"PushCube-v1": "solvePushCube", "PickCube-v1": "solvePickCube", "StackCube-v1": "solveStackCube"}
# Control modes ManiSkill's converter reaches from the planner's pd_joint_pos (pd_joint_pos: no conversion).
CONTROL_MODES = ("pd_joint_pos", "pd_joint_delta_pos", "pd_ee_delta_pos", "pd_ee_delta_pose")
_LONG_HORIZON = 10_000  # TimeLimit for planning/conversion envs: demos are never truncated
WORKER_ATTEMPTS = 3  # runs of one episode index, each in a fresh worker, when its worker crashes (workers > 1)

_Emit = Callable[[tuple], None]


@dataclass
class DemoSummary:
    """What one ``generate_demos`` call did. Times are in seconds; ``lengths`` are T of the new episodes."""

    task: str
    out_dir: str
    requested: int
    kept: int = 0  # written by this call
    existing: int = 0  # already on disk, skipped
    failed_attempts: int = 0  # planning failed or the converted replay did not succeed
    missing: list[int] = field(default_factory=list)  # indices without a demo after max_attempts
    lengths: list[int] = field(default_factory=list)
    plan_seconds: float = 0.0  # summed over all attempts
    convert_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def attempts(self) -> int:
        return self.kept + self.failed_attempts

    @property
    def seconds_per_demo(self) -> float:
        """Wall-clock seconds per kept episode (includes environment creation and failed attempts)."""
        return self.wall_seconds / self.kept if self.kept else float("nan")

    def __str__(self) -> str:
        per = max(self.attempts, 1)
        lengths = (
            f", T min/mean/max {min(self.lengths)}/{np.mean(self.lengths):.1f}/{max(self.lengths)}"
            if self.lengths
            else ""
        )
        return (
            f"{self.task}: kept {self.kept}, existing {self.existing}, "
            f"failed attempts {self.failed_attempts}, "
            f"missing {len(self.missing)} of {self.requested} in {self.out_dir}{lengths}; "
            f"{self.seconds_per_demo:.2f} s/demo wall, per attempt: plan {self.plan_seconds / per:.2f} s, "
            f"convert {self.convert_seconds / per:.2f} s"
        )


def _build_meta(env, task: str) -> dict[str, Any]:
    spec = env.spec  # ParEnv's cameras and state are its spec's: num_cameras and state_dim follow
    return make_meta(
        task=task,
        env_id=spec.env_id,
        control_mode=env.control_mode,
        image_size=env.image_size,
        camera_names=list(spec.cameras),
        state_keys=spec.state_keys,
        action_dim=env.action_dim,
        instruction=spec.instruction,
        max_episode_steps=spec.max_episode_steps,
    )


# ----------------------------------------------------------------------------------------------------------
# Planning and conversion


class _ActionRecorder:
    """Wraps the planner's environment and records the actions the motion planner sends."""

    def __init__(self, env):
        self.env = env
        self.actions: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    @property
    def unwrapped(self):
        return self.env.unwrapped

    def reset(self, **kwargs):
        self.actions = []
        return self.env.reset(**kwargs)

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        return self.env.step(action)


class _ParEnvRecorder:
    """Stands in for the target environment of ManiSkill's action converter: steps a ``ParEnv`` with numpy
    float32 actions and records every action and observation."""

    def __init__(self, env, first_obs: dict[str, np.ndarray]):
        self.env = env
        self.unwrapped = env.unwrapped
        self.observations = [first_obs]
        self.actions: list[np.ndarray] = []
        self.info: dict[str, Any] = {"success": False}

    def step(self, action):
        if hasattr(action, "detach"):
            action = action.detach().cpu().numpy()
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        out = self.env.step(action)
        self.actions.append(action)
        self.observations.append(out[0])
        self.info = out[4]
        return out


def _plan(recorder: _ActionRecorder, solve, seed: int) -> tuple[np.ndarray | None, str]:
    """Run the motion planner; return (pd_joint_pos actions, "") or (None, reason)."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            res = solve(recorder, seed=seed, debug=False, vis=False)
    except Exception as e:  # noqa: BLE001 - the scripted planners raise on unreachable poses
        return None, f"planner error: {type(e).__name__}: {e}"
    if isinstance(res, int) and res == -1:
        return None, "planner found no path" + (f" ({log.getvalue().strip()[-120:]})" if log.getvalue().strip() else "")
    if not bool(np.asarray(res[-1]["success"]).reshape(-1)[0]):
        return None, "planned episode did not succeed"
    return np.stack(recorder.actions), ""


def _convert(actions: np.ndarray, planner_env, env, control_mode: str, seed: int) -> dict[str, np.ndarray]:
    """Replay planned ``pd_joint_pos`` actions in ``env`` (a ``ParEnv`` in ``control_mode``), recording it."""
    from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos

    rec = _ParEnvRecorder(env, env.reset(seed))
    planner_env.reset(seed=seed)
    a, b = planner_env.unwrapped.get_state(), env.unwrapped.get_state()
    if a.shape != b.shape or not bool((a == b).all()):
        raise RuntimeError(f"seed {seed}: the planner's and the ParEnv's initial states differ")
    if control_mode == "pd_joint_pos":
        for action in actions:
            rec.step(action)
    else:
        from_pd_joint_pos(control_mode, actions, planner_env, rec)
    return {
        "rgb": np.stack([o["rgb"] for o in rec.observations]),
        "state": np.stack([o["state"] for o in rec.observations]),
        "actions": np.stack(rec.actions).astype(np.float32),
        "success": np.asarray(bool(rec.info["success"])),
        "seed": np.asarray(seed, dtype=np.int64),
    }


class _DemoWorker:
    """Makes the episodes of one dataset, one index per ``run`` call, with a planner environment and a ``ParEnv``
    that live as long as it does (in a pool worker process, or in the calling process with one worker)."""

    def __init__(self, task: str, out_dir: Path, control_mode: str, image_size: int, seed: int, max_attempts: int):
        import torch
        from mani_skill.examples.motionplanning.panda import solutions

        from par_deploy.sim.env import TASKS, make_env, make_maniskill_env

        spec = TASKS[task]
        self.out_dir, self.control_mode, self.seed, self.max_attempts = out_dir, control_mode, seed, max_attempts
        self.solve = getattr(solutions, PLANNERS[spec.env_id])
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one simulator per core; tiny tensors (docs/design-notes.md §4: +25%)
        self.planner_env = make_maniskill_env(
            spec.env_id,
            obs_mode="none",
            control_mode="pd_joint_pos",
            max_episode_steps=_LONG_HORIZON,
            robot=spec.robot,
        )
        self.env = make_env(task, control_mode=control_mode, image_size=image_size, max_episode_steps=_LONG_HORIZON)
        self.recorder = _ActionRecorder(self.planner_env)

    def run(self, index: int) -> list[tuple]:
        """Make episode ``index`` (written to ``out_dir``); return its messages: ("failed", index, seed, reason,
        plan_s, convert_s) per failed attempt, then ("kept", index, seed, T, plan_s, convert_s) or ("missing",
        index)."""
        messages = []
        for attempt in range(self.max_attempts):
            ep_seed = self.seed + index + attempt * SEED_STRIDE
            t0 = time.perf_counter()
            actions, reason = _plan(self.recorder, self.solve, ep_seed)
            t1 = time.perf_counter()
            if actions is not None:
                ep = _convert(actions, self.planner_env, self.env, self.control_mode, ep_seed)
                if ep["success"]:
                    save_episode(episode_path(self.out_dir, index), ep)
                    messages.append(("kept", index, ep_seed, len(ep["actions"]), t1 - t0, time.perf_counter() - t1))
                    return messages
                reason = f"converted {self.control_mode} replay did not succeed ({len(ep['actions'])} steps)"
            messages.append(("failed", index, ep_seed, reason, t1 - t0, time.perf_counter() - t1))
        messages.append(("missing", index))
        return messages

    def close(self) -> None:
        import torch

        self.env.close()
        self.planner_env.close()
        torch.set_num_threads(self._threads)


def _make_episodes(
    make_worker: Callable[[], Any], todo: list[int], workers: int, handle: _Emit, log: Callable[[str], None]
) -> None:
    """``make_worker().run(index)`` for every index of ``todo``, each message passed to ``handle`` (as the
    index finishes). One worker runs in this process; more run on the process pool (``par_deploy.pool``), where
    an index whose worker crashes is re-run in a fresh worker, ``WORKER_ATTEMPTS`` times at most."""
    if workers == 1:
        worker = make_worker()
        try:
            for index in todo:
                for msg in worker.run(index):
                    handle(msg)
        finally:
            worker.close()
        return
    pool = WorkerPool(
        make_worker,
        workers=workers,
        max_attempts=WORKER_ATTEMPTS,
        name=lambda index: f"demo episode {index}",
        label="demo",
        log=log,
    )
    with pool:
        for done in pool.run(todo):
            for msg in done.result:
                handle(msg)


def _check_demo_args(task: str, n: int, control_mode: str, workers: int, max_attempts: int) -> None:
    from par_deploy.sim.env import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if TASKS[task].env_id not in PLANNERS:
        raise ConfigError(f"no motion planner for {task}")
    if control_mode not in CONTROL_MODES:
        raise ConfigError(
            f"control_mode {control_mode!r} is not reachable from the planner; use one of {CONTROL_MODES}"
        )
    if n < 1 or workers < 1 or max_attempts < 1:
        raise ValueError(f"n ({n}), workers ({workers}) and max_attempts ({max_attempts}) must be >= 1")


def _record(summary: DemoSummary, msg: tuple, console, max_attempts: int) -> bool:
    """Add one worker message (``kept``, ``failed``, ``missing``) to the summary and log it; True when an episode
    index is done (kept, or given up)."""
    kind, index = msg[0], msg[1]
    if kind == "missing":
        summary.missing.append(index)
        console.log(f"ep {index:6d}: no successful demo after {max_attempts} attempts")
        return True
    _, _, ep_seed, detail, plan_s, conv_s = msg
    summary.plan_seconds += plan_s
    summary.convert_seconds += conv_s
    if kind == "failed":
        summary.failed_attempts += 1
        console.log(f"ep {index:6d} seed {ep_seed}: failed: {detail}")
        return False
    summary.kept += 1
    summary.lengths.append(detail)
    console.log(f"ep {index:6d} seed {ep_seed}: T={detail}, plan {plan_s:.2f} s, convert {conv_s:.2f} s")
    return True


def generate_demos(
    task: str,
    n: int,
    out_dir: str | os.PathLike,
    *,
    control_mode: str = "pd_ee_delta_pos",
    image_size: int = 64,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    max_attempts: int = 5,
) -> DemoSummary:
    """Make sure ``out_dir`` holds episodes ``0 .. n-1`` of ``task`` (see the module docstring).

    Episodes already on disk are skipped. ``workers > 1`` runs that many processes (each uses one core) on the
    process pool, which restarts a crashed worker (see the module docstring); they are started with ``spawn``,
    so a calling script needs the usual ``if __name__ == "__main__":`` guard. Returns (and with ``progress``
    prints) a ``DemoSummary``; ``PoolError`` when an episode crashed its worker ``WORKER_ATTEMPTS`` times.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from par_deploy.sim.env import make_env

    _check_demo_args(task, n, control_mode, workers, max_attempts)
    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    for stale in (out / "episodes").glob(".ep_*.tmp"):  # left by an interrupted run
        stale.unlink()
    with make_env(task, control_mode=control_mode, image_size=image_size) as env:
        write_or_check_meta(out, _build_meta(env, task))

    summary = DemoSummary(task=task, out_dir=str(out), requested=n)
    todo = [i for i in range(n) if not episode_path(out, i).exists()]
    summary.existing = n - len(todo)
    console = Console(stderr=True, quiet=not progress, log_path=False)
    columns = (TextColumn(f"{task} demos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        bar_id = bar.add_task("demos", total=n, completed=summary.existing)

        def handle(msg: tuple) -> None:
            if _record(summary, msg, console, max_attempts):
                bar.advance(bar_id)

        if todo:
            make_worker = functools.partial(
                _DemoWorker,
                task=task,
                out_dir=out,
                control_mode=control_mode,
                image_size=image_size,
                seed=seed,
                max_attempts=max_attempts,
            )
            _make_episodes(make_worker, todo, min(workers, len(todo)), handle, console.log)
    summary.missing.sort()
    summary.wall_seconds = time.perf_counter() - t_start
    console.print(str(summary), soft_wrap=True)
    return summary
