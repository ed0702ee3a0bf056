"""The policy interface every backend implements (numpy in, numpy out; no torch import here).

Control loop (docs/design-notes.md §1): at control step n the policy appends block ``[O_{n-1}; A_{n-1}]`` (the
observation it is given and the chunk executed since the last call, BOA at the first step) to its KV-cache, samples the
next chunk ``A_n`` and returns the ``spec.stride`` actions to execute, denormalised, in the controller's units:
the whole chunk (``chunk_len`` actions), or its first ``exec_len`` when the model was trained to re-plan before
the chunk ends (receding horizon). The controller executes them before calling ``act`` again; if it executed
something else (a safety override, a replayed demonstration), it passes those actions as
``act(..., executed=actions)``.

When the episode outgrows the static cache (``spec.max_blocks`` blocks) the spec's ``overflow`` decides:
``"error"`` raises ``CacheFullError``; ``"slide"`` keeps the newest ``max_blocks // 2`` blocks, clears the cache
and re-encodes them at positions 0, 1, ... (the positions a model trained on windows cut anywhere in the
episode saw), then goes on. The re-encoding costs ``max_blocks // 2`` extra block steps once every
``max_blocks - max_blocks // 2`` control steps.

Threads: ``act`` and ``reset`` of one policy object are serialised by a per-object lock, so concurrent calls
from several controller threads run one after the other and each sees a consistent cache (they still share
one episode). Separate policy objects share nothing and run in parallel. The backend hooks (``step_block``,
``sample``) are not locked: they are for single-threaded measurement code.

Input range: the state must lie within ``STATE_BOUND`` training standard deviations of the training mean
(normalised ``|s| <= 1e4``); anything further is refused before it reaches the cache (``InputError``). If a
backend ever produces a non-finite value anyway, ``act`` raises ``ActionError`` and keeps refusing until
``reset()`` starts a new episode: a cache that may hold non-finite values is never reused silently.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np

from par_deploy.config import executed_per_step
from par_deploy.errors import ActionError, CacheFullError, InputError
from par_deploy.normalize import Normalizer, check_array

# |normalised state| allowed, in training standard deviations. Measured: the shipped checkpoint's 120 demos reach
# 7.4; a near-constant dimension (its tcp quaternion w, std 5e-4) is ~4e3 away at the other end of its physical
# range; float32 overflows inside the transformer between 1e20 and 1e25 (then the cache holds inf/NaN).
STATE_BOUND = 1e4


def _serialised(method):
    """Run ``method`` under the policy object's lock (see the module docstring)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


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
    overflow: str = "error"  # "error" or "slide" (see the module docstring)
    exec_len: int = 0  # actions act() returns per call, the first of the chunk's chunk_len (0: all of them)

    @property
    def stride(self) -> int:
        """Actions ``act`` returns, for the controller to execute before the next call (env steps per call)."""
        return executed_per_step(self.chunk_len, self.exec_len)

    @classmethod
    def from_config(cls, cfg) -> PolicySpec:
        """The spec of a model config (``par_deploy.config.PARConfig``)."""
        return cls(
            cfg.num_cameras,
            cfg.image_size,
            cfg.state_dim,
            cfg.action_dim,
            cfg.chunk_len,
            cfg.max_blocks,
            tuple(cfg.instructions),
            cfg.overflow,
            cfg.exec_len,
        )


