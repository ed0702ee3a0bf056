"""Teacher-forced action error of a checkpoint on its demonstrations: how far the policy's actions are from the
demo's when it is fed the demo's observations and executed actions (no closed loop, no compounding).

    python scripts/replay_error.py runs/push-c16-long/final --data data/PushCube --episodes 5

For each demo episode the PyTorch reference policy is reset, then at every control step (every ``spec.stride``
env steps) it acts on the demo's observation, with the demo's actions since the previous step as ``executed``;
the printed number per control step is the mean absolute difference between the actions it returns and the
demo's next actions, in normalised units (each action dimension scaled to [-1, 1] as in training). A row per
episode, a column per control step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from par_deploy.reference import TorchPolicy
from par_deploy.train.demo_format import list_episodes, load_episode, load_meta


def episode_errors(policy: TorchPolicy, episode: dict, seed: int = 0) -> list[float]:
    """Per control step: mean |policy action - demo action| (normalised) over the actions it returned."""
    S, nz = policy.spec.stride, policy.normalizer
    actions = episode["actions"].astype(np.float32)
    policy.reset(seed=seed)
    errors = []
    for t in range(0, len(actions), S):
        obs = {"rgb": episode["rgb"][t], "state": episode["state"][t].astype(np.float32)}
        got = policy.act(obs, executed=None if t == 0 else actions[t - S : t])
        want = actions[t : t + S]
        errors.append(float(np.abs(nz.normalize_action(got[: len(want)]) - nz.normalize_action(want)).mean()))
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="demo directory (par-deploy demos)")
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--denoise-steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    policy = TorchPolicy.from_pretrained(args.checkpoint, steps=args.denoise_steps)
    meta = load_meta(args.data)
    for path in list_episodes(args.data)[: args.episodes]:
        errors = episode_errors(policy, load_episode(path, meta))
        print(f"{path.name}: " + " ".join(f"{e:.3f}" for e in errors), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
