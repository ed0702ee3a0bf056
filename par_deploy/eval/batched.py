"""Batched rollouts: one worker steps up to N episodes, each in its own environment, through one engine call per
control step (a bundle exported with ``par-deploy export --batch N``, loaded as a ``runtime.BatchPolicy``).

Every episode keeps the batch-1 rules of ``episode.Episode`` (its own initial state, policy seed, noise
generator and environment; the same stop rules and record), so a batched evaluation resumes, compares and is
reported exactly as a batch-1 one. What differs: the episodes of a group advance in lockstep, an episode that
has ended sits out (its row is computed and dropped) until the whole group is done, and each record's
``act_ms`` is the time of the shared engine call. A row that produces a non-finite action ends its own
episode only; an error that refuses the whole call (``CacheFullError``: the rows of a group start together, so
they reach the end of their static caches at the same step) ends every episode that was acting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np

from par_deploy.eval.episode import Episode, EpisodeRecord, check_compatible
from par_deploy.eval.protocol import POLICY_ERRORS, EpisodeJob, EvalError
from par_deploy.runtime.batch_policy import BatchActionError


class _RowView:
    """What an ``Episode`` needs of its policy (``reset``, ``noise_shape``), served by one row of a batch."""

    def __init__(self, batch, row: int):
        self.batch, self.row = batch, row

    def reset(self, instruction: str, seed: int | None = None) -> None:
        self.batch.reset(instruction, seed=seed, row=self.row)

    def noise_shape(self) -> tuple[int, ...]:
        return self.batch.noise_shape()[1:]

    def act(self, *args, **kwargs):  # pragma: no cover - the batched runner acts for the row
        raise RuntimeError("a batch row acts through BatchEpisodeRunner")


class BatchEpisodeRunner:
    """Runs groups of up to ``policy.batch`` episode jobs of one ``BatchPolicy`` (loaded once per worker); a new
    environment per episode, as ``EpisodeRunner``. ``run(jobs)`` returns one ``EpisodeRecord`` per job."""

    def __init__(self, setup, policy=None):
        if setup.video_dir is not None:
            raise EvalError("--video needs a batch-1 engine (a batched bundle runs its episodes in lockstep)")
        self.setup = setup
        self.policy = policy if policy is not None else setup.policy.load()
        env = setup.make_env()  # created now: a broken simulator fails at start
        try:
            check_compatible(self.policy.spec, env, setup.instruction)
        finally:
            with contextlib.suppress(Exception):
                env.close()

    def close(self) -> None:
        pass

    def run(self, jobs: Sequence[EpisodeJob]) -> list[EpisodeRecord]:
        if not 1 <= len(jobs) <= self.policy.batch:
            raise EvalError(f"a group holds 1 to {self.policy.batch} episodes, got {len(jobs)}")
        s, t_start, envs = self.setup, time.perf_counter(), []
        try:
            episodes = []
            for row, job in enumerate(jobs):
                envs.append(s.make_env())
                episodes.append(
                    Episode(
                        _RowView(self.policy, row),
                        envs[-1],
                        instruction=s.instruction,
                        env_seed=s.state_seed_base + job.state,
                        policy_seed=job.policy_seed,
                        max_steps=s.max_steps,
                        stop_on_success=s.stop_on_success,
                    )
                )
                episodes[-1].start()
            while self._control_step(episodes):
                pass
        finally:
            for env in envs:
                with contextlib.suppress(Exception):
                    env.close()
        seconds = time.perf_counter() - t_start
        return [ep.record(job, seconds) for ep, job in zip(episodes, jobs, strict=True)]

    def _control_step(self, episodes: list[Episode]) -> bool:
        """One engine call for every episode still running; False when none is."""
        noises = {r: n for r, ep in enumerate(episodes) if (n := ep.next_noise()) is not None}
        if not noises:
            return False
        noise = np.zeros(self.policy.noise_shape(), np.float32)
        obs: list = [None] * self.policy.batch
        for r, n in noises.items():
            noise[r], obs[r] = n, episodes[r].obs
        t0 = time.perf_counter()
        try:
            chunks = self.policy.act_batch(obs, noise=noise)
        except BatchActionError as e:
            for r in e.rows:
                episodes[r].fail(e)
            chunks = e.chunks
        except POLICY_ERRORS as e:
            for r in noises:
                episodes[r].fail(e)
            return True
        ms = (time.perf_counter() - t0) * 1e3
        for r in noises:
            if chunks[r] is not None:
                episodes[r].advance(chunks[r], ms)
        return True
