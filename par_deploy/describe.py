"""``par-deploy info`` and ``par-deploy demo``: what a model is, and the main job run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from par_deploy.config import preset as make_preset
from par_deploy.locate import shipped_checkpoint_path
from par_deploy.model.par import PARModel

SHIPPED_CHECKPOINT = shipped_checkpoint_path("PushCube")
PAPER_TABLE_1_M = {
    "causal_transformer": 608.7,
    "frame_detokenizer": 32.8,
    "action_detokenizer": 21.1,
    "action_tokenizer": 0.6,
    "total": 663.2,
}


def describe(preset: str = "cpu-small", checkpoint: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    if checkpoint is not None:
        from par_deploy.config import PARConfig

        cfg, title = PARConfig.load(Path(checkpoint) / "config.json"), str(checkpoint)
    else:
        cfg, title = make_preset(preset), f"preset {preset}"
    with torch.device("meta"):
        groups = PARModel(cfg, load_frozen=False).parameter_groups()
    table = Table(title=f"PAR parameters, {title}")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("paper Table 1", justify="right")
    for name, count in groups.items():
        table.add_row(name, f"{count / 1e6:.2f}M", f"{PAPER_TABLE_1_M[name]}M")
    console.print(table)
    console.print(
        f"tokens per block: {cfg.frame_tokens} frame + {cfg.state_tokens} state + {cfg.chunk_len} action; "
        f"text prefix {cfg.num_text_tokens}; cache {cfg.max_blocks} blocks = {cfg.max_seq_len} slots; "
        f"variant {cfg.variant}; codec {cfg.codec}"
    )
    return groups


class RandomObservationEnv:
    """The ``ParEnv`` interface over random observations (uniform pixels, states drawn from the policy's
    normalisation statistics): what the demo drives when the simulator is unavailable. Never succeeds."""

    def __init__(self, spec, normalizer):
        self.spec, self.normalizer = spec, normalizer
        self.num_cameras, self.image_size, self.state_dim = spec.num_cameras, spec.image_size, spec.state_dim
        self.action_dim = spec.action_dim
        self.max_episode_steps = spec.max_blocks * spec.stride  # the whole cache
        self._rng = np.random.default_rng(0)

    def _obs(self) -> dict[str, np.ndarray]:
        s, n = self.spec, self.normalizer
        rgb = self._rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8)
        return {"rgb": rgb, "state": n.sample_state(self._rng)}

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self._rng = np.random.default_rng(seed)
        return self._obs()

    def step(self, action: np.ndarray):
        return self._obs(), 0.0, False, False, {"success": False}

    def close(self) -> None:
        pass


def _demo_env(task: str, policy, console: Console):
    """The task's ManiSkill environment, or (the simulator is optional for the demo) random observations."""
    s = policy.spec
    try:
        from par_deploy.sim import make_env

        control_mode = policy.bundle.config.task_info.control_mode or "pd_ee_delta_pos"
        return make_env(task, image_size=s.image_size, control_mode=control_mode), f"ManiSkill {task}"
    except Exception as e:  # noqa: BLE001 - say why it is not used and go on without it
        console.print(f"[yellow]simulator unavailable ({type(e).__name__}: {e}); random observations[/]")
        return RandomObservationEnv(s, policy.normalizer), "random observations"


def run_demo(
    task: str = "PushCube",
    checkpoint: Path | None = None,
    steps: int = 0,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """The main job: checkpoint -> ONNX engine -> the torch-free runtime drives one episode.

    The checkpoint defaults to ``task``'s shipped one; its bundle is ``bundles/<task>`` (``par_deploy.locate``).
    The episode is ``par-deploy eval``'s (``par_deploy.eval.Episode``): initial state ``seed`` (``env.reset(seed=
    500000 + seed)``), policy seed ``seed``, stopped at the first success or the task's horizon; ``steps`` > 0
    stops it after that many control steps. Without the simulator the runtime is fed random observations.
    """
    from par_deploy import runtime
    from par_deploy.eval import EVAL_SEED_BASE, Episode
    from par_deploy.locate import BUNDLES_ROOT, ensure_bundle, task_bundle
    from par_deploy.sim.env import TASKS
    from par_deploy.threads import free_cores

    torch.set_num_threads(free_cores())  # for an export
    console = console or Console()
    resolved = (
        task_bundle(task, console)
        if checkpoint is None
        else ensure_bundle(checkpoint, BUNDLES_ROOT / Path(checkpoint).name, console)
    )
    console.print(resolved.describe())
    policy = runtime.load(resolved.bundle, "onnx", seed=seed)
    task = policy.bundle.config.task_info.task or task
    env, source = _demo_env(task, policy, console)
    instruction = TASKS[task].instruction if task in TASKS else policy.spec.instructions[0]
    episode = Episode(
        policy,
        env,
        instruction=instruction,
        env_seed=EVAL_SEED_BASE + seed,
        policy_seed=seed,
        max_steps=env.max_episode_steps,
        stop_on_success=True,
    )
    try:
        for step in episode:
            first = [round(float(x), 3) for x in step.chunk[0]]
            console.print(
                f"step {step.index}: chunk {step.chunk.shape}, first action {first}, "
                f"{step.act_ms:.1f} ms, success {step.success}"
            )
            if steps and step.index + 1 >= steps:
                break
    finally:
        env.close()
    if episode.error:
        console.print(f"[yellow]episode ended: {episode.error}[/]")
    summary = {
        "source": f"{source}, initial state seed {EVAL_SEED_BASE + seed}",
        "control_steps": len(episode.act_ms),
        "env_steps": episode.length,
        "success": episode.success_once,
        "act_ms_p50": float(np.median(episode.act_ms)) if episode.act_ms else None,
        "backend": "onnx",
        "denoise_steps": policy.denoise_steps,
    }
    p50 = "-" if summary["act_ms_p50"] is None else f"{summary['act_ms_p50']:.1f}"
    console.print(
        f"[bold]{summary['source']}: {summary['control_steps']} control steps ({episode.length} env "
        f"steps), success {episode.success_once}; engine act() p50 {p50} ms on ONNX Runtime[/]"
    )
    return summary