class Policy(ABC):
    spec: PolicySpec
    normalizer: Normalizer

    def __init__(self, spec: PolicySpec, normalizer: Normalizer, seed: int = 0):
        self.spec, self.normalizer = spec, normalizer
        self._rng = np.random.default_rng(seed)
        self._step = 0  # control steps of this episode
        self._pos = 0  # cache position (block index) of the next block
        self._instruction: str | None = None
        self._prev_chunk = np.zeros((spec.chunk_len, spec.action_dim), np.float32)  # normalised
        self._window: deque = deque(maxlen=spec.max_blocks)  # inputs of the cached blocks (for "slide")
        self._lock = threading.Lock()
        self._poisoned_at: int | None = None  # step whose output was non-finite: reset() required

    # -- public API ----------------------------------------------------------------------------
    @_serialised
    def reset(self, instruction: str | None = None, seed: int | None = None) -> None:
        """Start a new episode (clears the cache; keeps every buffer allocated)."""
        instruction = self.spec.instructions[0] if instruction is None else instruction
        if instruction not in self.spec.instructions:
            raise ValueError(f"unknown instruction {instruction!r}; this policy knows {list(self.spec.instructions)}")
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._instruction = instruction
        self._step = self._pos = 0
        self._prev_chunk[:] = 0
        self._window.clear()
        self._poisoned_at = None
        self._reset(instruction)

    @property
    def steps_left(self) -> int | float:
        """Control steps before the cache is full (``inf`` for a sliding cache)."""
        return float("inf") if self.spec.overflow == "slide" else self.spec.max_blocks - self._step

    @property
    def last_chunk(self) -> np.ndarray:
        """The normalised chunk ``[L, A]`` the last ``act`` sampled (it returned its first ``spec.stride``), as
        the next ``act`` feeds it back unless given ``executed`` (zeros after ``reset``); a copy."""
        return self._prev_chunk.copy()

    def noise_shape(self) -> tuple[int, ...]:
        return (self.denoise_steps + 1, self.spec.chunk_len, self.spec.action_dim)

    @_serialised
    def act(
        self, observation: dict[str, np.ndarray], noise: np.ndarray | None = None, executed: np.ndarray | None = None
    ) -> np.ndarray:
        """observation ``{"rgb": uint8 [V, H, W, 3], "state": float32 [S]}`` -> actions float32 ``[spec.stride, A]``
        (the sampled chunk ``[L, A]``, or its first ``exec_len`` actions).

        ``noise`` (float32 ``[K+1, L, A]``) makes the sample reproducible across backends.
        ``executed`` (float32 ``[spec.stride, A]``, controller units): the actions actually executed since the
        previous call, when they differ from the ones returned (safety override, demonstration replay); the
        policy normalises them as training did and conditions on them. Refused at the first step of an episode.
        """
        block, noise = self._prepare(observation, noise, executed)
        self.step_block(*block, self._pos)
        self._remember(block)
        return self._finish(self.sample(noise))

    def _prepare(
        self, observation: dict[str, np.ndarray], noise: np.ndarray | None, executed: np.ndarray | None
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, bool], np.ndarray]:
        """Validate one call's inputs (nothing is written before they all pass; a full sliding cache slides)
        -> the block ``(rgb, normalised state, normalised previous chunk, first)`` and the noise."""
        if self._instruction is None:
            raise RuntimeError("call reset(instruction) before act()")
        if self._poisoned_at is not None:
            raise ActionError(
                f"the policy produced non-finite values at step {self._poisoned_at} of this episode and its "
                "cache may hold them; call reset() to start a new episode"
            )
        s = self.spec
        if self._pos >= s.max_blocks and s.overflow != "slide":
            raise CacheFullError(
                f"episode reached the static KV-cache length ({s.max_blocks} control steps); call reset(), or "
                "use a checkpoint trained with `par-deploy train --window` (sliding cache)"
            )
        if not isinstance(observation, dict):
            raise TypeError(f"observation: expected a dict with 'rgb' and 'state', found {type(observation).__name__}")
        rgb = check_array(
            observation.get("rgb"), "observation['rgb']", (s.num_cameras, s.image_size, s.image_size, 3), np.uint8
        )
        if s.state_dim:
            state = check_array(observation.get("state"), "observation['state']", (s.state_dim,), np.float32)
            state = check_state_range(self.normalizer.normalize_state(state))
        else:
            state = np.zeros(0, np.float32)
        prev = self._prev_chunk if executed is None else self._executed_chunk(executed)  # normalised [L, A]
        if noise is None:
            noise = self._rng.standard_normal(self.noise_shape()).astype(np.float32)
        noise = check_array(noise, "noise", self.noise_shape(), np.float32)
        if self._pos >= s.max_blocks:
            self._slide()
        return (rgb, state, prev.copy(), self._step == 0), noise

    def _finish(self, chunk: np.ndarray) -> np.ndarray:
        """The sampled normalised chunk -> controller units (``ActionError`` if not finite); feeds it back."""
        if not np.isfinite(chunk).all():
            self._poisoned_at = self._step
            raise ActionError(
                f"the policy produced a non-finite action at step {self._step}; refusing to return it. Its cache "
                "may hold non-finite values: call reset() to start a new episode"
            )
        chunk = np.clip(chunk, -1.0, 1.0).astype(np.float32)
        out = self.normalizer.denormalize_action(chunk)  # controller units
        self._prev_chunk[:] = self.normalizer.normalize_action(out)  # fed back as training feeds a demo chunk
        self._step += 1
        self._pos += 1
        return out[: self.spec.stride]

    def _executed_chunk(self, executed: np.ndarray) -> np.ndarray:
        """Validate executed actions ``[stride, A]`` in controller units -> the normalised chunk ``[L, A]`` to feed
        back (not clipped: it is what was executed; the unexecuted tail is zeros, which the model ignores)."""
        if self._step == 0:
            raise InputError(
                "executed: no chunk precedes the first act() of an episode (its block starts with BOA); "
                "pass executed only from the second call on"
            )
        s = self.spec
        executed = check_array(executed, "executed", (s.stride, s.action_dim), np.float32)
        chunk = np.zeros((s.chunk_len, s.action_dim), np.float32)
        chunk[: s.stride] = self.normalizer.normalize_action(executed)
        return chunk

    def _remember(self, block: tuple) -> None:
        """Keep the inputs of a block just appended to a sliding cache (a slide re-encodes them)."""
        if self.spec.overflow == "slide":
            self._window.append((block[0].copy(), block[1].copy(), *block[2:]))

    def _slide(self) -> None:
        """Keep the newest ``max_blocks // 2`` blocks, re-encoded at positions 0, 1, ... of a cleared cache."""
        keep = self._kept_blocks()
        self._reset(self._instruction)
        for pos, block in enumerate(keep):
            self.step_block(*block, pos)
        self._restart_window(keep)

    def _kept_blocks(self) -> list[tuple]:
        """The blocks a slide keeps: the newest ``max_blocks // 2`` of the window."""
        return list(self._window)[len(self._window) - self.spec.max_blocks // 2 :]

    def _restart_window(self, keep: list[tuple]) -> None:
        """After a slide: the window holds ``keep`` (re-encoded at positions 0 ..), the next block follows them."""
        self._window.clear()
        self._window.extend(keep)
        self._pos = len(keep)

    # -- backend hooks -------------------------------------------------------------------------
    @property
    @abstractmethod
    def denoise_steps(self) -> int:
        """K: the number of denoiser calls per action chunk."""

    @abstractmethod
    def _reset(self, instruction: str) -> None:
        """Clear the cache and write the instruction's text prefix."""

    @abstractmethod
    def step_block(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, pos: int) -> None:
        """Append one block (normalised inputs; ``first``: its action part is BOA) at cache position ``pos``
        and keep its Action-DiT condition for ``sample``."""

    @abstractmethod
    def sample(self, noise: np.ndarray) -> np.ndarray:
        """Sample the next chunk (normalised ``[L, A]``) from the last block's condition; noise ``[K+1, L, A]``."""


def check_state_range(state: np.ndarray) -> np.ndarray:
    """Refuse a normalised state beyond ``STATE_BOUND`` (``InputError`` names the dimension)."""
    i = int(np.argmax(np.abs(state)))
    if abs(float(state[i])) > STATE_BOUND:
        raise InputError(
            f"observation['state'][{i}] is {float(state[i]):.3g} training standard deviations from the training "
            f"mean (allowed: {STATE_BOUND:g}); check the state's units and keys against the checkpoint's "
            "normalization.json. Nothing was written to the cache"
        )
    return state
