"""Where checkpoints and bundles are found: a task's shipped checkpoint, the bundle exported from it, and the
checkpoint a bundle was exported from. ``eval``, ``bench`` and ``demo`` resolve through these functions only.

- A task's shipped checkpoint is ``checkpoints/<task lowercase>-cpu-small`` (e.g. ``checkpoints/pushcube-cpu-small``).
- Its bundle is ``bundles/<task lowercase>``: exported (ONNX, DDIM with 4 steps) the first time it is needed and
  again whenever it no longer verifies against the checkpoint (the checkpoint changed, or files are missing).
- A bundle's source checkpoint is the manifest's ``source_checkpoint``, looked up as written (relative to the
  working directory), then relative to the bundle directory and to its parent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from par_deploy.errors import ParError

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_ROOT = REPO_ROOT / "checkpoints"
BUNDLES_ROOT = REPO_ROOT / "bundles"
SHIPPED_PRESET = "cpu-small"
AUTO_EXPORT = {"backends": ("onnx",), "denoise_steps": 4, "sampler": "ddim"}


class NotFound(ParError, FileNotFoundError):
    """A checkpoint or bundle that a command needs does not exist (the message says how to make it)."""


def portable_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory (POSIX), for files meant to be committed: no machine path."""
    return Path(os.path.relpath(Path(path).resolve(), Path.cwd())).as_posix()


def _task_spec(task: str):
    from par_deploy.sim.env import TASKS

    if task not in TASKS:
        raise NotFound(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def shipped_checkpoint_path(task: str) -> Path:
    """``checkpoints/<task lowercase>-cpu-small`` (whether or not it exists)."""
    return CHECKPOINTS_ROOT / f"{task.lower()}-{SHIPPED_PRESET}"


def shipped_tasks() -> list[str]:
    """The tasks that have a shipped checkpoint."""
    from par_deploy.sim.env import TASKS

    return [t for t in TASKS if (shipped_checkpoint_path(t) / "config.json").is_file()]


def shipped_checkpoint(task: str) -> Path:
    """The shipped checkpoint of ``task``; ``NotFound`` names the tasks that have one and how to train one."""
    _task_spec(task)
    path = shipped_checkpoint_path(task)
    if (path / "config.json").is_file():
        return path
    have = ", ".join(shipped_tasks()) or "none"
    low = task.lower()
    raise NotFound(
        f"no shipped checkpoint for {task} ({portable_path(path)}); tasks with one: {have}. Train one: "
        f"par-deploy demos --task {task} -n 120 && par-deploy train data/{task} --out runs/{low} --preset "
        f"{SHIPPED_PRESET}, then pass --checkpoint runs/{low}/final (or --engine after par-deploy export)"
    )


@dataclass(frozen=True)
class ResolvedBundle:
    checkpoint: Path
    bundle: Path
    exported: bool  # False: an up-to-date bundle was already there

    def describe(self) -> str:
        how = "exported now" if self.exported else "up to date"
        return f"checkpoint {portable_path(self.checkpoint)}, bundle {portable_path(self.bundle)} ({how})"


def ensure_bundle(checkpoint: str | os.PathLike, bundle: str | os.PathLike, console=None) -> ResolvedBundle:
    """The ONNX bundle of ``checkpoint`` at ``bundle``: kept when it verifies against the checkpoint, else
    (missing, stale, from another checkpoint) exported anew with ``AUTO_EXPORT`` settings."""
    from par_deploy.runtime import BundleError, open_bundle

    checkpoint, bundle = Path(checkpoint), Path(bundle)
    try:
        open_bundle(bundle, "onnx", checkpoint)
        return ResolvedBundle(checkpoint, bundle, exported=False)
    except BundleError:
        pass
    from par_deploy.export import export_bundle

    if console is not None:
        console.print(f"exporting {portable_path(checkpoint)} -> {portable_path(bundle)} (ONNX, DDIM 4 steps)")
    report = export_bundle(checkpoint, bundle, progress=False, overwrite=True, **AUTO_EXPORT)
    if console is not None:
        parity = report.parity["onnx"]
        console.print(
            f"export {report.seconds['total']:.1f} s; parity vs PyTorch: actions "
            f"{parity['actions_max_abs']:.1e}, hidden {parity['hidden_max_abs']:.1e}"
        )
    return ResolvedBundle(checkpoint, bundle, exported=True)


def task_bundle(task: str, console=None) -> ResolvedBundle:
    """``task`` -> its shipped checkpoint -> ``bundles/<task lowercase>`` (exported when needed)."""
    return ensure_bundle(shipped_checkpoint(task), BUNDLES_ROOT / task.lower(), console)


def source_checkpoint(bundle: str | os.PathLike, manifest: dict[str, Any] | None = None) -> Path:
    """The checkpoint directory ``bundle`` was exported from (see the module docstring); ``NotFound`` if absent.

    It is not verified here: ``runtime.open_bundle(bundle, checkpoint=...)`` checks its sha256."""
    from par_deploy.runtime import read_manifest

    bundle = Path(bundle)
    m = manifest if manifest is not None else read_manifest(bundle)
    src = m.get("source_checkpoint")
    candidates = [] if not src else [Path(src), bundle / src, bundle.parent / src]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        raise NotFound(
            f"{bundle}: the manifest's source checkpoint {src!r} is not found here; pass the checkpoint "
            "(--checkpoint for eval, --reference for bench)"
        )
    return found
