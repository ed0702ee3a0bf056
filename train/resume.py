"""Resumable training state without pickle: tensors in ``state.safetensors``, everything else in ``state.json``.

``state.json`` records the sha256 of ``state.safetensors`` (written first), so a crash between the two writes
or an edited tensor file is detected. Nothing here unpickles: a ``state.pt`` from older par-deploy versions
(``torch.save`` pickles, which can run arbitrary code when loaded) is refused with ``ResumeError``.

Tensor keys: ``model.<name>``, ``ema.<name>``, ``optimizer.<param index>.<state name>``, ``rng.<rank>.torch``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from par_deploy.errors import ResumeError
from par_deploy.files import atomic_path, atomic_write, sha256_file

TENSORS_FILE, META_FILE, LEGACY_FILE = "state.safetensors", "state.json", "state.pt"
FORMAT = "par-train-state"


def rng_state() -> dict[str, Any]:
    """This process's torch / numpy / Python RNG states (torch's as a uint8 tensor, the rest JSON-ready)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


def has_state(run: Path) -> bool:
    """True if ``run`` holds a resumable state; ``ResumeError`` for a legacy pickled ``state.pt``."""
    if (run / META_FILE).is_file():
        return True
    if (run / LEGACY_FILE).exists():
        raise ResumeError(
            f"{run / LEGACY_FILE}: pickled training state (older par-deploy); it is not loaded because "
            "unpickling can run arbitrary code. Start the run again in a new --out directory (its checkpoints "
            f"under {run / 'checkpoints'} stay usable)"
        )
    return False


def save_state(
    run: Path, step: int, model: dict, ema: dict, optimizer: dict, sampler: dict, rngs: list[dict[str, Any]]
) -> None:
    """Write the state atomically: tensors, then the JSON that names their sha256."""
    tensors = {f"model.{k}": v for k, v in model.items()} | {f"ema.{k}": v for k, v in ema.items()}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in optimizer["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{name}"] = v
            else:
                opt_scalars.setdefault(str(idx), {})[name] = v
    for rank, r in enumerate(rngs):
        tensors[f"rng.{rank}.torch"] = r["torch"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(run / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "sampler": sampler,
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": opt_scalars},
        "rng": [{k: v for k, v in r.items() if k != "torch"} for r in rngs],
        "tensors_sha256": sha256_file(run / TENSORS_FILE),
    }
    atomic_write(run / META_FILE, json.dumps(meta) + "\n")


def load_state(run: Path, rank: int, world: int) -> dict[str, Any]:
    """``{"step", "model", "ema", "optimizer", "sampler", "rng"}`` for this rank; ``ResumeError`` names the file."""
    meta_path, tensor_path = run / META_FILE, run / TENSORS_FILE
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    except (OSError, ValueError, AttributeError) as e:
        raise ResumeError(f"{meta_path}: not a readable training state ({e}); start a new run") from None
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise ResumeError(
            f"{tensor_path}: missing or does not match the sha256 in {META_FILE} (interrupted write "
            "or edited file); start a new run, or restore both files"
        )
    try:
        t = load_file(str(tensor_path))
    except (SafetensorError, OSError) as e:
        raise ResumeError(f"{tensor_path}: unreadable ({e})") from None
    if len(meta["rng"]) != world:
        raise ResumeError(f"{meta_path}: the run was saved by {len(meta['rng'])} processes, resumed with {world}")

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}

    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in group("optimizer.").items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta["optimizer"]["scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    return {
        "step": int(meta["step"]),
        "model": group("model."),
        "ema": group("ema."),
        "sampler": meta["sampler"],
        "optimizer": {"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]},
        "rng": {**meta["rng"][rank], "torch": t[f"rng.{rank}.torch"]},
    }
