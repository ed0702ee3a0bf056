"""The evaluation protocol: which initial states, which policy seeds, in which order (paper §5.1).

Episode ``k`` runs initial state ``i = k // len(seeds)`` with policy seed ``j = seeds[k % len(seeds)]``
(state-major). ``states`` initial states x ``seeds`` give ``states * len(seeds)`` episodes; the default 25 x 5
is the paper's 125 rollouts. Any number of episodes is a prefix of the same ordered list, so a longer run
extends a shorter one. A figure over 125 distinct states is ``--states 125 --seeds 0`` (one policy seed).

- Initial state ``i``: ``env.reset(seed=seed_base + i)``, ``seed_base`` 500,000 by default. Demonstrations use
  seeds ``0 .. n-1`` and retry seeds ``>= 10**6`` (``par_deploy.train.demos``), so an evaluation never starts
  from a state the policy was trained on (for up to 500,000 demos).
- Policy seed ``j``: ``policy.reset(seed=j)``, the global numpy / random / torch generators seeded from ``j``,
  and the sampling noise of every control step drawn from ``np.random.default_rng(j)`` and passed to
  ``policy.act(obs, noise=...)``: every backend sees the same noise arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from par_deploy.errors import ActionError, CacheFullError, ParError

EVAL_SEED_BASE = 500_000  # initial state i -> env.reset(seed=EVAL_SEED_BASE + i); demos use 0..n-1 and >= 10**6
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_STATES = 25
DEFAULT_EPISODES = DEFAULT_STATES * len(DEFAULT_SEEDS)
DEFAULT_TIMEOUT = 600.0  # seconds per episode
STARTUP_TIMEOUT = 300.0  # seconds for a worker to load its policy and environment (at least the episode timeout)
DEFAULT_RETRIES = 2
POLICY_ERRORS = (CacheFullError, ActionError)  # outcomes of the policy: end the episode, recorded, not retried
EPISODE_ORDER = "state-major: episode k = (k // len(seeds), seeds[k % len(seeds)])"
ISOLATION = "fresh environment, policy reset and global RNGs seeded per episode"


class EvalError(ParError, RuntimeError):
    """The evaluation cannot run (bad arguments, a worker that cannot start, a missing checkpoint)."""


class EvalMismatch(ParError, ValueError):
    """A results file was written for another protocol or policy, so it cannot be resumed."""


@dataclass(frozen=True)
class EpisodeJob:
    index: int  # position in the protocol's episode order
    state: int  # initial state i: env.reset(seed=state_seed_base + i)
    policy_seed: int  # j: policy.reset(seed=j) and the noise RNG

    @property
    def key(self) -> tuple[int, int]:
        return (self.state, self.policy_seed)


def episode_jobs(episodes: int, seeds: Sequence[int]) -> list[EpisodeJob]:
    """The protocol's first ``episodes`` jobs: job k runs state ``k // len(seeds)`` with seed ``seeds[k % len]``."""
    n = len(seeds)
    return [EpisodeJob(k, k // n, int(seeds[k % n])) for k in range(episodes)]


def parse_seeds(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"0-4"``, ``"0,1,2"``, ``"0-2,7"`` or a sequence of ints -> a tuple of unique seeds (order kept)."""
    if text is None:
        return DEFAULT_SEEDS
    if isinstance(text, str):
        seeds: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
            except ValueError:
                raise EvalError(f"--seeds: cannot read {part!r}; write e.g. 0-4 or 0,1,2,3,4") from None
    else:
        seeds = [int(s) for s in text]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise EvalError(f"policy seeds must be a non-empty list of distinct non-negative ints, got {seeds}")
    return tuple(seeds)


def episode_count(states: int | None, episodes: int | None, seeds: Sequence[int]) -> int:
    """Episodes to run: ``episodes`` (a prefix) of ``states`` x ``len(seeds)``; ``states`` defaults to 25 when
    neither is given, to what ``episodes`` needs otherwise."""
    if states is not None and states < 1:
        raise EvalError(f"--states must be >= 1, got {states}")
    if episodes is not None and episodes < 1:
        raise EvalError(f"--episodes must be >= 1, got {episodes}")
    if episodes is None:
        return (states or DEFAULT_STATES) * len(seeds)
    if states is not None and episodes > states * len(seeds):
        raise EvalError(
            f"--episodes {episodes} is more than --states {states} x {len(seeds)} seeds; raise "
            f"--states to {-(-episodes // len(seeds))} or drop --episodes"
        )
    return episodes


def protocol_dict(
    task: str,
    env_id: str,
    instruction: str,
    control_mode: str,
    image_size: int,
    max_steps: int,
    seeds: Sequence[int],
    state_seed_base: int,
    stop_on_success: bool,
) -> dict:
    """What makes two evaluations comparable (a results file resumes only under the same protocol)."""
    return {
        "task": task,
        "env_id": env_id,
        "instruction": instruction,
        "control_mode": control_mode,
        "image_size": image_size,
        "max_steps": max_steps,
        "state_seed_base": state_seed_base,
        "policy_seeds": list(seeds),
        "episode_order": EPISODE_ORDER,
        "stop_on_success": stop_on_success,
        "isolation": ISOLATION,
    }


def seed_globals(seed: int) -> None:
    """Seed the process-global generators an episode may touch (numpy, random, torch when imported)."""
    import random
    import sys

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")  # an engine worker never imports torch for this
    if torch is not None:
        torch.manual_seed(seed)
