"""Batched policies: N independent episodes (rows) stepped by one engine call (numpy only, no torch).

A bundle exported with ``par-deploy export --batch N`` has graphs whose leading dimension is N; each row is
its own episode with its own cache row, position, instruction, previous chunk and noise generator. Serving
several robots, or one evaluation worker stepping several environments, then costs one engine call per
control step instead of N::

    policy = runtime.load_batch("bundles/pushcube-b8")     # BatchPolicy with policy.batch == 8
    policy.reset()                                         # every row: a new episode (or reset(row=3))
    chunks = policy.act_batch({"rgb": rgb, "state": state})   # rgb uint8 [8, V, H, W, 3], state [8, S]
    chunks = policy.act_batch([obs0, None, obs2, ...])     # a list: one dict per row; None = row sits out

Each row follows exactly the contract of ``Policy.act`` (validation, feedback of the returned chunk,
``executed``, ``CacheFullError`` at the end of its cache, ``ActionError`` on a non-finite action), because each
row *is* a ``Policy`` whose engine hooks are served by the batched call. A row that sits out (``None``) keeps
its cache and step; the engine still computes its row (the graphs have static shapes) and its result is
dropped. A sliding cache (``overflow "slide"``, checkpoints trained with ``--window``) slides per row: the rows
whose caches are full re-encode their kept blocks together, one engine call per kept block, while the other rows
sit out those calls (rows started together, as in an evaluation, slide at the same step).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np

from par_deploy.errors import ActionError, InputError, ParError
from par_deploy.runtime.bundle import Bundle
from par_deploy.runtime.policy import Policy


class BatchActionError(ActionError):
    """Some rows produced a non-finite action. ``rows`` names them; ``chunks`` holds every other active row's
    chunk (already fed back into its episode), ``None`` for the failed and idle rows."""

    def __init__(self, message: str, rows: list[int], chunks: list[np.ndarray | None]):
        super().__init__(message)
        self.rows, self.chunks = rows, chunks


class _Row(Policy):
    """One row's episode state; its engine hooks are the batch's (``act`` is not called on a row)."""

    def __init__(self, batch: BatchPolicy, row: int, seed: int):
        super().__init__(batch.spec, batch.normalizer, seed)
        self._batch, self._row = batch, row

    @property
    def denoise_steps(self) -> int:
        return self._batch.denoise_steps

    def _reset(self, instruction: str) -> None:
        self._batch._reset_row(self._row, instruction)

    def step_block(self, *args) -> None:  # pragma: no cover - the batch runs the engine
        raise RuntimeError("a batch row is stepped by BatchPolicy.act_batch")

    def sample(self, noise: np.ndarray) -> np.ndarray:  # pragma: no cover - the batch runs the engine
        raise RuntimeError("a batch row is sampled by BatchPolicy.act_batch")

    def _slide(self) -> None:
        """Deferred: the batch re-encodes every full row together once all rows' inputs have passed."""
        self._batch._sliding.append(self._row)


