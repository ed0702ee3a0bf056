"""One episode: the control loop every consumer shares (``Episode``), its record (``EpisodeRecord``) and the
runner a worker holds (``EpisodeRunner``: a policy, a fresh environment per episode, optional video).

Episode rules: the policy returns chunks of L actions that are executed open-loop. The episode is stepped to
``max_steps`` environment steps (``stop_on_success``: until the first success), so both of ManiSkill's figures
are measured: ``success_once`` (``info["success"]`` at any step; ``success_step`` is the first) and
``success_at_end`` (at the last step; ``None`` with ``stop_on_success``). A policy error (``CacheFullError``:
the static KV-cache ends before the limit; ``ActionError``: a non-finite action) ends the episode as a failure
with its reason in ``error``: ``success_at_end`` is then False and ``success_once`` keeps a success reached
before it.

Isolation: an episode's result depends only on (initial state, policy seed). ManiSkill's CPU physics keeps
state across ``reset`` (measured: the same seed and actions give another trajectory after another episode), so
the runner creates a new environment for every episode, resets the policy with the episode's seed and seeds
the global generators (``protocol.seed_globals``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy.eval.protocol import POLICY_ERRORS, EpisodeJob, EvalError, seed_globals


@dataclass
class EpisodeRecord:
    """What the results file keeps of one episode (``to_dict`` / ``from_dict``: its JSON form)."""

    index: int  # position in the protocol's episode order
    state: int  # initial state i
    env_seed: int  # state_seed_base + i
    policy_seed: int
    success_once: bool = False
    success_at_end: bool | None = False  # None: not measured (stop_on_success, or a crashed stop_on_success run)
    success_step: int | None = None  # env step of the first success (1-based)
    length: int = 0  # env steps executed
    control_steps: int = 0
    act_ms: list[float] = field(default_factory=list)
    act_p50_ms: float | None = None
    act_p90_ms: float | None = None
    error: str | None = None
    crashed: bool = False  # the worker failed on every attempt: a failure, re-run on resume
    attempts: int = 1
    retry_reasons: list[str] = field(default_factory=list)
    first_chunk: list[list[float]] | None = None
    first_obs_sha1: str | None = None
    trajectory_sha1: str | None = None  # every observation and executed action of the episode
    video: str | None = None
    video_predicted: str | None = None
    pid: int | None = None
    seconds: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.state, self.policy_seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def crashed_job(
        cls, job: EpisodeJob, state_seed_base: int, stop_on_success: bool, reasons: Sequence[str]
    ) -> EpisodeRecord:
        """The record of an episode whose worker crashed or hung on every attempt: a failure, flagged."""
        return cls(
            job.index,
            job.state,
            state_seed_base + job.state,
            job.policy_seed,
            success_at_end=None if stop_on_success else False,
            crashed=True,
            attempts=len(reasons),
            retry_reasons=list(reasons),
            error=f"worker failed {len(reasons)} times: {reasons[-1]}",
            pid=None,
        )


@dataclass
class ControlStep:
    """One control step: the chunk the policy returned and what executing it did."""

    index: int  # control step n
    chunk: np.ndarray  # [L, A] in controller units
    act_ms: float
    observations: list[dict[str, np.ndarray]]  # after each executed action of the chunk
    env_steps: int  # env steps of the episode so far
    success: bool  # info["success"] after the last executed action


def obs_sha1(obs: dict[str, np.ndarray], h=None):
    """sha1 of an observation (sorted keys, raw bytes); updates ``h`` when given."""
    own = h is None
    h = hashlib.sha1() if own else h
    for k in sorted(obs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(obs[k]).tobytes())
    return h.hexdigest() if own else h


class Episode:
    """The episode loop: iterate to run it, one ``ControlStep`` per chunk; the outcome is on the object.

    ``par-deploy eval`` runs it to the end; ``par-deploy demo`` prints each step and may stop early (breaking
    out of the loop is fine). ``env`` has the ``ParEnv`` interface; ``policy`` the runtime's ``Policy`` one.
    """

    def __init__(
        self,
        policy,
        env,
        *,
        instruction: str,
        env_seed: int,
        policy_seed: int,
        max_steps: int,
        stop_on_success: bool = False,
    ):
        self.policy, self.env, self.instruction = policy, env, instruction
        self.env_seed, self.policy_seed, self.max_steps = env_seed, policy_seed, max_steps
        self.stop_on_success = stop_on_success
        self.first_obs: dict[str, np.ndarray] | None = None
        self.first_chunk: np.ndarray | None = None
        self.success_once, self.success_step, self.last_success = False, None, False
        self.length, self.error = 0, None
        self.act_ms: list[float] = []
        self.obs: dict[str, np.ndarray] | None = None  # what the policy acts on next
        self._trajectory = hashlib.sha1()
        self._rng: np.random.Generator | None = None

    @property
    def trajectory_sha1(self) -> str:
        return self._trajectory.hexdigest()

    def __iter__(self) -> Iterator[ControlStep]:
        self.start()
        while (noise := self.next_noise()) is not None:
            t0 = time.perf_counter()
            try:
                chunk = self.policy.act(self.obs, noise=noise)
            except POLICY_ERRORS as e:
                self.fail(e)
                return
            yield self.advance(chunk, (time.perf_counter() - t0) * 1e3)

    # The loop in parts, for a runner that acts for several episodes at once (``batched.BatchEpisodeRunner``):
    # start(); then while next_noise() is not None: act on ``obs`` with that noise, advance(chunk) or fail(e).
    def start(self) -> None:
        """Seed, reset the policy with the episode's seed and the environment with its initial state."""
        seed_globals(self.policy_seed)
        self._rng = np.random.default_rng(self.policy_seed)
        self.policy.reset(self.instruction, seed=self.policy_seed)
        self.obs = self.first_obs = self.env.reset(seed=self.env_seed)
        obs_sha1(self.obs, self._trajectory)

    @property
    def done(self) -> bool:
        return self.error is not None or self.length >= self.max_steps or (self.stop_on_success and self.success_once)

    def next_noise(self) -> np.ndarray | None:
        """The noise of the next ``act`` (drawn from the episode's own generator), or None when it is over."""
        if self.done:
            return None
        return self._rng.standard_normal(self.policy.noise_shape()).astype(np.float32)

    def advance(self, chunk: np.ndarray, act_ms: float) -> ControlStep:
        """Execute the chunk the policy returned for ``obs``; ``obs`` becomes the last observation."""
        self.act_ms.append(act_ms)
        if self.first_chunk is None:
            self.first_chunk = np.asarray(chunk, dtype=np.float32)
        seen = self._execute(chunk)
        self.obs = seen[-1]
        return ControlStep(len(self.act_ms) - 1, chunk, act_ms, seen, self.length, self.last_success)

    def fail(self, error: BaseException) -> None:
        """The policy refused to act (a ``POLICY_ERRORS`` error): the episode ends as a failure with its reason."""
        self.error = f"{type(error).__name__}: {error}"

    def _execute(self, chunk: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Step the environment with the chunk's actions until it ends, the limit, or (stop_on_success) a success."""
        seen = []
        for action in chunk:
            obs, _, _, _, info = self.env.step(action)
            self.length += 1
            self._trajectory.update(np.ascontiguousarray(action, dtype=np.float32).tobytes())
            obs_sha1(obs, self._trajectory)
            seen.append(obs)
            self.last_success = bool(info.get("success", False))
            if self.last_success and not self.success_once:
                self.success_once, self.success_step = True, self.length
            if self.length >= self.max_steps or (self.stop_on_success and self.last_success):
                break
        return seen

    def record(self, job: EpisodeJob, seconds: float) -> EpisodeRecord:
        act = self.act_ms
        return EpisodeRecord(
            job.index,
            job.state,
            self.env_seed,
            job.policy_seed,
            success_once=self.success_once,
            success_at_end=None if self.stop_on_success else (self.last_success and self.error is None),
            success_step=self.success_step,
            length=self.length,
            control_steps=len(act),
            act_ms=[round(x, 3) for x in act],
            act_p50_ms=float(np.percentile(act, 50)) if act else None,
            act_p90_ms=float(np.percentile(act, 90)) if act else None,
            error=self.error,
            first_chunk=None if self.first_chunk is None else self.first_chunk.tolist(),
            first_obs_sha1=obs_sha1(self.first_obs) if self.first_obs is not None else None,
            trajectory_sha1=self.trajectory_sha1,
            pid=os.getpid(),
            seconds=seconds,
        )


def check_compatible(spec, env, instruction: str) -> None:
    """Raise ``EvalError`` when the policy's inputs/outputs do not fit the environment."""
    want = {
        "num_cameras": env.num_cameras,
        "image_size": env.image_size,
        "state_dim": env.state_dim,
        "action_dim": env.action_dim,
    }
    bad = {k: (getattr(spec, k), v) for k, v in want.items() if getattr(spec, k) != v}
    if bad:
        detail = ", ".join(f"{k}: policy {a} vs environment {b}" for k, (a, b) in bad.items())
        raise EvalError(f"the policy does not fit the environment ({detail}); check --task and --control-mode")
    if instruction not in spec.instructions:
        raise EvalError(
            f"the policy does not know the task's instruction {instruction!r} (it knows {list(spec.instructions)})"
        )


def _row(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[V, H, W, 3]`` -> ``[H, V*W, 3]`` (cameras side by side)."""
    return np.concatenate(list(np.asarray(frames, dtype=np.uint8)), axis=1)


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """MP4 via imageio (ffmpeg from the imageio-ffmpeg package), written to a temporary name then moved."""
    import imageio.v2 as imageio

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Video:
    """The real frames of an episode and, when the policy predicts frames, the predicted ones beside them."""

    def __init__(self, policy, first_obs: dict[str, np.ndarray]):
        self.predict = getattr(policy, "predict_frame", None)
        self.real, self.pred = [_row(first_obs["rgb"])], []

    def add(self, step: ControlStep) -> None:
        predicted = _row(self.predict()) if self.predict is not None else None
        if predicted is not None and not self.pred:
            self.pred.append(predicted)  # pairs with the first real frame
        for obs in step.observations:
            self.real.append(_row(obs["rgb"]))
            if predicted is not None:
                self.pred.append(predicted)  # the frame predicted for the end of the chunk being executed

    def write(self, out: Path, name: str, fps: float) -> tuple[str, str | None]:
        from par_deploy.locate import portable_path

        out.mkdir(parents=True, exist_ok=True)
        write_video(out / f"{name}.mp4", self.real, fps)
        if not self.pred or len(self.pred) != len(self.real):
            return portable_path(out / f"{name}.mp4"), None
        both = [np.concatenate([a, b], 1) for a, b in zip(self.real, self.pred, strict=True)]  # real | predicted
        write_video(out / f"{name}_pred.mp4", both, fps)
        return portable_path(out / f"{name}.mp4"), portable_path(out / f"{name}_pred.mp4")


class EpisodeRunner:
    """Runs episodes of one policy (loaded once) in a new environment per episode (see the module docstring).

    ``env``: use this environment for every episode instead (the caller gives up isolation)."""

    def __init__(self, setup, policy=None, env=None):
        self.setup = setup
        self.policy = policy if policy is not None else setup.policy.load()
        self._shared_env = env
        self._env = env if env is not None else setup.make_env()  # created now: a broken simulator fails at start
        check_compatible(self.policy.spec, self._env, setup.instruction)

    def close(self) -> None:
        if self._env is not None and self._env is not self._shared_env:
            with contextlib.suppress(Exception):
                self._env.close()
        self._env = None

    def _fresh_env(self):
        if self._shared_env is not None:
            return self._shared_env
        env = self._env if self._env is not None else self.setup.make_env()
        self._env = None
        return env

    def run(self, job: EpisodeJob) -> EpisodeRecord:
        """One episode -> its record."""
        s, t_start = self.setup, time.perf_counter()
        env = self._fresh_env()
        try:
            episode = Episode(
                self.policy,
                env,
                instruction=s.instruction,
                env_seed=s.state_seed_base + job.state,
                policy_seed=job.policy_seed,
                max_steps=s.max_steps,
                stop_on_success=s.stop_on_success,
            )
            video = None
            for step in episode:
                if s.video_dir is not None:
                    video = video or _Video(self.policy, episode.first_obs)
                    video.add(step)
            record = episode.record(job, 0.0)
            if s.video_dir is not None:
                video = video or _Video(self.policy, episode.first_obs)
                fps = float(getattr(getattr(env, "unwrapped", None), "control_freq", None) or 20)
                name = f"{s.task}_{s.label}_state{job.state:03d}_seed{job.policy_seed}"
                record.video, record.video_predicted = video.write(Path(s.video_dir), name, fps)
        finally:
            if env is not self._shared_env:
                with contextlib.suppress(Exception):
                    env.close()
        record.seconds = time.perf_counter() - t_start
        return record
