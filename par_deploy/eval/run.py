"""``evaluate`` (the library entry: a policy on a task under the protocol) and ``run_eval`` (what
``par-deploy eval`` does: resolve what to evaluate, evaluate, print the report)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from par_deploy.eval.protocol import (
    DEFAULT_EPISODES,
    DEFAULT_RETRIES,
    DEFAULT_SEEDS,
    DEFAULT_TIMEOUT,
    EVAL_SEED_BASE,
    EvalError,
    episode_count,
    episode_jobs,
    parse_seeds,
    protocol_dict,
)
from par_deploy.eval.report import print_report, run_with_progress
from par_deploy.eval.results import EvalResult, RunBook, load_resume, machine_info, write_json_atomic
from par_deploy.eval.rollouts import RolloutSetup
from par_deploy.eval.sources import CheckpointSource, EngineSource, PolicySource, ServerSource, reference_for
from par_deploy.eval.stats import compare_runs


@dataclass(frozen=True)
class _Task:
    """The task side of an evaluation, checked against the policy."""

    name: str
    env_id: str
    instruction: str
    control_mode: str
    image_size: int
    max_steps: int

    def protocol(self, seeds: Sequence[int], state_seed_base: int, stop_on_success: bool) -> dict[str, Any]:
        return protocol_dict(
            self.name,
            self.env_id,
            self.instruction,
            self.control_mode,
            self.image_size,
            self.max_steps,
            seeds,
            state_seed_base,
            stop_on_success,
        )

    def rollout_setup(self, source: PolicySource, label: str, **options) -> RolloutSetup:
        """What a worker needs to run ``source``'s episodes on this task (``options``: the rest of
        ``RolloutSetup``'s fields)."""
        return RolloutSetup(
            task=self.name,
            policy=source,
            instruction=self.instruction,
            control_mode=self.control_mode,
            image_size=self.image_size,
            max_steps=self.max_steps,
            label=label,
            **options,
        )


