"""ManiSkill3 success rate of a PAR policy (an engine bundle or the PyTorch reference), the paper's protocol.

Protocol (paper §5.1: 125 rollouts = 25 initial states x 5 seeds)
-----------------------------------------------------------------
Episode ``k`` of an evaluation runs initial state ``i = k // len(seeds)`` with policy seed ``j = seeds[k %
len(seeds)]``; the default 125 episodes and seeds ``0..4`` are the paper's 25 x 5. Any ``episodes`` is a prefix
of the same ordered list, so a longer run extends a shorter one.

- Initial state ``i``: ``env.reset(seed=EVAL_SEED_BASE + i)`` with ``EVAL_SEED_BASE = 500_000``. Demonstrations
  use seeds ``0 .. n-1`` and retry seeds ``>= 10**6`` (``par_deploy.train.demos``), so an evaluation never starts
  from a state the policy was trained on (for up to 500,000 demos).
- Policy seed ``j``: ``policy.reset(seed=j)`` and the sampling noise of every control step drawn here from
  ``np.random.default_rng(j)`` and passed to ``policy.act(obs, noise=...)``. Every backend therefore sees the
  same noise arrays, and every policy evaluated sees the same initial states and noise seeds.
- Episode limit: ``max_steps`` environment steps (default ``TASKS[task].max_episode_steps``: 100 Push/Pick,
  200 Stack). The policy returns chunks of L actions that are executed open-loop.
- Success: the episode is always stepped to the limit (unless ``stop_on_success``), so both of ManiSkill's
  figures are measured: ``success_once`` (``info["success"]`` at any step; ``success_step`` is the first) and
  ``success_at_end`` (at the last step). With ``stop_on_success`` the episode stops at the first success, which
  is cheaper, and ``success_at_end`` is not measured (``None``).
- A policy error ends the episode and is recorded as a failure with its reason (``error``): ``CacheFullError``
  (the static KV-cache ends before the limit) and ``ActionError`` (non-finite action). ``success_at_end`` is then
  False; ``success_once`` keeps a success reached before the error (the same value a ``stop_on_success`` run
  would record).
- Rates come with 95% Wilson score intervals; ``compare`` adds the difference with Newcombe's interval (which
  treats the runs as independent, so it is conservative for these paired runs) and the discordant pairs.

Execution
---------
A ``Rollouts`` backend runs episode jobs and reports one record per job. ``ProcessPoolRollouts`` (CPU) starts
``workers`` spawned processes, each loading its own policy and ``ParEnv`` once. A worker that crashes (exits,
segfaults, raises) or exceeds the per-episode ``timeout`` is killed and restarted and its episode re-run, at most
``max_retries`` times; the retries are kept in the record (``attempts``, ``retry_reasons``), and an episode that
still fails is recorded as a failure with ``crashed: true`` (never dropped; a resumed evaluation re-runs it).
``InlineRollouts`` (``workers=0``) runs in the calling process with no isolation. No GPU-vectorised backend is
included: it would need batched policies (the engines are batch-1 with a static cache) and it cannot be run
here; it would implement the same ``Rollouts`` protocol over ``gym.make(..., num_envs=N,
sim_backend="physx_cuda")``.

Results file (``json_path``): written atomically after every episode. Running again with the same file resumes:
episodes recorded for the same protocol and policy are skipped; a file written for another protocol or policy
is refused (``EvalMismatch``) naming the differing fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from par_deploy.errors import ActionError, CacheFullError, ParError

FORMAT = "par-eval"
VERSION = 1
EVAL_SEED_BASE = 500_000  # initial state i -> env.reset(seed=EVAL_SEED_BASE + i); demos use 0..n-1 and >= 10**6
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_EPISODES = 125
DEFAULT_TIMEOUT = 600.0  # seconds per episode
STARTUP_TIMEOUT = 300.0  # seconds for a worker to load its policy and environment (at least the episode timeout)
DEFAULT_RETRIES = 2
Z95 = 1.959963984540054
POLICY_ERRORS = (CacheFullError, ActionError)  # outcomes of the policy: end the episode, recorded, not retried


class EvalError(ParError, RuntimeError):
    """The evaluation cannot run (bad arguments, a worker that cannot start, a missing checkpoint)."""


class EvalMismatch(ParError, ValueError):
    """A results file was written for another protocol or policy, so it cannot be resumed."""


# ----------------------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(nan, nan)`` for ``n == 0``."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no 1e-17 rounding residue)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval of ``p1 - p2`` from the two Wilson intervals (Newcombe 1998, method 10; independent samples)."""
    if n1 <= 0 or n2 <= 0:
        return (math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def _rate(successes: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(successes, n)
    return {"successes": successes, "n": n, "rate": successes / n if n else None,
            "ci95": [lo, hi] if n else None}


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a run's episode records (see ``EpisodeRunner.run`` for a record's fields)."""
    n = len(records)
    once = sum(bool(r["success_once"]) for r in records)
    at_end = [r for r in records if r["success_at_end"] is not None]
    act = [x for r in records for x in r["act_ms"]]
    errors: dict[str, int] = {}
    for r in records:
        if r["error"]:
            kind = "crashed" if r.get("crashed") else r["error"].split(":", 1)[0]
            errors[kind] = errors.get(kind, 0) + 1
    return {
        "episodes": n,
        "success_once": _rate(once, n),
        "success_at_end": _rate(sum(bool(r["success_at_end"]) for r in at_end), len(at_end)) if at_end else None,
        "length": _stats([r["length"] for r in records if not r.get("crashed")]),  # env steps executed
        "success_step": _stats([r["success_step"] for r in records if r["success_step"] is not None]),
        "act_ms": {
            "calls": len(act),
            "p50": float(np.percentile(act, 50)) if act else None,
            "p90": float(np.percentile(act, 90)) if act else None,
            "mean": float(np.mean(act)) if act else None,
            "max": float(np.max(act)) if act else None,
        },
        "errors": errors,
        "crashed": sum(bool(r.get("crashed")) for r in records),
        "retried": sum(r.get("attempts", 1) > 1 for r in records),
        "episode_seconds": _stats([r["seconds"] for r in records]),
    }


def compare_runs(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``a`` (engine) against ``b`` (reference) on the episodes both recorded (same state and policy seed)."""
    bk = {(r["state"], r["policy_seed"]): r for r in b}
    pairs = [(r, bk[(r["state"], r["policy_seed"])]) for r in a if (r["state"], r["policy_seed"]) in bk]
    out: dict[str, Any] = {"paired_episodes": len(pairs)}
    for metric in ("success_once", "success_at_end"):
        ps = [(x[metric], y[metric]) for x, y in pairs if x[metric] is not None and y[metric] is not None]
        if not ps:
            out[metric] = None
            continue
        k1, k2, n = sum(bool(x) for x, _ in ps), sum(bool(y) for _, y in ps), len(ps)
        out[metric] = {
            "a": k1 / n, "b": k2 / n, "difference": (k1 - k2) / n,
            "ci95_unpaired": list(newcombe_interval(k1, n, k2, n)),
            "only_a": sum(bool(x) and not bool(y) for x, y in ps),
            "only_b": sum(bool(y) and not bool(x) for x, y in ps),
        }
    diffs, same_obs = [], 0
    for x, y in pairs:
        if x.get("first_chunk") is None or y.get("first_chunk") is None:
            continue
        diffs.append(float(np.abs(np.asarray(x["first_chunk"]) - np.asarray(y["first_chunk"])).max()))
        same_obs += x.get("first_obs_sha1") == y.get("first_obs_sha1")
    out["first_chunk_max_abs_diff"] = max(diffs) if diffs else None
    out["first_chunk_median_abs_diff"] = float(np.median(diffs)) if diffs else None
    out["first_chunk_compared"] = len(diffs)
    out["first_obs_identical"] = same_obs  # how many of those episodes started from bit-identical observations
    return out


def parse_seeds(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"0-4"``, ``"0,1,2"``, ``"0-2,7"`` or a sequence of ints -> a tuple of unique seeds (order kept)."""
    if text is None:
        return DEFAULT_SEEDS
    if isinstance(text, str):
        seeds: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
            except ValueError:
                raise EvalError(f"--seeds: cannot read {part!r}; write e.g. 0-4 or 0,1,2,3,4") from None
    else:
        seeds = [int(s) for s in text]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise EvalError(f"policy seeds must be a non-empty list of distinct non-negative ints, got {seeds}")
    return tuple(seeds)


# ----------------------------------------------------------------------------------------------------------
# What is evaluated


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read ({e})") from None


@dataclass(frozen=True)
class PolicySource:
    """A picklable description of a policy that a worker turns into a ``Policy`` (``load``).

    ``kind="checkpoint"``: the PyTorch reference (``TorchPolicy``) of a checkpoint directory, with ``sampler`` /
    ``steps`` (default: the checkpoint's own). ``kind="engine"``: a bundle loaded with
    ``par_deploy.runtime.load(path, backend)``. ``threads``: compute threads per worker.
    """

    kind: str
    path: str
    sampler: str | None = None
    steps: int | None = None
    backend: str = "onnx"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("checkpoint", "engine"):
            raise EvalError(f"policy kind must be 'checkpoint' or 'engine', got {self.kind!r}")
        object.__setattr__(self, "path", str(self.path))

    @classmethod
    def checkpoint(cls, path: str | os.PathLike, sampler: str | None = None, steps: int | None = None,
                   threads: int = 1) -> PolicySource:
        return cls("checkpoint", str(path), sampler=sampler, steps=steps, threads=threads)

    @classmethod
    def engine(cls, path: str | os.PathLike, backend: str = "onnx", threads: int = 1) -> PolicySource:
        return cls("engine", str(path), backend=backend, threads=threads)

    @property
    def label(self) -> str:
        return "engine" if self.kind == "engine" else "reference"

    def manifest(self) -> dict[str, Any]:
        from par_deploy.runtime.bundle import read_manifest

        return read_manifest(self.path)

    def config(self) -> dict[str, Any]:
        """The model config as a dict (read without torch)."""
        if self.kind == "engine":
            return self.manifest()["config"]
        path = Path(self.path)
        if not (path / "config.json").is_file():
            raise EvalError(f"{path}: not a checkpoint directory (no config.json)")
        return _read_json(path / "config.json")

    def identity(self) -> dict[str, Any]:
        """What makes two evaluations of this policy the same (not the path: a moved checkpoint is the same)."""
        if self.kind == "engine":
            m = self.manifest()
            return {"kind": "engine", "checkpoint_hash": m["checkpoint_hash"], "backend": self.backend,
                    "precision": m["precision"], "sampler": m["sampler"]["kind"], "steps": int(m["sampler"]["steps"])}
        from par_deploy.runtime.bundle import checkpoint_digest

        cfg = self.config()
        return {"kind": "checkpoint", "checkpoint_hash": checkpoint_digest(self.path),
                "sampler": self.sampler or cfg["sampler"], "steps": int(self.steps or cfg["sample_steps"])}

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "path": self.path, "threads": self.threads}

    def load(self):
        """Build the ``Policy`` (imports torch for a checkpoint; ``par_deploy.export`` for an engine)."""
        if self.kind == "checkpoint":
            import torch

            from par_deploy.reference import TorchPolicy

            torch.set_num_threads(self.threads)
            return TorchPolicy.from_pretrained(self.path, sampler=self.sampler, steps=self.steps)
        from par_deploy.runtime import load  # engines need only the runtime, not the export stack

        return load(self.path, backend=self.backend, threads=self.threads)


def reference_for(engine: PolicySource, checkpoint: str | os.PathLike | None = None) -> PolicySource:
    """The PyTorch reference of an engine bundle, with the bundle's sampler and K (so both draw the same noise).

    ``checkpoint`` defaults to the bundle's ``source_checkpoint``; it must be the checkpoint the bundle was
    exported from (same sha256)."""
    from par_deploy.runtime.bundle import checkpoint_digest

    m = engine.manifest()
    if checkpoint is None:
        src = m.get("source_checkpoint")
        candidates = [] if not src else [Path(src), Path(engine.path) / src, Path(engine.path).parent / src]
        found = next((c for c in candidates if (c / "config.json").is_file()), None)
        if found is None:
            raise EvalError(
                f"{engine.path}: the manifest's source checkpoint {src!r} is not found here; pass --checkpoint"
            )
        checkpoint = found
    try:
        digest = checkpoint_digest(checkpoint)
    except ParError as e:
        raise EvalError(str(e)) from None
    if digest != m["checkpoint_hash"]:
        raise EvalError(
            f"{checkpoint} is not the checkpoint {engine.path} was exported from (sha256 {digest[:12]}... vs "
            f"{m['checkpoint_hash'][:12]}... in the manifest); a comparison would be meaningless"
        )
    return PolicySource.checkpoint(checkpoint, sampler=m["sampler"]["kind"], steps=int(m["sampler"]["steps"]),
                                   threads=engine.threads)


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
        return factory(self.task, control_mode=self.control_mode, image_size=self.image_size,
                       max_episode_steps=self.max_steps)


@dataclass(frozen=True)
class EpisodeJob:
    index: int  # position in the protocol's episode order
    state: int  # initial state i: env.reset(seed=state_seed_base + i)
    policy_seed: int  # j: policy.reset(seed=j) and the noise RNG

    @property
    def key(self) -> tuple[int, int]:
        return (self.state, self.policy_seed)


def episode_jobs(episodes: int, seeds: Sequence[int]) -> list[EpisodeJob]:
    """The protocol's first ``episodes`` jobs: job k runs state ``k // len(seeds)`` with seed ``seeds[k % len]``."""
    n = len(seeds)
    return [EpisodeJob(k, k // n, int(seeds[k % n])) for k in range(episodes)]


# ----------------------------------------------------------------------------------------------------------
# One episode


def _obs_sha1(obs: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for k in sorted(obs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(obs[k]).tobytes())
    return h.hexdigest()


def _row(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[V, H, W, 3]`` -> ``[H, V*W, 3]`` (cameras side by side)."""
    return np.concatenate(list(np.asarray(frames, dtype=np.uint8)), axis=1)


def check_compatible(spec, env, instruction: str) -> None:
    """Raise ``EvalError`` when the policy's inputs/outputs do not fit the environment."""
    want = {"num_cameras": env.num_cameras, "image_size": env.image_size, "state_dim": env.state_dim,
            "action_dim": env.action_dim}
    bad = {k: (getattr(spec, k), v) for k, v in want.items() if getattr(spec, k) != v}
    if bad:
        detail = ", ".join(f"{k}: policy {a} vs environment {b}" for k, (a, b) in bad.items())
        raise EvalError(f"the policy does not fit the environment ({detail}); check --task and --control-mode")
    if instruction not in spec.instructions:
        raise EvalError(f"the policy does not know the task's instruction {instruction!r} (it knows "
                        f"{list(spec.instructions)})")


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """MP4 via imageio (ffmpeg from the imageio-ffmpeg package), written to a temporary name then moved."""
    import imageio.v2 as imageio

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class EpisodeRunner:
    """Runs episodes of one policy in one environment (a worker holds one for its lifetime)."""

    def __init__(self, setup: RolloutSetup, policy=None, env=None):
        self.setup = setup
        self.policy = policy if policy is not None else setup.policy.load()
        self.env = env if env is not None else setup.make_env()
        check_compatible(self.policy.spec, self.env, setup.instruction)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.env.close()

    def run(self, job: EpisodeJob) -> dict[str, Any]:
        """One episode -> its record (a JSON-able dict)."""
        s, policy, env = self.setup, self.policy, self.env
        t_start = time.perf_counter()
        rng = np.random.default_rng(job.policy_seed)
        policy.reset(s.instruction, seed=job.policy_seed)
        obs = env.reset(seed=s.state_seed_base + job.state)
        first_sha = _obs_sha1(obs)
        video = s.video_dir is not None
        predict = getattr(policy, "predict_frame", None) if video else None
        real: list[np.ndarray] = [_row(obs["rgb"])] if video else []
        pred: list[np.ndarray] = []
        steps, success_once, success_step, last_success = 0, False, None, False
        act_ms: list[float] = []
        first_chunk, error = None, None
        while steps < s.max_steps:
            noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
            t0 = time.perf_counter()
            try:
                chunk = policy.act(obs, noise=noise)
            except POLICY_ERRORS as e:
                error = f"{type(e).__name__}: {e}"
                break
            act_ms.append((time.perf_counter() - t0) * 1e3)
            if first_chunk is None:
                first_chunk = np.asarray(chunk, dtype=np.float32).tolist()
            predicted = _row(predict()) if predict is not None else None
            if video and predicted is not None and not pred:
                pred.append(predicted)  # pairs with the first real frame
            for action in chunk:
                obs, _, _, _, info = env.step(action)
                steps += 1
                last_success = bool(info.get("success", False))
                if last_success and not success_once:
                    success_once, success_step = True, steps
                if video:
                    real.append(_row(obs["rgb"]))
                    if predicted is not None:
                        pred.append(predicted)  # the frame predicted for the end of the chunk being executed
                if steps >= s.max_steps or (s.stop_on_success and last_success):
                    break
            if s.stop_on_success and success_once:
                break
        record: dict[str, Any] = {
            "index": job.index,
            "state": job.state,
            "env_seed": s.state_seed_base + job.state,
            "policy_seed": job.policy_seed,
            "success_once": success_once,
            "success_at_end": None if s.stop_on_success else (last_success and error is None),
            "success_step": success_step,
            "length": steps,
            "control_steps": len(act_ms),
            "act_ms": [round(x, 3) for x in act_ms],
            "act_p50_ms": float(np.percentile(act_ms, 50)) if act_ms else None,
            "act_p90_ms": float(np.percentile(act_ms, 90)) if act_ms else None,
            "error": error,
            "crashed": False,
            "attempts": 1,
            "retry_reasons": [],
            "first_chunk": first_chunk,
            "first_obs_sha1": first_sha,
            "video": None,
            "pid": os.getpid(),
        }
        if video:
            out = Path(s.video_dir)
            out.mkdir(parents=True, exist_ok=True)
            name = f"{s.task}_{s.label}_state{job.state:03d}_seed{job.policy_seed}"
            fps = float(getattr(getattr(env, "unwrapped", None), "control_freq", None) or 20)
            write_video(out / f"{name}.mp4", real, fps)
            record["video"] = str(out / f"{name}.mp4")
            if pred and len(pred) == len(real):
                both = [np.concatenate([a, b], 1) for a, b in zip(real, pred, strict=True)]  # real | predicted
                write_video(out / f"{name}_pred.mp4", both, fps)
                record["video_predicted"] = str(out / f"{name}_pred.mp4")
        record["seconds"] = time.perf_counter() - t_start
        return record


def crash_record(job: EpisodeJob, setup: RolloutSetup, reasons: list[str]) -> dict[str, Any]:
    """The record of an episode whose worker crashed or hung on every attempt: a failure, flagged."""
    return {
        "index": job.index, "state": job.state, "env_seed": setup.state_seed_base + job.state,
        "policy_seed": job.policy_seed, "success_once": False, "success_at_end": None if setup.stop_on_success
        else False, "success_step": None, "length": 0, "control_steps": 0, "act_ms": [], "act_p50_ms": None,
        "act_p90_ms": None, "error": f"worker failed {len(reasons)} times: {reasons[-1]}", "crashed": True,
        "attempts": len(reasons), "retry_reasons": list(reasons), "first_chunk": None, "first_obs_sha1": None,
        "video": None, "pid": None, "seconds": 0.0,
    }


# ----------------------------------------------------------------------------------------------------------
# Rollout backends


class Rollouts(Protocol):
    """Runs episode jobs of one ``RolloutSetup`` and calls ``on_record`` (in the caller's thread) once per job.

    The CPU process pool implements it; a GPU-vectorised ManiSkill backend (one ``physx_cuda`` environment with
    ``num_envs`` sub-scenes stepped in lockstep, a batched policy) would implement the same two methods."""

    def run(self, jobs: Sequence[EpisodeJob], on_record: Callable[[dict[str, Any]], None]) -> None: ...

    def close(self) -> None: ...


class InlineRollouts:
    """Episodes in the calling process (``workers=0``): no isolation, no timeout; an exception propagates."""

    def __init__(self, setup: RolloutSetup):
        self.setup = setup
        self._runner: EpisodeRunner | None = None

    def run(self, jobs: Sequence[EpisodeJob], on_record: Callable[[dict[str, Any]], None]) -> None:
        if jobs and self._runner is None:
            self._runner = EpisodeRunner(self.setup)
        for job in jobs:
            on_record(self._runner.run(job))

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def _worker_main(setup: RolloutSetup, conn) -> None:
    """A pool worker: load policy + env once, then run the jobs the parent sends until it sends ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers (JSON is saved)
    try:
        runner = EpisodeRunner(setup)
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("init_error", traceback.format_exc()))
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
                conn.send(("crash", f"{type(e).__name__}: {e}", traceback.format_exc()))
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


class ProcessPoolRollouts:
    """``workers`` spawned CPU processes, each with its own policy and environment (loaded once).

    A worker that dies or exceeds ``timeout`` seconds on an episode (``STARTUP_TIMEOUT`` on start-up) is
    killed and restarted; its episode is re-run up to ``max_retries`` times, then recorded as a crashed
    failure. Each worker gets ``OMP_NUM_THREADS=<policy threads>`` and ``LP_NUM_THREADS=0`` (single-threaded
    lavapipe: one core per worker) unless those variables are already set."""

    def __init__(self, setup: RolloutSetup, workers: int = 1, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_RETRIES, log: Callable[[str], None] | None = None):
        if workers < 1:
            raise EvalError(f"workers must be >= 1, got {workers}")
        self.setup, self.workers, self.timeout, self.max_retries = setup, workers, timeout, max_retries
        self.startup_timeout = max(timeout, STARTUP_TIMEOUT)  # imports, policy load, Vulkan/scene set-up
        self.log = log or (lambda msg: None)
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold a Vulkan instance
        self._slots: list[_Slot] = []
        self.restarts = 0

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

    def run(self, jobs: Sequence[EpisodeJob], on_record: Callable[[dict[str, Any]], None]) -> None:
        pending = deque(jobs)
        reasons: dict[tuple[int, int], list[str]] = {}
        if not pending:
            return
        while len(self._slots) < min(self.workers, len(pending)):
            self._slots.append(_Slot())
        for slot in self._slots:
            if slot.state == "down":
                self._start(slot)

        def fail(slot: _Slot, reason: str) -> None:
            job = slot.job
            if slot.state == "starting":
                slot.start_failures += 1
                if slot.start_failures > self.max_retries:
                    raise EvalError(f"a worker failed to start {slot.start_failures} times; last: {reason}")
            self._stop(slot, kill=True)
            if job is not None:
                rs = reasons.setdefault(job.key, [])
                rs.append(reason)
                self.log(f"state {job.state} seed {job.policy_seed}: {reason} (attempt {len(rs)})")
                if len(rs) > self.max_retries:
                    on_record(crash_record(job, self.setup, rs))
                else:
                    pending.appendleft(job)
            if pending or any(s.state == "busy" for s in self._slots):
                self.restarts += 1
                self._start(slot)

        while pending or any(s.state == "busy" for s in self._slots):
            for slot in self._slots:
                if slot.state == "idle" and pending:
                    job = pending.popleft()
                    slot.state, slot.job, slot.since = "busy", job, time.monotonic()
                    try:
                        slot.conn.send(job)
                    except (OSError, ValueError) as e:
                        fail(slot, f"worker unreachable ({e})")
                elif slot.state == "idle" and not pending:
                    self._stop_idle(slot)
            live = [s for s in self._slots if s.state in ("starting", "busy")]
            if not live:
                continue
            mp_wait([s.conn for s in live] + [s.proc.sentinel for s in live], timeout=1.0)
            for slot in live:
                try:
                    while slot.state in ("starting", "busy") and slot.conn.poll():
                        self._handle(slot, slot.conn.recv(), on_record, reasons, fail)
                except (EOFError, OSError):
                    pass  # the process is gone: handled below
                if slot.state not in ("starting", "busy"):
                    continue
                if not slot.proc.is_alive():
                    fail(slot, f"worker pid {slot.proc.pid} died (exit code {slot.proc.exitcode})")
                else:
                    limit = self.startup_timeout if slot.state == "starting" else self.timeout
                    if time.monotonic() - slot.since > limit:
                        what = "start-up" if slot.state == "starting" else "episode"
                        fail(slot, f"worker pid {slot.proc.pid} timed out ({what} > {limit:g} s)")

    def _stop_idle(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            slot.conn.send(None)
        self._stop(slot, kill=False)

    def _handle(self, slot: _Slot, msg: tuple, on_record, reasons, fail) -> None:
        kind = msg[0]
        if kind == "ready":
            slot.state, slot.since = "idle", time.monotonic()
        elif kind == "init_error":
            self.close()
            raise EvalError(f"a worker could not load the policy or the environment:\n{msg[1]}")
        elif kind == "result":
            record = msg[1]
            rs = reasons.pop(slot.job.key, [])
            record["attempts"], record["retry_reasons"] = len(rs) + 1, rs
            slot.state, slot.job = "idle", None
            on_record(record)
        elif kind == "crash":
            self.log(msg[2].rstrip())
            fail(slot, f"worker raised {msg[1]}")

    def close(self) -> None:
        for slot in self._slots:
            if slot.state == "idle":
                self._stop_idle(slot)
            else:
                self._stop(slot, kill=True)
        self._slots = []


# ----------------------------------------------------------------------------------------------------------
# Results file


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("par-deploy", "numpy", "torch", "onnxruntime", "mani-skill", "sapien"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "loadavg": load,
        "python": sys.version.split()[0], "packages": versions,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LP_NUM_THREADS", "PAR_THREADS",
                                               "VK_ICD_FILENAMES", "CUDA_VISIBLE_DEVICES")},
    }


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} in the file vs {new.get(k)!r} now" for k in keys)


def load_resume(path: str | os.PathLike | None, protocol: dict[str, Any],
                policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results document to continue: a new one, or ``path``'s after checking that it was written for the
    same protocol and, for each label in ``policies``, the same policy identity (else ``EvalMismatch``)."""
    fresh = {"format": FORMAT, "version": VERSION, "protocol": protocol, "runs": {}, "compare": None}
    if path is None or not Path(path).exists():
        return fresh
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalMismatch(f"{path}: exists but is not a readable results file ({e}); "
                           "move it or use another --json") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EvalMismatch(f"{path}: not a par-deploy evaluation file (format {doc.get('format')!r}); "
                           "use another --json path")
    if doc.get("version") != VERSION:
        raise EvalMismatch(f"{path}: results format version {doc.get('version')!r}, this par-deploy writes {VERSION}")
    if doc.get("protocol") != protocol:
        raise EvalMismatch(f"{path} was written for another evaluation protocol ({_diff(doc['protocol'], protocol)});"
                           " use another --json path to keep both")
    for label, identity in policies.items():
        run = doc.get("runs", {}).get(label)
        if run is not None and run.get("policy") != identity:
            raise EvalMismatch(f"{path}: its {label!r} run evaluated another policy "
                               f"({_diff(run.get('policy') or {}, identity)}); use another --json path")
    doc.setdefault("runs", {})
    return doc


def completed(doc: dict[str, Any], label: str) -> dict[tuple[int, int], dict[str, Any]]:
    """Episodes of run ``label`` already recorded, by (state, policy seed); crashed ones are not (re-run them)."""
    run = doc.get("runs", {}).get(label) or {}
    return {(r["state"], r["policy_seed"]): r for r in run.get("episodes", []) if not r.get("crashed")}


# ----------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class RunResult:
    label: str
    policy: dict[str, Any]
    episodes: list[dict[str, Any]]
    summary: dict[str, Any]
    wall_seconds: float


@dataclass
class EvalResult:
    task: str
    protocol: dict[str, Any]
    runs: dict[str, RunResult]
    compare: dict[str, Any] | None = None
    json_path: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # episodes taken from the results file, per run

    @property
    def main(self) -> RunResult:
        return next(iter(self.runs.values()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _protocol(task: str, instruction: str, control_mode: str, image_size: int, max_steps: int,
              seeds: Sequence[int], state_seed_base: int, stop_on_success: bool) -> dict[str, Any]:
    from par_deploy.sim.env import TASKS

    return {"task": task, "env_id": TASKS[task].env_id, "instruction": instruction, "control_mode": control_mode,
            "image_size": image_size, "max_steps": max_steps, "state_seed_base": state_seed_base,
            "policy_seeds": list(seeds), "episode_order": "state-major: episode k = (k // len(seeds), "
            "seeds[k % len(seeds)])", "stop_on_success": stop_on_success}


def evaluate(
    task: str,
    policy_spec: PolicySource,
    *,
    episodes: int = DEFAULT_EPISODES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    workers: int = 1,
    json_path: str | os.PathLike | None = None,
    video_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    control_mode: str | None = None,
    reference: PolicySource | None = None,
    stop_on_success: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_RETRIES,
    state_seed_base: int = EVAL_SEED_BASE,
    env_factory: Callable[..., Any] | None = None,
    command: dict[str, Any] | None = None,
    progress: bool = True,
    console=None,
) -> EvalResult:
    """Evaluate ``policy_spec`` on ``task`` with the protocol of the module docstring; with ``reference``
    (``--compare``) evaluate it too on the same states and seeds and compare the two.

    ``workers=0`` runs in this process; ``workers >= 1`` uses a spawned process pool (a calling script needs the
    ``if __name__ == "__main__":`` guard). ``control_mode`` defaults to the one the checkpoint was trained with
    (``config.extra``), else ``pd_ee_delta_pos``; the image size is the policy's.
    """
    from rich.console import Console

    from par_deploy.sim.env import TASKS

    console = console or Console(stderr=True, quiet=not progress, log_path=False)
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    spec = TASKS[task]
    seeds = parse_seeds(seeds)
    max_steps = int(max_steps or spec.max_episode_steps)
    if episodes < 1 or workers < 0 or max_steps < 1 or timeout <= 0 or max_retries < 0:
        raise EvalError(f"need episodes >= 1 ({episodes}), workers >= 0 ({workers}), max_steps >= 1 ({max_steps}), "
                        f"timeout > 0 ({timeout}), max_retries >= 0 ({max_retries})")
    cfg = policy_spec.config()
    extra = cfg.get("extra") or {}
    if extra.get("task") not in (None, task):
        raise EvalError(f"{policy_spec.path} was trained on {extra['task']} (config extra.task), not {task}")
    control_mode = control_mode or extra.get("control_mode") or "pd_ee_delta_pos"
    image_size = int(cfg["image_size"])
    if spec.instruction not in cfg["instructions"]:
        raise EvalError(f"{policy_spec.path}: the policy does not know {task}'s instruction {spec.instruction!r} "
                        f"(it knows {cfg['instructions']})")
    blocks_needed = -(-max_steps // int(cfg["chunk_len"]))
    if int(cfg["max_blocks"]) < blocks_needed:
        console.print(f"[yellow]warning:[/] the policy's KV-cache holds {cfg['max_blocks']} control steps = "
                      f"{int(cfg['max_blocks']) * int(cfg['chunk_len'])} env steps < the limit {max_steps}: "
                      "episodes will end with CacheFullError (recorded as failures)")
    if video_dir is not None:
        try:
            import imageio.v2  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError as e:
            raise EvalError(f"--video needs imageio and imageio-ffmpeg ({e}): pip install imageio-ffmpeg") from e

    policies = [policy_spec] + ([reference] if reference is not None else [])
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        labels = [labels[0], "reference"] if labels[0] != "reference" else ["policy", "reference"]
    identities = {label: p.identity() for label, p in zip(labels, policies, strict=True)}
    protocol = _protocol(task, spec.instruction, control_mode, image_size, max_steps, seeds, state_seed_base,
                         stop_on_success)
    json_path = Path(json_path) if json_path is not None else None
    doc = load_resume(json_path, protocol, identities)
    doc["machine"] = machine_info()
    doc["arguments"] = {"task": task, "policy": policy_spec.describe(),
                        "reference": reference.describe() if reference else None, "episodes": episodes,
                        "seeds": list(seeds), "workers": workers, "max_steps": max_steps, "timeout": timeout,
                        "max_retries": max_retries, "video_dir": str(video_dir) if video_dir else None,
                        "json_path": str(json_path) if json_path else None}
    doc["command"] = command
    jobs = episode_jobs(episodes, seeds)
    result = EvalResult(task, protocol, {}, json_path=str(json_path) if json_path else None)

    for label, source in zip(labels, policies, strict=True):
        book = _RunBook(doc, label, identities[label], source, jobs, json_path)
        result.skipped[label] = len(jobs) - len(book.todo)
        setup = RolloutSetup(task=task, policy=source, instruction=spec.instruction, control_mode=control_mode,
                             image_size=image_size, max_steps=max_steps, state_seed_base=state_seed_base,
                             stop_on_success=stop_on_success, video_dir=str(video_dir) if video_dir else None,
                             label=label, env_factory=env_factory)
        if book.todo:
            console.log(f"{task} {label}: {len(book.todo)} episodes to run, {result.skipped[label]} already "
                        f"recorded; {f'{workers} worker process(es)' if workers else 'in this process'}")
        _run_jobs(setup, book, workers, timeout, max_retries, console, progress)
        book.save()
        result.runs[label] = RunResult(label, identities[label], book.records(), book.run["summary"],
                                       book.run["wall_seconds"])

    if reference is not None:
        a, b = (result.runs[lb].episodes for lb in labels)
        result.compare = {"a": labels[0], "b": labels[1], **compare_runs(a, b)}
        doc["compare"] = result.compare
        if json_path is not None:
            _write_json_atomic(json_path, doc)
    return result


class _RunBook:
    """The records of one run inside the results document; saves the document after every episode."""

    def __init__(self, doc: dict[str, Any], label: str, identity: dict[str, Any], source: PolicySource,
                 jobs: Sequence[EpisodeJob], json_path: Path | None):
        self.doc, self.label, self.json_path = doc, label, json_path
        self.run = doc["runs"].setdefault(label, {"policy": identity, "episodes": [], "wall_seconds": 0.0})
        self.run["source"] = source.describe()
        self.by_key = completed(doc, label)  # crashed episodes are dropped here and re-run
        self.wanted = {j.key for j in jobs}
        self.total = len(jobs)
        self.todo = [j for j in jobs if j.key not in self.by_key]
        self._wall0, self._t0 = float(self.run.get("wall_seconds", 0.0)), time.perf_counter()

    def records(self) -> list[dict[str, Any]]:
        """This evaluation's episodes (a longer earlier run may hold more), in protocol order."""
        return sorted((r for k, r in self.by_key.items() if k in self.wanted), key=lambda r: r["index"])

    def add(self, record: dict[str, Any]) -> None:
        self.by_key[(record["state"], record["policy_seed"])] = record
        self.save()

    def save(self) -> None:
        self.run["episodes"] = sorted(self.by_key.values(), key=lambda r: r["index"])
        self.run["summary"] = summarize(self.records())
        self.run["wall_seconds"] = self._wall0 + time.perf_counter() - self._t0
        if self.json_path is not None:
            self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _write_json_atomic(self.json_path, self.doc)


def _run_jobs(setup: RolloutSetup, book: _RunBook, workers: int, timeout: float, max_retries: int, console,
              progress: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def running() -> str:
        recs = book.records()
        k = sum(bool(r["success_once"]) for r in recs)
        return f"success_once {k}/{len(recs)}" + (f" ({100 * k / len(recs):.0f}%)" if recs else "")

    columns = (TextColumn(f"{setup.task} {book.label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        bar_id = bar.add_task(book.label, total=book.total, completed=book.total - len(book.todo), rate=running())

        def on_record(record: dict[str, Any]) -> None:
            book.add(record)
            bar.update(bar_id, advance=1, rate=running())
            if record["error"]:
                console.log(f"{book.label} state {record['state']} seed {record['policy_seed']}: {record['error']}")

        if not book.todo:
            return
        rollouts: Rollouts = (InlineRollouts(setup) if workers == 0 else
                              ProcessPoolRollouts(setup, workers, timeout, max_retries, log=console.log))
        try:
            rollouts.run(book.todo, on_record)
        finally:
            rollouts.close()


# ----------------------------------------------------------------------------------------------------------
# Report and CLI entry


def _pct(rate: dict[str, Any] | None) -> str:
    if not rate or rate["rate"] is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({rate['successes']}/{rate['n']})"


def print_report(result: EvalResult, console=None) -> None:
    """A table of every run (a column each; with a comparison, the difference) on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p = result.protocol
    runs = list(result.runs.values())
    c = result.compare
    table = Table(title=f"{result.task}: {p['max_steps']} steps, seeds {p['policy_seeds']}, initial states from "
                        f"seed {p['state_seed_base']}, {p['control_mode']}")
    table.add_column("")
    for run in runs:
        table.add_column(f"{run.label}\n{run.policy['kind']}, {run.policy['sampler']}-{run.policy['steps']}",
                         justify="right")
    if c:
        table.add_column(f"{c['a']} - {c['b']}", justify="right")
        table.caption = (f"difference in points [95% CI, Newcombe, unpaired] (episodes only {c['a']} / only "
                         f"{c['b']} succeeded)")

    def diff(metric: str) -> list[str]:
        m = c and c[metric]
        if not c:
            return []
        if not m:
            return ["-"]
        lo, hi = m["ci95_unpaired"]
        return [f"{100 * m['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({m['only_a']}/{m['only_b']})"]

    def stats(d: dict[str, float] | None, fmt: str = ".1f") -> str:
        return f"{d['mean']:{fmt}} / {d['min']:.0f} / {d['max']:.0f}" if d else "-"

    def errors(s: dict[str, Any]) -> str:
        text = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
        return text + (f" (retried {s['retried']})" if s["retried"] else "")

    sums = [r.summary for r in runs]
    table.add_row("episodes", *[str(s["episodes"]) for s in sums], *([str(c["paired_episodes"])] if c else []))
    table.add_row("success_once [95% CI]", *[_pct(s["success_once"]) for s in sums], *diff("success_once"))
    table.add_row("success_at_end [95% CI]", *[_pct(s["success_at_end"]) for s in sums], *diff("success_at_end"))
    table.add_row("first success step mean/min/max", *[stats(s["success_step"]) for s in sums], *([""] if c else []))
    table.add_row("length mean/min/max", *[stats(s["length"]) for s in sums], *([""] if c else []))
    table.add_row("act ms p50 / p90", *[f"{s['act_ms']['p50']:.1f} / {s['act_ms']['p90']:.1f}"
                                          if s["act_ms"]["p50"] is not None else "-" for s in sums],
                  *([""] if c else []))
    table.add_row("errors", *[errors(s) for s in sums], *([""] if c else []))
    table.add_row("wall s", *[f"{r.wall_seconds:.0f}" for r in runs], *([""] if c else []))
    if c and c["first_chunk_max_abs_diff"] is not None:
        table.add_row("first chunk max |diff|", *["" for _ in runs],
                      f"{c['first_chunk_max_abs_diff']:.2e} ({c['first_chunk_compared']} ep.)")
    console.print(table)
    if c and c["first_chunk_compared"] and c["first_obs_identical"] != c["first_chunk_compared"]:
        console.print(f"[yellow]warning:[/] only {c['first_obs_identical']} of {c['first_chunk_compared']} episodes "
                      "started from bit-identical observations in both runs; the chunk difference mixes in the "
                      "simulator's")
    if result.json_path:
        console.print(f"results: {result.json_path}")


def run_eval(
    task: str,
    engine: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    backend: str = "onnx",
    sampler: str | None = None,
    steps: int | None = None,
    episodes: int = DEFAULT_EPISODES,
    seeds: str | Sequence[int] | None = None,
    workers: int = 1,
    threads: int = 1,
    json_path: str | os.PathLike | None = None,
    video_dir: str | os.PathLike | None = None,
    compare: bool = False,
    max_steps: int | None = None,
    control_mode: str | None = None,
    stop_on_success: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> EvalResult:
    """What ``par-deploy eval`` does: build the policy descriptions, ``evaluate``, print the report."""
    command = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in locals().items()}
    command["argv"] = list(sys.argv)
    if engine is None and checkpoint is None:
        raise EvalError("give --engine BUNDLE or --checkpoint CKPT (or both with --compare)")
    if engine is not None and checkpoint is not None and not compare:
        raise EvalError("--engine and --checkpoint together need --compare (the checkpoint is then the reference)")
    if compare and engine is None:
        raise EvalError("--compare needs --engine (the reference is its source checkpoint or --checkpoint)")
    if engine is not None:
        policy = PolicySource.engine(engine, backend=backend, threads=threads)
        reference = reference_for(policy, checkpoint) if compare else None
    else:
        policy, reference = PolicySource.checkpoint(checkpoint, sampler=sampler, steps=steps, threads=threads), None
    result = evaluate(task, policy, episodes=episodes, seeds=parse_seeds(seeds), workers=workers,
                      json_path=json_path, video_dir=video_dir, max_steps=max_steps, control_mode=control_mode,
                      reference=reference, stop_on_success=stop_on_success, timeout=timeout, command=command,
                      progress=progress)
    print_report(result)
    return result
