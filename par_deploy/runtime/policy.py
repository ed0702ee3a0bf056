"""The policy interface every backend implements (numpy in, numpy out; no torch import here).

Control loop (DESIGN §1): at control step n the policy appends block ``[O_{n-1}; A_{n-1}]`` (the observation
it is given and the chunk executed since the last call, BOA at the first step) to its KV-cache, samples the
next chunk ``A_n`` and returns it denormalised, in the controller's units. The controller executes the whole
chunk (``chunk_len`` actions) before calling ``act`` again; if it executed something else (a safety override,
a replayed demonstration), it passes that chunk as ``act(..., executed=chunk)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from par_deploy.errors import ActionError, CacheFullError, InputError
from par_deploy.normalize import Normalizer, check_array


@dataclass(frozen=True)
class PolicySpec:
    """What a controller must know about a policy's inputs and outputs."""

    num_cameras: int
    image_size: int
    state_dim: int
    action_dim: int
    chunk_len: int
    max_blocks: int
    instructions: tuple[str, ...]


class Policy(ABC):
    spec: PolicySpec
    normalizer: Normalizer

    def __init__(self, spec: PolicySpec, normalizer: Normalizer, seed: int = 0):
        self.spec, self.normalizer = spec, normalizer
        self._rng = np.random.default_rng(seed)
        self._step = 0
        self._instruction: str | None = None
        self._prev_chunk = np.zeros((spec.chunk_len, spec.action_dim), np.float32)  # normalised

    # -- public API ----------------------------------------------------------------------------
    def reset(self, instruction: str | None = None, seed: int | None = None) -> None:
        """Start a new episode (clears the cache; keeps every buffer allocated)."""
        instruction = self.spec.instructions[0] if instruction is None else instruction
        if instruction not in self.spec.instructions:
            raise ValueError(
                f"unknown instruction {instruction!r}; this policy knows {list(self.spec.instructions)}"
            )
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._instruction = instruction
        self._step = 0
        self._prev_chunk[:] = 0
        self._reset(instruction)

    @property
    def steps_left(self) -> int:
        return self.spec.max_blocks - self._step

    @property
    def last_chunk(self) -> np.ndarray:
        """The normalised chunk ``[L, A]`` the last ``act`` returned, as the next ``act`` feeds it back unless
        given ``executed`` (zeros after ``reset``); a copy."""
        return self._prev_chunk.copy()

    def noise_shape(self) -> tuple[int, ...]:
        return (self.denoise_steps + 1, self.spec.chunk_len, self.spec.action_dim)

    def act(self, observation: dict[str, np.ndarray], noise: np.ndarray | None = None,
            executed: np.ndarray | None = None) -> np.ndarray:
        """observation ``{"rgb": uint8 [V, H, W, 3], "state": float32 [S]}`` -> chunk float32 ``[L, A]``.

        ``noise`` (float32 ``[K+1, L, A]``) makes the sample reproducible across backends.
        ``executed`` (float32 ``[L, A]``, controller units): the chunk actually executed since the previous
        call, when it differs from the one returned (safety override, demonstration replay); the policy
        normalises it as training did and conditions on it. Refused at the first step of an episode.
        """
        if self._instruction is None:
            raise RuntimeError("call reset(instruction) before act()")
        s = self.spec
        if self._step >= s.max_blocks:
            raise CacheFullError(
                f"episode reached the static KV-cache length ({s.max_blocks} control steps); call reset()"
            )
        if not isinstance(observation, dict):
            raise TypeError(
                f"observation: expected a dict with 'rgb' and 'state', found {type(observation).__name__}"
            )
        rgb = check_array(observation.get("rgb"), "observation['rgb']",
                          (s.num_cameras, s.image_size, s.image_size, 3), np.uint8)
        if s.state_dim:
            state = check_array(observation.get("state"), "observation['state']", (s.state_dim,), np.float32)
            state = self.normalizer.normalize_state(state)
        else:
            state = np.zeros(0, np.float32)
        prev = self._prev_chunk if executed is None else self._executed_chunk(executed)  # normalised [L, A]
        if noise is None:
            noise = self._rng.standard_normal(self.noise_shape()).astype(np.float32)
        noise = check_array(noise, "noise", self.noise_shape(), np.float32)
        chunk = self._act(rgb, state, prev, self._step == 0, self._step, noise)  # normalised
        if not np.isfinite(chunk).all():
            raise ActionError(
                f"the policy produced a non-finite action at step {self._step}; refusing to return it"
            )
        chunk = np.clip(chunk, -1.0, 1.0).astype(np.float32)
        out = self.normalizer.denormalize_action(chunk)  # controller units
        self._prev_chunk[:] = self.normalizer.normalize_action(out)  # fed back as training feeds a demo chunk
        self._step += 1
        return out

    def _executed_chunk(self, executed: np.ndarray) -> np.ndarray:
        """Validate a chunk in controller units and normalise it (not clipped: it is what was executed)."""
        if self._step == 0:
            raise InputError(
                "executed: no chunk precedes the first act() of an episode (its block starts with BOA); "
                "pass executed only from the second call on"
            )
        s = self.spec
        executed = check_array(executed, "executed", (s.chunk_len, s.action_dim), np.float32)
        return self.normalizer.normalize_action(executed)

    # -- backend hooks -------------------------------------------------------------------------
    @property
    @abstractmethod
    def denoise_steps(self) -> int:
        """K: the number of denoiser calls per action chunk."""

    @abstractmethod
    def _reset(self, instruction: str) -> None:
        """Clear the cache and write the instruction's text prefix."""

    @abstractmethod
    def _act(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, step: int,
             noise: np.ndarray) -> np.ndarray:
        """Append block ``step`` and sample the next chunk (normalised ``[L, A]``)."""