class BatchPolicy(ABC):
    """N episodes per engine call. ``act_batch`` takes a stacked dict (every row acts) or a list of N
    observation dicts (``None``: the row sits out); ``reset(row=None)`` starts new episodes (all rows or one).

    Row ``r``'s noise generator is seeded ``seed + r``. ``act_batch`` and ``reset`` are serialised by a lock.
    """

    backend: str = ""

    def __init__(self, bundle: Bundle, seed: int = 0):
        self.bundle, self.spec, self.normalizer = bundle, bundle.spec, bundle.normalizer
        self.batch = bundle.batch
        self._rows = [_Row(self, r, seed + r) for r in range(self.batch)]  # private: a row's own reset is unlocked
        self._lock = threading.Lock()
        self._sliding: list[int] = []  # rows whose full cache slides before this call's block
        self.denoise_steps = bundle.steps
        bundle.text_prefix()  # read and checked once, at load

    # -- public API ----------------------------------------------------------------------------
    def reset(self, instruction: str | None = None, seed: int | None = None, row: int | None = None) -> None:
        """Start a new episode in row ``row`` (None: every row; ``seed`` then seeds row r with ``seed + r``)."""
        with self._lock:
            for r in self._row_indices(row):
                self._rows[r].reset(instruction, None if seed is None else seed + (r if row is None else 0))

    def noise_shape(self) -> tuple[int, ...]:
        """``[N, K+1, L, A]``: the ``noise`` ``act_batch`` takes (row r's draws at ``noise[r]``)."""
        return (self.batch, *self._rows[0].noise_shape())

    @property
    def steps_left(self) -> list[int | float]:
        """Control steps before each row's cache is full."""
        with self._lock:
            return [r.steps_left for r in self._rows]

    @property
    def last_chunk(self) -> np.ndarray:
        """Each row's last normalised chunk ``[N, L, A]`` (what its next step feeds back), a copy."""
        with self._lock:
            return np.stack([r.last_chunk for r in self._rows])

    def act_batch(self, observations, noise: np.ndarray | None = None, executed=None):
        """One control step of every active row -> actions in controller units (``spec.stride`` per row).

        ``observations``: a dict of stacked arrays (``rgb`` uint8 ``[N, V, H, W, 3]``, ``state`` float32
        ``[N, S]``; every row acts; returns ``[N, stride, A]``) or a list of N observation dicts as ``Policy.act``
        takes them, ``None`` for a row that sits out (returns a list, ``None`` at those rows). ``noise``:
        float32 ``[N, K+1, L, A]``; ``executed``: ``[N, stride, A]`` or a list of N (``None``: the returned
        actions).
        Every active row's inputs are validated before anything runs; an error names the row.
        """
        obs, stacked = self._split_observations(observations)
        noise = self._per_row(noise, "noise", self.noise_shape())
        executed = self._per_row(executed, "executed", (self.batch, self.spec.stride, self.spec.action_dim))
        with self._lock:
            _, k1, L, A = self.noise_shape()
            blocks, noises = {}, np.zeros((k1, self.batch, L, A), np.float32)  # idle rows: zeros, dropped
            rng_states = {r: self._rows[r]._rng.bit_generator.state for r, o in enumerate(obs) if o is not None}
            self._sliding = []
            try:
                for r, o in enumerate(obs):
                    if o is not None:
                        blocks[r], noises[:, r] = self._on_row(r, self._rows[r]._prepare, o, noise[r], executed[r])
            except Exception:  # a refused call uses up no row's noise draws and slides nothing, as Policy.act
                for r, state in rng_states.items():
                    self._rows[r]._rng.bit_generator.state = state
                raise
            if not blocks:
                raise InputError("observations: every row is None; pass at least one row's observation")
            self._slide_rows(self._sliding)
            self._step(blocks)
            for r, block in blocks.items():
                self._rows[r]._remember(block)
            chunks = self.sample_rows(noises)
            out: list[np.ndarray | None] = [None] * self.batch
            failed = []
            for r in blocks:
                try:
                    out[r] = self._rows[r]._finish(chunks[r])
                except ActionError:
                    failed.append(r)
        if failed:
            raise BatchActionError(
                f"rows {failed} produced non-finite actions (refused; their caches may hold non-finite values: "
                "reset those rows); the other rows' chunks are in this error's .chunks",
                failed,
                out,
            )
        return np.stack(out) if stacked else out

    # -- helpers -------------------------------------------------------------------------------
    def _row_indices(self, row: int | None) -> range:
        if row is None:
            return range(self.batch)
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < self.batch:
            raise InputError(f"row: expected an integer in [0, {self.batch}) (this engine runs {self.batch} rows)")
        return range(row, row + 1)

    def _split_observations(self, observations) -> tuple[list, bool]:
        n = self.batch
        if isinstance(observations, dict):
            rows = []
            for key, value in observations.items():
                if not isinstance(value, np.ndarray) or value.ndim < 1 or value.shape[0] != n:
                    found = getattr(value, "shape", type(value).__name__)
                    raise InputError(
                        f"observations[{key!r}]: expected a stacked array with {n} rows (one per episode) on "
                        f"axis 0, found {found}; pass a list of per-row dicts to leave rows out"
                    )
            for r in range(n):
                rows.append({key: value[r] for key, value in observations.items()})
            return rows, True
        if isinstance(observations, list | tuple):
            if len(observations) != n:
                raise InputError(
                    f"observations: expected {n} entries (one per episode row, None for a row that sits out), "
                    f"found {len(observations)}"
                )
            return list(observations), False
        raise InputError(
            f"observations: expected a dict of stacked arrays or a list of {n} dicts, "
            f"found {type(observations).__name__}"
        )

    def _per_row(self, value, name: str, shape: tuple[int, ...]) -> list:
        if value is None:
            return [None] * self.batch
        if isinstance(value, list | tuple):
            if len(value) != self.batch:
                raise InputError(f"{name}: expected {self.batch} entries (one per row), found {len(value)}")
            return list(value)
        if not isinstance(value, np.ndarray) or value.shape != shape:
            found = getattr(value, "shape", type(value).__name__)
            raise InputError(f"{name}: expected an array of shape {list(shape)}, found {found}")
        return list(value)

    def _on_row(self, r: int, fn, *args):
        """Call ``fn`` for row ``r``; an error names the row (same exception type)."""
        try:
            return fn(*args)
        except (ParError, ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"row {r}: {e}") from None

    def _step(self, blocks: dict, pos: int | None = None) -> None:
        """Stage every row's block (idle rows: zeros, results dropped) at its row's position (or ``pos``) and run
        the step graph."""
        s, n = self.spec, self.batch
        rgb = np.zeros((n, s.num_cameras, s.image_size, s.image_size, 3), np.uint8)
        state = np.zeros((n, s.state_dim), np.float32)
        prev = np.zeros((n, s.chunk_len, s.action_dim), np.float32)
        first, positions = np.zeros(n, bool), np.zeros(n, np.int64)
        for r, (o_rgb, o_state, o_prev, o_first) in blocks.items():
            rgb[r], state[r], prev[r], first[r] = o_rgb, o_state, o_prev, o_first
            positions[r] = self._rows[r]._pos if pos is None else pos
        self.step_rows(rgb, state, prev, first, positions, sorted(blocks))

    def _slide_rows(self, rows: list[int]) -> None:
        """``Policy._slide`` for several rows at once: clear each row's cache, then re-encode the kept blocks of
        every row together, one engine call per position (the other rows sit out)."""
        keeps = {r: self._rows[r]._kept_blocks() for r in rows}
        for r in rows:
            self._reset_row(r, self._rows[r]._instruction)
        for pos in range(max((len(k) for k in keeps.values()), default=0)):
            self._step({r: keep[pos] for r, keep in keeps.items() if pos < len(keep)}, pos)
        for r, keep in keeps.items():
            self._rows[r]._restart_window(keep)

    # -- backend hooks -------------------------------------------------------------------------
    @abstractmethod
    def _reset_row(self, row: int, instruction: str) -> None:
        """Clear row ``row`` of the cache and write the instruction's text prefix."""

    @abstractmethod
    def step_rows(self, rgb, state, prev_chunk, first, pos, rows: list[int]) -> None:
        """Append one block per row (``[N, ...]`` normalised inputs, ``pos`` int64 ``[N]``) and commit the new
        keys/values of ``rows`` only; keep every row's Action-DiT condition for ``sample_rows``."""

    @abstractmethod
    def sample_rows(self, noise: np.ndarray) -> np.ndarray:
        """noise ``[K+1, N, L, A]`` -> normalised chunks ``[N, L, A]`` from the last step's conditions."""
