"""The demonstration dataset format: what ``par-deploy demos`` writes and training reads.

Dataset format (version 1)::

    <out_dir>/meta.json
        {"format": "par-demos", "version": 1, "task": "PushCube", "env_id": "PushCube-v1",
         "control_mode": "pd_ee_delta_pos", "image_size": 64, "num_cameras": V, "camera_names": [...],
         "state_keys": [[name, dim], ...], "state_dim": S, "action_dim": A, "instruction": "...",
         "max_episode_steps": 100}
    <out_dir>/episodes/ep_{index:06d}.npz   (np.savez_compressed)
        rgb      uint8   [T+1, V, H, W, 3]  observation before each action, plus the final one
        state    float32 [T+1, S]           state_keys concatenated (see par_deploy.sim.env)
        actions  float32 [T, A]             exactly what was sent to ParEnv.step, in control_mode
        success  bool    []                 always True for kept episodes
        seed     int64   []                 ParEnv.reset(seed) reproduces the initial state

``max_episode_steps`` is the evaluation horizon of the task; demonstrations are not cut to it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy.errors import ConfigError, InputError
from par_deploy.files import atomic_path, atomic_write

FORMAT = "par-demos"
VERSION = 1


def make_meta(
    *,
    task: str,
    env_id: str,
    control_mode: str,
    image_size: int,
    camera_names: list[str],
    state_keys: list[tuple[str, int]],
    action_dim: int,
    instruction: str,
    max_episode_steps: int,
) -> dict[str, Any]:
    """The ``meta.json`` of a dataset (``state_dim``: the state keys' widths summed)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "env_id": env_id,
        "control_mode": control_mode,
        "image_size": image_size,
        "num_cameras": len(camera_names),
        "camera_names": list(camera_names),
        "state_keys": [[k, int(d)] for k, d in state_keys],
        "state_dim": sum(int(d) for _, d in state_keys),
        "action_dim": action_dim,
        "instruction": instruction,
        "max_episode_steps": max_episode_steps,
    }


# ----------------------------------------------------------------------------------------------------------
# Reading


def load_meta(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<out_dir>/meta.json``."""
    path = Path(out_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read dataset metadata ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InputError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return meta


def list_episodes(out_dir: str | os.PathLike) -> list[Path]:
    """The episode files of a dataset, sorted by index."""
    return sorted((Path(out_dir) / "episodes").glob("ep_*.npz"))


def load_episode(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Read one episode and check its arrays (and, with ``meta``, their sizes); raise ``InputError``
    (a ``ValueError``) naming the file and the problem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            ep = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: cannot read episode ({e})") from e

    def bad(msg: str) -> InputError:
        return InputError(f"{path}: {msg}")

    expected = {
        "rgb": np.uint8,
        "state": np.float32,
        "actions": np.float32,
        "success": np.bool_,
        "seed": np.int64,
    }
    missing = sorted(set(expected) - set(ep))
    if missing:
        raise bad(f"missing arrays {missing} (has {sorted(ep)})")
    for k, dtype in expected.items():
        if ep[k].dtype != dtype:
            raise bad(f"{k} has dtype {ep[k].dtype}, expected {np.dtype(dtype)}")
    rgb, state, actions = ep["rgb"], ep["state"], ep["actions"]
    if rgb.ndim != 5 or rgb.shape[-1] != 3:
        raise bad(f"rgb has shape {rgb.shape}, expected [T+1, V, H, W, 3]")
    if state.ndim != 2 or actions.ndim != 2:
        raise bad(f"state {state.shape} and actions {actions.shape} must be 2-D")
    t = actions.shape[0]
    if t < 1 or rgb.shape[0] != t + 1 or state.shape[0] != t + 1:
        raise bad(f"lengths disagree: rgb {rgb.shape[0]}, state {state.shape[0]}, actions {t} (need T+1, T+1, T >= 1)")
    if ep["success"].shape != () or ep["seed"].shape != ():
        raise bad("success and seed must be scalars")
    if not (np.isfinite(state).all() and np.isfinite(actions).all()):
        raise bad("state or actions contain non-finite values")
    if meta is not None:
        size = meta["image_size"]
        want = {
            "rgb": (meta["num_cameras"], size, size, 3),
            "state": (meta["state_dim"],),
            "actions": (meta["action_dim"],),
        }
        for k, shape in want.items():
            if ep[k].shape[1:] != shape:
                raise bad(f"{k} has per-step shape {ep[k].shape[1:]}, meta.json says {shape}")
    return ep


# ----------------------------------------------------------------------------------------------------------
# Writing


def episode_path(out_dir: Path, index: int) -> Path:
    """Where episode ``index`` is (or will be) stored."""
    return out_dir / "episodes" / f"ep_{index:06d}.npz"


def save_episode(path: Path, ep: dict[str, np.ndarray]) -> None:
    """Write one episode atomically (a file that exists is complete)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez_compressed(f, **ep)


def write_or_check_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json``, or check that the one on disk was written with the same settings."""
    path = out_dir / "meta.json"
    if path.exists():
        old = load_meta(out_dir)
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} on disk vs {meta.get(k)!r}" for k in diff)
            raise ConfigError(f"{path} was written with different settings ({details}); use another out_dir")
        return
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(path, text)
