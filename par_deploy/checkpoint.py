"""Self-describing checkpoints (LeRobot's save_pretrained/from_pretrained layout).

A checkpoint is a directory::

    config.json          PARConfig with a type tag and format version (format 2 lists every field)
    model.safetensors    the weights (EMA weights when training used EMA)
    normalization.json   action/state normalisation statistics
    checksums.json       sha256 of the three files above, written last

Loading verifies the sha256 of every file listed in ``checksums.json`` first (a flipped byte in the weights is
an error, not a silently different model), then checks every tensor against the config, and says which file
or tensor is wrong, what was expected and what was found. A format-2 checkpoint without ``checksums.json``
is refused; format-1 checkpoints (written before checksums existed) load without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from par_deploy.config import PARConfig
from par_deploy.errors import CheckpointError, ConfigError
from par_deploy.files import CHECKPOINT_FILES, atomic_path, checkpoint_hash, sha256_file
from par_deploy.locate import portable_path
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer

CONFIG_FILE, WEIGHTS_FILE, NORM_FILE = CHECKPOINT_FILES
CHECKSUM_FILE, CHECKSUM_FORMAT = "checksums.json", "par-checksums"
STORAGE_DTYPES = (torch.float16, torch.bfloat16)


def save_pretrained(
    model: PARModel,
    normalizer: Normalizer,
    path: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory. ``state_dict`` overrides the model's (e.g. EMA weights); ``dtype``
    (float16/bfloat16) stores the floating-point weights smaller; loading casts them back to float32."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    (path / CHECKSUM_FILE).unlink(missing_ok=True)  # a half-rewritten checkpoint has no valid checksums
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(sd, str(tmp), metadata={"format": "par"})
    model.cfg.save(path / CONFIG_FILE)
    normalizer.save(path / NORM_FILE)
    write_checksums(path)
    return path


def write_checksums(path: str | Path) -> Path:
    """Record the sha256 of config, weights and statistics in ``checksums.json`` (``save_pretrained`` calls it)."""
    path = Path(path)
    sums = {name: sha256_file(path / name) for name in (CONFIG_FILE, WEIGHTS_FILE, NORM_FILE)}
    out = path / CHECKSUM_FILE
    out.write_text(json.dumps({"format": CHECKSUM_FORMAT, "sha256": sums}, indent=2, sort_keys=True) + "\n")
    return out


def verify_checksums(path: Path) -> bool:
    """Check every file ``checksums.json`` lists; False when there is no ``checksums.json``."""
    record = path / CHECKSUM_FILE
    if not record.is_file():
        return False
    try:
        d = json.loads(record.read_text())
        sums = d["sha256"] if d.get("format") == CHECKSUM_FORMAT else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        sums = None
    if not isinstance(sums, dict) or set(sums) != {CONFIG_FILE, WEIGHTS_FILE, NORM_FILE}:
        raise CheckpointError(f"{record}: not a valid par-deploy checksum file; re-save the checkpoint")
    for name, want in sums.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing file (listed in {CHECKSUM_FILE})")
        got = sha256_file(path / name)
        if got != want:
            raise CheckpointError(
                f"{path / name}: sha256 {got} differs from {want} recorded in {CHECKSUM_FILE}: the file was "
                "modified, truncated or corrupted; restore it from the original checkpoint (or, if the edit was "
                "deliberate, re-save with par_deploy.checkpoint.write_checksums)"
            )
    return True


def load_state_dict_checked(model: PARModel, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for k, v in list(sd.items()):
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}"
            )
        if v.dtype != expected[k].dtype:
            if not (v.dtype in STORAGE_DTYPES and expected[k].dtype == torch.float32):
                raise CheckpointError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected {expected[k].dtype}")
            sd[k] = v = v.float()  # half-precision storage: exact upcast
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or infinite values")
    model.load_state_dict(sd, strict=True)


def from_pretrained(path: str | Path, map_location: str = "cpu") -> tuple[PARModel, Normalizer]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected {CONFIG_FILE}, {WEIGHTS_FILE}, {NORM_FILE})"
        )
    verified = verify_checksums(path)
    try:
        cfg = PARConfig.load(path / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not verified and _format_version(path / CONFIG_FILE) >= 2:
        raise CheckpointError(
            f"{path / CHECKSUM_FILE}: missing; a format-2 checkpoint records the sha256 of its files there. "
            "Copy it from the original checkpoint (or re-save with par_deploy.checkpoint.write_checksums)"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    try:
        sd = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    normalizer = Normalizer.load(path / NORM_FILE)
    if normalizer.action_dim != cfg.action_dim or normalizer.state_dim != cfg.state_dim:
        raise CheckpointError(
            f"{path / NORM_FILE}: statistics for action_dim={normalizer.action_dim}, state_dim={normalizer.state_dim}; "
            f"config has action_dim={cfg.action_dim}, state_dim={cfg.state_dim}"
        )
    model = PARModel(cfg)
    load_state_dict_checked(model, sd, str(weights))
    return model.eval(), normalizer


def _format_version(config_file: Path) -> int:
    return int(json.loads(config_file.read_text())["format_version"])  # already validated by PARConfig.load


def make_deployment_checkpoint(
    src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, frame_head: bool = False
) -> Path:
    """A smaller copy of a checkpoint for shipping: weights stored in ``dtype`` and, unless ``frame_head``,
    without the frame de-tokenizer (actions need only the transformer and the Action-DiT; predicting frames
    and further training need the full checkpoint). Actions of the copy differ from the source only by the
    rounding of the weights to ``dtype``."""
    model, normalizer = from_pretrained(src)
    extra = {
        **model.cfg.extra,
        "made_from": portable_path(src),
        "made_from_sha256": checkpoint_hash(src),
        "weights_dtype": str(dtype).removeprefix("torch."),
    }
    cfg = model.cfg.replace(frame_head=frame_head, extra=extra)
    slim = PARModel(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k in slim.state_dict()}
    slim.load_state_dict(sd, strict=True)
    return save_pretrained(slim, normalizer, dst, dtype=dtype)
