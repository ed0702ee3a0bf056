"""Parity of an exported engine with the eager PyTorch reference over a multi-step synthetic episode."""

from __future__ import annotations

import numpy as np
import torch

from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy
from par_deploy.runtime.engine import BundlePolicy
from par_deploy.synthetic import synthetic_batch

# int8 (dynamically quantized transformer-step weights): measured on the shipped PushCube checkpoint: hidden
# 0.018, condition 0.19, actions 0.009 (reference actions' std 0.30); the closed-loop check is `eval --compare`
INT8_HIDDEN, INT8_ACTIONS = 0.25, 0.05
TOLERANCES = {  # max abs diff allowed: hidden states / condition, normalised actions
    "fp32": {"hidden": 1e-4, "actions": 1e-3},
    "fp16": {"hidden": 5e-2, "actions": 5e-2},
    "int8": {"hidden": INT8_HIDDEN, "actions": INT8_ACTIONS},
}


class RecordingTorchPolicy(TorchPolicy):
    """``TorchPolicy`` that keeps the hidden states ``[1, Bl, D]`` of the last appended block."""

    last_hidden: torch.Tensor | None = None

    def block_hidden(self, *args, **kwargs) -> torch.Tensor:
        self.last_hidden = super().block_hidden(*args, **kwargs)
        return self.last_hidden


def synthetic_observations(model: PARModel, steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``steps`` observations of a synthetic episode (``par_deploy.synthetic``), as ``Policy.act`` takes."""
    cfg = model.cfg
    batch = synthetic_batch(cfg, batch=1, blocks=max(steps, 1), seed=seed)
    obs = []
    for n in range(steps):
        o = {"rgb": batch["rgb"][0, n].numpy()}
        if cfg.state_dim:
            o["state"] = batch["state"][0, n].numpy().astype(np.float32)
        obs.append(o)
    return obs


def parity_report(
    model: PARModel,
    normalizer: Normalizer,
    engine: BundlePolicy,
    steps: int = 4,
    seed: int = 0,
    precision: str = "fp32",
) -> dict:
    """Run the same episodes through ``engine`` and ``TorchPolicy`` (same sampler, same noise per step).

    One episode of ``steps`` control steps per instruction of the config; each policy feeds back its own
    previous chunk, as in deployment. Reports the max abs differences of the frame hidden states, the
    Action-DiT condition and the normalised actions, the spread of the reference actions and the fraction
    not clipped to +-1 (action parity only means something for actions that vary and are not saturated),
    and ``passed`` against ``TOLERANCES[precision]``.
    """
    steps = min(steps, model.cfg.max_blocks)
    ref = RecordingTorchPolicy(
        model, normalizer, sampler=engine.bundle.manifest["sampler"]["kind"], steps=engine.denoise_steps
    )
    rng = np.random.default_rng(seed)
    obs = synthetic_observations(model, steps, seed)
    K_o = model.cfg.frame_tokens
    diffs = {"hidden": 0.0, "cond": 0.0, "actions": 0.0}
    ref_actions = []
    for instruction in model.cfg.instructions:
        ref.reset(instruction)
        engine.reset(instruction)
        for o in obs:
            noise = rng.standard_normal(engine.noise_shape()).astype(np.float32)
            engine.act(o, noise=noise)
            ref.act(o, noise=noise)
            h = ref.last_hidden
            with torch.no_grad():
                cond = model.action_condition(h)[0].numpy()
            frame = h[0, :K_o].numpy()
            diffs["hidden"] = max(diffs["hidden"], float(np.abs(engine.last_frame_hidden - frame).max()))
            diffs["cond"] = max(diffs["cond"], float(np.abs(engine.last_action_cond - cond).max()))
            diffs["actions"] = max(diffs["actions"], float(np.abs(engine.last_chunk - ref.last_chunk).max()))
            ref_actions.append(ref.last_chunk)
    acts = np.stack(ref_actions)
    tol = TOLERANCES[precision]
    passed = (
        diffs["hidden"] <= tol["hidden"]
        and diffs["cond"] <= tol["hidden"]
        and diffs["actions"] <= tol["actions"]
    )
    return {
        "backend": engine.backend,
        "episodes": len(model.cfg.instructions),
        "steps": steps,
        "hidden_max_abs": diffs["hidden"],
        "cond_max_abs": diffs["cond"],
        "actions_max_abs": diffs["actions"],
        "reference_actions_std": float(np.std(acts)),
        "reference_actions_unsaturated": float((np.abs(acts) < 0.999).mean()),
        "tolerance": tol,
        "passed": bool(passed),
    }