def _check_task(task: str, source: PolicySource, max_steps: int | None, control_mode: str | None, console) -> _Task:
    from par_deploy.sim.env import TASKS

    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    spec, info = TASKS[task], source.info()
    if info.task not in (None, task):
        raise EvalError(f"{source.name} was trained on {info.task} (config extra.task), not {task}")
    if spec.instruction not in info.spec.instructions:
        raise EvalError(
            f"{source.name}: the policy does not know {task}'s instruction {spec.instruction!r} "
            f"(it knows {list(info.spec.instructions)})"
        )
    max_steps = int(max_steps or spec.max_episode_steps)
    p = info.spec
    if p.overflow != "slide" and p.max_blocks < -(-max_steps // p.stride):
        console.print(
            f"[yellow]warning:[/] the policy's KV-cache holds {p.max_blocks} control steps = "
            f"{p.max_blocks * p.stride} env steps < the limit {max_steps}: "
            "episodes will end with CacheFullError (recorded as failures)"
        )
    return _Task(
        task,
        spec.env_id,
        spec.instruction,
        control_mode or info.control_mode or "pd_ee_delta_pos",
        p.image_size,
        max_steps,
    )


def _check_args(
    episodes: int, workers: int, max_steps: int | None, timeout: float, max_retries: int, video_dir
) -> None:
    if episodes < 1 or workers < 0 or (max_steps is not None and max_steps < 1) or timeout <= 0 or max_retries < 0:
        raise EvalError(
            f"need episodes >= 1 ({episodes}), workers >= 0 ({workers}), max_steps >= 1 ({max_steps}), "
            f"timeout > 0 ({timeout}), max_retries >= 0 ({max_retries})"
        )
    if video_dir is not None:
        try:
            import imageio.v2  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError as e:
            raise EvalError(f"--video needs imageio and imageio-ffmpeg ({e}): pip install imageio-ffmpeg") from e


def _labelled(policy: PolicySource, reference: PolicySource | None) -> dict[str, PolicySource]:
    policies = [policy] + ([reference] if reference is not None else [])
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        labels = [labels[0], "reference"] if labels[0] != "reference" else ["policy", "reference"]
    return dict(zip(labels, policies, strict=True))


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
    """Evaluate ``policy_spec`` on ``task`` under the protocol (``par_deploy.eval.protocol``); with ``reference``
    (``--compare``) evaluate it too on the same states and seeds and compare the two.

    ``workers=0`` runs in this process; ``workers >= 1`` uses a spawned process pool (a calling script needs the
    ``if __name__ == "__main__":`` guard). ``control_mode`` defaults to the one the policy was trained with,
    else ``pd_ee_delta_pos``; the image size is the policy's.
    """
    from rich.console import Console

    console = console or Console(stderr=True, quiet=not progress, log_path=False)
    seeds = parse_seeds(seeds)
    _check_args(episodes, workers, max_steps, timeout, max_retries, video_dir)
    t = _check_task(task, policy_spec, max_steps, control_mode, console)
    policies = _labelled(policy_spec, reference)
    identities = {label: p.identity() for label, p in policies.items()}
    protocol = t.protocol(seeds, state_seed_base, stop_on_success)
    json_path = Path(json_path) if json_path is not None else None
    doc = load_resume(json_path, protocol, identities)
    doc["machine"], doc["command"] = machine_info(), command
    doc["arguments"] = {
        "task": task,
        "policy": policy_spec.describe(),
        "reference": reference.describe() if reference else None,
        "episodes": episodes,
        "seeds": list(seeds),
        "workers": workers,
        "max_steps": t.max_steps,
        "timeout": timeout,
        "max_retries": max_retries,
        "video_dir": _portable(video_dir),
        "json_path": _portable(json_path),
    }
    jobs = episode_jobs(episodes, seeds)
    result = EvalResult(task, protocol, {}, json_path=str(json_path) if json_path else None)
    for label, source in policies.items():
        setup = t.rollout_setup(
            source,
            label,
            state_seed_base=state_seed_base,
            stop_on_success=stop_on_success,
            video_dir=str(video_dir) if video_dir else None,
            env_factory=env_factory,
        )
        book = RunBook(doc, label, identities[label], source.describe(), jobs, json_path)
        result.skipped[label] = len(jobs) - len(book.todo)
        if book.todo:
            console.log(
                f"{task} {label}: {len(book.todo)} episodes to run, {result.skipped[label]} already "
                f"recorded; {f'{workers} worker process(es)' if workers else 'in this process'}"
            )
        run_with_progress(setup, book, workers, timeout, max_retries, console, progress)
        book.save()
        result.runs[label] = book.result()
    if reference is not None:
        _compare(result, doc, json_path)
    return result


def _compare(result: EvalResult, doc: dict[str, Any], json_path: Path | None) -> None:
    """The first run (engine) against the second (reference), into the result and the results file."""
    (la, a), (lb, b) = ((label, run.episodes) for label, run in result.runs.items())
    result.compare = doc["compare"] = {"a": la, "b": lb, **compare_runs(a, b)}
    if json_path is not None:
        write_json_atomic(json_path, doc)


def _portable(path) -> str | None:
    from par_deploy.locate import portable_path

    return portable_path(path) if path is not None else None


def _command(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``run_eval`` for the results file: paths relative, argv without the program's path."""
    from par_deploy.eval.results import portable_argv

    plain = (str, int, float, bool, type(None), list, tuple)
    out = {
        k: (_portable(v) if isinstance(v, os.PathLike) else v)
        for k, v in args.items()
        if isinstance(v, plain + (os.PathLike,))
    }
    out["argv"] = portable_argv(sys.argv)
    return out


def _sources(
    task: str,
    engine,
    checkpoint,
    compare: bool,
    backend: str,
    sampler,
    steps,
    threads: int,
    console,
    server: str | None = None,
) -> tuple[PolicySource, PolicySource | None, str | None]:
    """The policy (and reference) ``run_eval`` evaluates, and a note saying which were resolved for the task."""
    note = None
    if server is not None:
        if engine is not None or compare:
            raise EvalError("--server evaluates the served engine alone: drop --engine and --compare")
        return ServerSource(server, threads=threads), None, f"{task}: policy served at {server}"
    if engine is not None and checkpoint is not None and not compare:
        raise EvalError("--engine and --checkpoint together need --compare (the checkpoint is then the reference)")
    if compare and engine is None and checkpoint is not None:
        raise EvalError("--compare needs --engine (the reference is its source checkpoint or --checkpoint)")
    if engine is None and checkpoint is None:  # the task's shipped checkpoint, through its engine
        from par_deploy.locate import task_bundle

        resolved = task_bundle(task, console)
        policy = EngineSource(str(resolved.bundle), backend=backend, threads=threads)
        note = f"{task}: {resolved.describe()}"
        return policy, (reference_for(policy, resolved.checkpoint) if compare else None), note
    if engine is None:
        return CheckpointSource(str(checkpoint), sampler=sampler, steps=steps, threads=threads), None, note
    policy = EngineSource(str(engine), backend=backend, threads=threads)
    return policy, (reference_for(policy, checkpoint) if compare else None), note


def run_eval(
    task: str,
    engine: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    backend: str = "onnx",
    sampler: str | None = None,
    steps: int | None = None,
    episodes: int | None = None,
    states: int | None = None,
    seeds: str | Sequence[int] | None = None,
    seed_base: int = EVAL_SEED_BASE,
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
    server: str | None = None,
) -> EvalResult:
    """What ``par-deploy eval`` does. With neither ``engine`` nor ``checkpoint``: the task's shipped checkpoint
    through its engine (``par_deploy.locate.task_bundle``). ``states`` x seeds episodes (``episodes``: a prefix)."""
    command = _command(locals())
    from rich.console import Console

    seeds = parse_seeds(seeds)
    n = episode_count(states, episodes, seeds)
    policy, reference, note = _sources(
        task,
        engine,
        checkpoint,
        compare,
        backend,
        sampler,
        steps,
        threads,
        Console(stderr=True, quiet=not progress),
        server,
    )
    result = evaluate(
        task,
        policy,
        episodes=n,
        seeds=seeds,
        workers=workers,
        json_path=json_path,
        video_dir=video_dir,
        max_steps=max_steps,
        control_mode=control_mode,
        reference=reference,
        stop_on_success=stop_on_success,
        timeout=timeout,
        state_seed_base=seed_base,
        command=command,
        progress=progress,
    )
    result.policy_note = note
    print_report(result)
    return result
