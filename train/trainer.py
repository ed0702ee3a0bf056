"""The training loop: AdamW with warm-up + cosine decay, gradient clipping, EMA, periodic self-describing
checkpoints, exact resume, JSONL metrics, a rich progress bar; DDP when launched by ``torchrun``.

Run directory layout::

    <run>/train_config.json     TrainConfig of the run (a resumed run must use the same one)
    <run>/state.safetensors     resumable training state: weights, EMA, optimizer tensors, torch RNG states
    <run>/state.json            the rest of it (step, data position, numpy/Python RNG states); no pickle,
                                see par_deploy.train.resume
    <run>/metrics.jsonl         one JSON line per logged step
    <run>/checkpoints/step_XXXXXXX/   self-describing checkpoints (EMA weights), see par_deploy.checkpoint
    <run>/final/                the last checkpoint (EMA weights)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from par_deploy.checkpoint import save_pretrained
from par_deploy.config import PARConfig, preset
from par_deploy.errors import ConfigError
from par_deploy.model.par import PARModel
from par_deploy.train.dataset import BatchSampler, EpisodeDataset
from par_deploy.train.resume import has_state, load_state, rng_state, save_state, set_rng_state


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 8  # episodes per optimizer step (global, across DDP ranks)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    history: int = 0  # blocks of history per sample (0: config.max_blocks, whole episodes)
    # > 0: train on windows of this many blocks cut anywhere in the episode, positions from 0 in each window, and
    # deploy with a sliding cache of that length (config max_blocks = window, overflow "slide"): the policy then
    # runs for any number of control steps and only ever sees positions it was trained on.
    window: int = 0
    phase_augment: bool = True
    shift_augment: int = 0  # pixels: each window's frames shifted by one random offset up to this (0: none)
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    threads: int = 1  # torch threads per process: pick from the free cores (docs/design-notes.md §5)
    limit_episodes: int | None = None
    # Autocast of the forward pass: "bf16" runs the matmuls in bfloat16 (1.65x faster per step than "fp32" on an
    # avx512_bf16 CPU, ~12x slower where bf16 is emulated, e.g. AVX2-only; docs/recipe.md); "auto" picks bf16 only
    # where oneDNN supports it natively.
    precision: str = "auto"
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "log_every", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.shift_augment < 0:
            raise ConfigError(f"TrainConfig.shift_augment must be >= 0 pixels, got {self.shift_augment}")
        if self.window < 0 or self.window == 1:
            raise ConfigError(f"TrainConfig.window must be 0 (whole episodes) or >= 2 blocks, got {self.window}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device_type: str = "cpu") -> torch.dtype | None:
    """The autocast dtype of a training precision (None: no autocast, float32)."""
    if precision == "auto":
        fast = device_type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if fast else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EMA:
    """Exponential moving average of the weights with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    preset_name: str = "cpu-small",
    tc: TrainConfig | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> Path | None:
    """Train (or resume) a PAR model on a demonstration directory.

    Returns the final checkpoint path, or None when ``stop_at`` (a step count) ended this call early: the
    state is saved and the same call resumes exactly where it stopped.
    """
    tc = tc or TrainConfig()
    run = Path(run_dir)
    rank, world = _dist_info()
    torch.set_num_threads(tc.threads)
    if tc.batch_size % world:
        raise ConfigError(f"batch_size {tc.batch_size} must be divisible by the number of processes ({world})")

    data = EpisodeDataset(data_dir, tc.limit_episodes)
    cfg = _model_config(data, preset_name, tc)
    history = tc.window or tc.history or cfg.max_blocks
    torch.manual_seed(tc.seed)
    model = PARModel(cfg)
    ema = EMA(model, tc.ema_decay)
    opt = _optimizer(model, tc)
    sampler = BatchSampler(
        data, cfg, tc.batch_size, history, tc.seed, tc.phase_augment, rank, world, shift=tc.shift_augment
    )
    step = _resume_or_start(run, tc, cfg, model, ema, opt, sampler, rank, world)

    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
    bar = _progress(progress and rank == 0, tc.steps, step)
    amp = autocast_dtype(tc.precision)
    t0, c0, episodes_done = time.perf_counter(), time.process_time(), 0
    spent = _time_spent(run / "metrics.jsonl", step)  # wall/CPU seconds of earlier sessions of this run
    while step < tc.steps:
        if stop_at is not None and step >= stop_at:
            _save_state(run, model, ema, opt, sampler, step, data, rank, world)
            bar.close()
            return None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        batch = sampler.next_batch()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = net(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        episodes_done += len(batch["instructions"]) * world
        if rank == 0 and (step % tc.log_every == 0 or step == tc.steps):
            rate = episodes_done / (time.perf_counter() - t0)
            rec = {
                "step": step,
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": float(gnorm),
                "episodes_per_s": rate,
                "elapsed_s": spent[0] + time.perf_counter() - t0,
                "cpu_s": spent[1] + time.process_time() - c0,
                **{k: float(v.detach()) for k, v in out.items()},
            }
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.update(step, rec)
        if step % tc.save_every == 0 or step == tc.steps:
            _save_state(run, model, ema, opt, sampler, step, data, rank, world)
    bar.close()
    final = run / "final"
    if rank == 0:
        save_pretrained(model, data.normalizer, final, state_dict=ema.shadow)
        metrics.close()
    if world > 1:
        dist.barrier()
    return final


def _model_config(data: EpisodeDataset, preset_name: str, tc: TrainConfig) -> PARConfig:
    """The preset with the fields the data decides, a cache for the longest episode (or the window), and the
    user's overrides."""
    fields = data.model_fields()
    stride = preset(preset_name, **{**fields, **tc.model_overrides}).stride
    fields["max_blocks"] = -(-max(data.max_steps, data.meta["max_episode_steps"]) // stride) + 1
    if tc.window:
        fields.update(max_blocks=tc.window, overflow="slide")
    return preset(preset_name, **{**fields, **tc.model_overrides})


def _optimizer(model: PARModel, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and learned embeddings/tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith(("pos", "boa", "tokens", "mask_token")) else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
    )


def _resume_or_start(run: Path, tc: TrainConfig, cfg, model, ema, opt, sampler, rank: int, world: int) -> int:
    """Restore a run's saved state exactly (same TrainConfig required) or start it; returns the step."""
    if not has_state(run):
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            (run / "train_config.json").write_text(json.dumps(_tc_json(tc), indent=2) + "\n")
            cfg.save(run / "model_config.json")
        return 0
    # options added since the run started take their defaults
    tc_saved = {**_tc_json(TrainConfig()), **json.loads((run / "train_config.json").read_text())}
    if tc_saved != _tc_json(tc):
        raise ConfigError(
            f"{run}: resuming with a different TrainConfig than the run was started with; "
            f"pass the options in {run / 'train_config.json'} or use a new --out"
        )
    st = load_state(run, rank, world)
    model.load_state_dict(st["model"])
    ema.shadow = st["ema"]
    opt.load_state_dict(st["optimizer"])
    sampler.load_state_dict(st["sampler"])
    set_rng_state(st["rng"])
    return st["step"]


def _time_spent(metrics: Path, step: int) -> tuple[float, float]:
    """Training wall and CPU seconds logged up to ``step`` by earlier sessions of a resumed run (0, 0 if new).

    Approximate by at most ``log_every`` steps of the interrupted session, which were redone after the resume.
    """
    last = (0.0, 0.0)
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("step", step + 1) <= step and "elapsed_s" in rec:
                last = (float(rec["elapsed_s"]), float(rec["cpu_s"]))
    return last


def _tc_json(tc: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(tc)))


def _save_state(run, model, ema, opt, sampler, step, data, rank, world) -> None:
    rngs = [rng_state()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if rank != 0:
        return
    save_state(run, step, model.state_dict(), ema.shadow, opt.state_dict(), sampler.state_dict(), rngs)
    save_pretrained(model, data.normalizer, run / "checkpoints" / f"step_{step:07d}", state_dict=ema.shadow)


class _progress:
    """A rich progress bar with the latest losses and throughput (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, step: int, rec: dict) -> None:
        if self.bar:
            info = (
                f"loss {rec['loss']:.4f} (frame {rec['frame_loss']:.4f}, action {rec['action_loss']:.4f}) "
                f"{rec['episodes_per_s']:.1f} ep/s"
            )
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
