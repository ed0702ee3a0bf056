"""Normalisation statistics (numpy only: the torch-free runtime uses this module too).

Actions are min-max scaled to [-1, 1] per dimension (the diffusion samplers clip to that range); state is
standardised. Dimensions with (almost) no spread map to 0 and back to their constant value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from par_deploy.errors import CheckpointError, InputError

_EPS = 1e-6
FORMAT = "par-normalization"


@dataclass
class Normalizer:
    action_min: np.ndarray  # [A]
    action_max: np.ndarray  # [A]
    state_mean: np.ndarray  # [S]
    state_std: np.ndarray  # [S]

    def __post_init__(self) -> None:
        for name in ("action_min", "action_max", "state_mean", "state_std"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32).reshape(-1))
        if self.action_min.shape != self.action_max.shape:
            raise ValueError("action_min and action_max differ in shape")
        if self.state_mean.shape != self.state_std.shape:
            raise ValueError("state_mean and state_std differ in shape")
        for name in ("action_min", "action_max", "state_mean", "state_std"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"normalisation statistic {name} is not finite")

    @classmethod
    def identity(cls, action_dim: int, state_dim: int) -> Normalizer:
        return cls(-np.ones(action_dim), np.ones(action_dim), np.zeros(state_dim), np.ones(state_dim))

    @classmethod
    def fit(cls, actions: np.ndarray, states: np.ndarray) -> Normalizer:
        """actions ``[n, A]``, states ``[m, S]`` (all steps of all episodes)."""
        if states.shape[-1] == 0:
            mean, std = np.zeros(0), np.ones(0)
        else:
            mean, std = states.mean(0), states.std(0)
        return cls(actions.min(0), actions.max(0), mean, std)

    @property
    def action_dim(self) -> int:
        return self.action_min.shape[0]

    @property
    def state_dim(self) -> int:
        return self.state_mean.shape[0]

    def _action_scale(self) -> tuple[np.ndarray, np.ndarray]:
        half = (self.action_max - self.action_min) / 2
        return (self.action_max + self.action_min) / 2, np.where(half > _EPS, half, 1.0).astype(np.float32)

    def normalize_action(self, a: np.ndarray) -> np.ndarray:
        center, half = self._action_scale()
        out = (a - center) / half
        return np.where((self.action_max - self.action_min) / 2 > _EPS, out, 0.0).astype(np.float32)

    def denormalize_action(self, a: np.ndarray) -> np.ndarray:
        """Inverse of ``normalize_action``; a dimension without spread always maps back to its constant."""
        center, half = self._action_scale()
        half = np.where((self.action_max - self.action_min) / 2 > _EPS, half, 0.0)
        return (a * half + center).astype(np.float32)

    def normalize_state(self, s: np.ndarray) -> np.ndarray:
        std = np.where(self.state_std > _EPS, self.state_std, 1.0)
        return ((s - self.state_mean) / std).astype(np.float32)

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        """A random state of the training distribution's scale, float32 ``[S]`` (demos, benchmarks, parity)."""
        return (self.state_mean + self.state_std * rng.standard_normal(self.state_dim)).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            **{k: getattr(self, k).tolist() for k in ("action_min", "action_max", "state_mean", "state_std")},
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "normalization") -> Normalizer:
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a par-deploy normalisation file (format {d.get('format')!r})")
        try:
            return cls(d["action_min"], d["action_max"], d["state_mean"], d["state_std"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: invalid normalisation statistics ({e})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing normalisation statistics file") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_array(x: np.ndarray, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Validate an observation/action array: type, dtype, exact shape, finite values."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, found {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise InputError(f"{name}: expected dtype {np.dtype(dtype)}, found {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise InputError(f"{name}: expected shape {tuple(shape)}, found {tuple(x.shape)}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return x
