"""The ``par-deploy`` command line. It only parses arguments and calls importable functions.

Errors: every command is registered through ``command``, which turns a ``ParError`` (a bad input the user can
fix) into one red line on stderr, ``error: <file or input>: <what is wrong and what to do>``, and exit code 2.
``par-deploy --debug CMD`` or ``PAR_DEBUG=1`` shows the traceback instead. Other exceptions are bugs and
always show their traceback.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from par_deploy.errors import ConfigError, ParError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Train, export, benchmark and evaluate Physical Autoregressive Model (PAR) policies.",
)
_options = {"debug": False}


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (also: PAR_DEBUG=1).")] = False,
) -> None:
    _options["debug"] = debug


def _debug() -> bool:
    return _options["debug"] or os.environ.get("PAR_DEBUG", "") not in ("", "0")


def command(*args, **kwargs):
    """``app.command`` for a function whose ``ParError`` becomes one red line and exit code 2."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except ParError as e:
                if _debug():
                    raise
                message = " ".join(str(e).split())  # one line, whatever the message holds
                typer.secho(f"error: {message} (traceback: PAR_DEBUG=1)", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None

        return app.command(*args, **kwargs)(run)

    return register


# Each kind of step has its own option name: --control-steps (policy calls), --optimizer-steps (training),
# --denoise-steps (the Action-DiT sampler's K), --frame-ddim-steps (the frame de-tokenizer), --max-env-steps
# (simulator steps). The old spellings (--steps, --max-steps) still work, hidden, with a warning.
def _deprecated_option(old: str):
    """A hidden option keeping an old spelling working (``_renamed`` warns and maps it)."""
    return typer.Option(old, hidden=True, help=f"Deprecated spelling of another option ({old}).")


def _renamed(ctx: typer.Context, name: str, old_value, old: str, new: str):
    """The value of option ``new`` (parameter ``name``), or of its deprecated spelling ``old`` (a warning on
    stderr; both given, even ``new`` at its default value: an error)."""
    if old_value is None:
        return ctx.params[name]
    if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP"):  # typer vendors click: by name
        raise ConfigError(f"{old} and {new} are the same option ({old} is its old spelling); give {new} only")
    typer.secho(f"warning: {old} is deprecated here; use {new}", fg=typer.colors.YELLOW, err=True)
    return old_value


@command()
def info(
    preset: Annotated[str, typer.Option(help="Model preset: tiny, cpu-small or paper.")] = "cpu-small",
    checkpoint: Annotated[Path | None, typer.Option(help="Describe this checkpoint instead of a preset.")] = None,
) -> None:
    """Print a model's configuration and parameter counts per module (the paper's Table 1 grouping)."""
    from par_deploy.describe import describe

    describe(preset, checkpoint)


@command()
def demo(
    ctx: typer.Context,
    task: Annotated[str, typer.Option(help="Task whose shipped checkpoint runs (PushCube, ...).")] = "PushCube",
    checkpoint: Annotated[Path | None, typer.Option(help="Run this checkpoint instead of the task's.")] = None,
    control_steps: Annotated[
        int, typer.Option(help="Stop after this many control steps (policy calls; 0: the whole episode).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Initial state (env.reset(seed=500000 + SEED)) and policy seed.")] = 0,
    old_steps: Annotated[int | None, _deprecated_option("--steps")] = None,
) -> None:
    """The main job on the embedded default: export the checkpoint to ONNX, drive a ManiSkill episode with it."""
    from par_deploy.describe import run_demo

    run_demo(task, checkpoint, _renamed(ctx, "control_steps", old_steps, "--steps", "--control-steps"), seed)


@command()
def demos(
    task: Annotated[str, typer.Option(help="PushCube, PickCube or StackCube.")] = "PushCube",
    n: Annotated[int, typer.Option("-n", help="Number of successful demonstrations to keep.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Dataset directory (default: data/<task>).")] = None,
    control_mode: Annotated[str, typer.Option(help="Controller of the recorded actions.")] = "pd_ee_delta_pos",
    image_size: Annotated[int, typer.Option(help="Square camera frames, pixels.")] = 64,
    workers: Annotated[int, typer.Option(help="Simulator processes (one core each).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first episode.")] = 0,
) -> None:
    """Generate motion-planning demonstrations in ManiSkill3 and convert them to the training format.

    Resumable: episodes already in OUT are kept and skipped.
    """
    from par_deploy.train.demos import generate_demos

    summary = generate_demos(
        task,
        n,
        out or Path("data") / task,
        control_mode=control_mode,
        image_size=image_size,
        workers=workers,
        seed=seed,
    )
    typer.echo(str(summary))


@command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Demonstration directory written by `par-deploy demos`.")],
    out: Annotated[Path, typer.Option(help="Run directory (state, metrics, checkpoints). Resumes if present.")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny, cpu-small or paper.")] = "cpu-small",
    optimizer_steps: Annotated[int, typer.Option(help="Optimizer steps (AdamW updates).")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Episodes per step (global over DDP processes).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 200,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    threads: Annotated[int, typer.Option(help="Torch threads per process: the free cores.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and noise.")] = 0,
    limit_episodes: Annotated[int | None, typer.Option(help="Use only the first N episodes.")] = None,
    stop_at: Annotated[int | None, typer.Option(help="Stop (resumably) after this step.")] = None,
    window: Annotated[
        int,
        typer.Option(
            help="Train on windows of N blocks cut anywhere in the episode and deploy "
            "with a sliding cache of N blocks (0: whole episodes)."
        ),
    ] = 0,
    precision: Annotated[
        str, typer.Option(help="Forward-pass autocast: auto (bf16 where the CPU has native bf16), bf16 or fp32.")
    ] = "auto",
    shift_augment: Annotated[
        int, typer.Option(help="Shift each sampled window's frames by a random offset of up to N pixels (0: off).")
    ] = 0,
    model: Annotated[list[str], typer.Option(help="Model config override KEY=VALUE (JSON value), repeatable.")] = [],  # noqa: B006
    old_steps: Annotated[int | None, _deprecated_option("--steps")] = None,
) -> None:
    """Train PAR with teacher forcing over whole episodes (or windows: --window). Under `torchrun`: DDP."""
    from par_deploy.train.trainer import TrainConfig
    from par_deploy.train.trainer import train as run_train

    overrides = _model_overrides(model)
    tc = TrainConfig(
        steps=_renamed(ctx, "optimizer_steps", old_steps, "--steps", "--optimizer-steps"),
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        save_every=save_every,
        threads=threads,
        seed=seed,
        limit_episodes=limit_episodes,
        precision=precision,
        window=window,
        shift_augment=shift_augment,
        model_overrides=overrides,
    )
    final = run_train(data, out, preset, tc, stop_at=stop_at)
    typer.echo(f"checkpoint: {final}" if final else f"stopped at step {stop_at}; run again to resume")


def _model_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` config overrides (JSON values; a bare word is a string)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--model expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@app.command("init")
def init_checkpoint(
    from_nova: Annotated[Path, typer.Option(help="NOVA pipeline or transformer directory (or its .safetensors).")],
    out: Annotated[Path, typer.Option(help="PAR checkpoint directory to write.")],
    preset: Annotated[
        str, typer.Option(help="PAR preset giving NOVA's architecture choices and PAR's additions.")
    ] = "paper",
    model: Annotated[
        list[str],
        typer.Option(
            help="Model config override KEY=VALUE (JSON value), repeatable; "
            "e.g. heads=N for a NOVA width outside NOVA's registry."
        ),
    ] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of PAR's newly initialised modules.")] = 0,
) -> None:
    """Write a PAR checkpoint initialised from a NOVA checkpoint; print what was loaded, what is new in PAR
    and which NOVA tensors were ignored, and why. Sizes come from NOVA's config.json."""
    from par_deploy.nova import format_report, init_from_nova

    report = init_from_nova(from_nova, out, preset, seed, **_model_overrides(model))
    typer.echo(format_report(report))
    typer.echo(f"checkpoint: {out}")


@command()
def render(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    data: Annotated[Path, typer.Option(help="Demonstration directory.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("predicted_frames.png"),
    episode: Annotated[int, typer.Option(help="Episode index in the dataset.")] = 0,
    frame_ddim_steps: Annotated[int, typer.Option(help="DDIM steps of the frame de-tokenizer.")] = 10,
    old_steps: Annotated[int | None, _deprecated_option("--steps")] = None,
) -> None:
    """Predicted frames beside the real ones for one episode (real row over predicted row, paper Fig. 4)."""
    from par_deploy.render import render_predictions

    steps = _renamed(ctx, "frame_ddim_steps", old_steps, "--steps", "--frame-ddim-steps")
    typer.echo(str(render_predictions(checkpoint, data, episode, out, steps)))


@command()
def slim(
    checkpoint: Annotated[Path, typer.Argument(help="Full checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Deployment checkpoint directory to write.")],
    dtype: Annotated[str, typer.Option(help="Weight storage: float16 or bfloat16.")] = "float16",
    keep_frame_head: Annotated[bool, typer.Option(help="Keep the frame de-tokenizer (frame prediction).")] = False,
) -> None:
    """A smaller checkpoint for shipping: half-precision weights, no frame de-tokenizer (actions only)."""
    import torch

    from par_deploy.checkpoint import make_deployment_checkpoint

    if dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}: choose float16 or bfloat16")
    path = make_deployment_checkpoint(checkpoint, out, getattr(torch, dtype), keep_frame_head)
    size = sum(f.stat().st_size for f in path.iterdir())
    typer.echo(f"{path}: {size / 1e6:.1f} MB")


@command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    backend: Annotated[list[str], typer.Option(help="onnx, torchscript, tensorrt (repeatable).")] = ["onnx"],  # noqa: B006
    denoise_steps: Annotated[int, typer.Option(help="K: Action-DiT denoiser calls per chunk.")] = 4,
    sampler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
    precision: Annotated[
        str,
        typer.Option(
            help="fp32; int8 (ONNX Runtime: int8 transformer-step weights, VNNI); fp16 (TensorRT only); bf16 "
            "(refused with the reason while ONNX Runtime's CPU provider lacks bf16 kernels)."
        ),
    ] = "fp32",
    sampler_graph: Annotated[str, typer.Option(help="auto, unrolled (K steps in one graph) or loop.")] = "auto",
    onnx_exporter: Annotated[str, typer.Option(help="dynamo or legacy torch.onnx exporter.")] = "dynamo",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle in OUT.")] = False,
    report_json: Annotated[Path | None, typer.Option(help="Also write the export report as JSON.")] = None,
    batch: Annotated[
        int,
        typer.Option(
            help="Independent episodes per engine call (each row its own cache row and position; ONNX only; "
            "run with par_deploy.runtime.load_batch)."
        ),
    ] = 1,
) -> None:
    """Compile a checkpoint into an engine bundle (static KV-cache step + few-step Action-DiT sampler).

    Ends with a parity report: each backend against the PyTorch reference with the same noise.
    """
    from par_deploy.export import export_bundle

    report = export_bundle(
        checkpoint,
        out,
        backends=tuple(backend),
        denoise_steps=denoise_steps,
        sampler=sampler,
        precision=precision,
        sampler_graph=sampler_graph,
        onnx_exporter=onnx_exporter,
        overwrite=overwrite,
        batch=batch,
    )
    if report_json:  # export_bundle printed the summary (progress)
        report_json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


@command()
def bench(
    engine: Annotated[
        Path | None,
        typer.Option(
            help="Bundle directory (default: the task's shipped checkpoint, exported once into bundles/<task>)."
        ),
    ] = None,
    task: Annotated[str, typer.Option(help="Without --engine: the task whose checkpoint is measured.")] = "PushCube",
    reference: Annotated[
        Path | None, typer.Option(help="Checkpoint of the PyTorch reference (default: the bundle's source checkpoint).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every figure as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the scaling curves as PNG.")] = None,
    backend: Annotated[
        list[str],
        typer.Option(
            help="Engines timed (repeatable; the bundle must hold them): the first is 'engine', others beside it."
        ),
    ] = ["onnx"],  # noqa: B006
    sampler_graph: Annotated[
        list[str], typer.Option(help="Also time this sampler graph form (unrolled, loop) at every K (repeatable).")
    ] = [],  # noqa: B006
    batch: Annotated[
        list[int],
        typer.Option(
            help="Also time batched engines (export --batch): robots/s at batch 1, 2, 4, .. up to N (repeatable)."
        ),
    ] = [],  # noqa: B006
) -> None:
    """Latency and memory of an engine against the PyTorch reference, measured in one run."""
    from par_deploy.bench import BenchOptions, run_bench

    options = BenchOptions(backends=tuple(backend), sampler_graphs=tuple(sampler_graph), batch=tuple(batch))
    run_bench(engine, reference, json_out, plot, options, task=task)


@command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: chosen by the OS, printed once listening).")] = 0,
    backend: Annotated[str, typer.Option(help="Engine backend: onnx, torchscript, tensorrt.")] = "onnx",
    threads: Annotated[int, typer.Option(help="Compute threads per client's policy.")] = 1,
    pool: Annotated[int, typer.Option(help="Policies loaded ahead for new connections.")] = 1,
    max_clients: Annotated[int, typer.Option(help="Connections served at once (more are refused).")] = 4,
) -> None:
    """Serve a bundle over websockets (msgpack): each connection is one episode with its own KV-cache.

    Clients: `par_deploy.client.RemotePolicy(url)`. Health: HTTP GET /healthz on the same port.
    Stops cleanly on SIGTERM or Ctrl-C. No authentication or TLS: serve on loopback or a trusted network only.
    """
    import logging

    from par_deploy.serve.server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        run_server(
            bundle, host=host, port=port, backend=backend, threads=threads, pool_size=pool, max_clients=max_clients
        )
    except OSError as e:  # a port in use or not ours: a user error like a bad bundle (ParError, the wrapper's)
        raise ConfigError(f"cannot listen on {host}:{port} ({e}); choose another --host/--port") from None


_STATES_HELP = (
    "Initial states i = 0 .. N-1 (the environment reset with seed SEED_BASE + i); each runs with every policy "
    "seed, so episodes = states x seeds. Default 25 (x 5 seeds: the paper's 125). 125 distinct states: "
    "--states 125 --seeds 0."
)
_SERVER_HELP = (
    "Evaluate the policy served at this URL (`par-deploy serve`, e.g. ws://127.0.0.1:8000; start it with "
    "--max-clients >= --workers)."
)


@command(name="eval")
def evaluate(
    ctx: typer.Context,
    task: Annotated[str, typer.Option(help="PushCube, PickCube or StackCube.")] = "PushCube",
    engine: Annotated[
        Path | None,
        typer.Option(help="Bundle directory (engine); exported with --batch N: N episodes per worker call."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint (PyTorch reference); with --compare: the engine's reference. Without --engine and "
            "--checkpoint: the task's shipped checkpoint through its engine (exported into bundles/<task>)."
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="Engine backend: onnx, torchscript, tensorrt.")] = "onnx",
    sampler: Annotated[str | None, typer.Option(help="Checkpoint only: ddim or ddpm (default: its own).")] = None,
    denoise_steps: Annotated[
        int | None, typer.Option(help="Checkpoint only: denoising steps K of the Action-DiT sampler.")
    ] = None,
    states: Annotated[int | None, typer.Option(help=_STATES_HELP)] = None,
    seeds: Annotated[
        str, typer.Option(help="Policy (noise) seeds as a list, e.g. 0-4, 0,1,2 or 0 (one seed).")
    ] = "0-4",
    seed_base: Annotated[int, typer.Option(help="Initial state i is reset with seed SEED_BASE + i.")] = 500_000,
    episodes: Annotated[
        int | None, typer.Option(help="Run only the first N episodes of states x seeds (state-major order).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Simulator processes, one core each (0: in this process).")] = 1,
    threads: Annotated[int, typer.Option(help="Compute threads per worker.")] = 1,
    video: Annotated[Path | None, typer.Option(help="Write every episode as MP4 into this directory.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Results JSON, written after every episode; running again resumes it.")
    ] = None,
    compare: Annotated[
        bool, typer.Option(help="Also run the reference (the bundle's source checkpoint or --checkpoint) and compare.")
    ] = False,
    max_env_steps: Annotated[
        int | None, typer.Option(help="Episode limit in simulator steps (default: the task's).")
    ] = None,
    control_mode: Annotated[str | None, typer.Option(help="Default: the checkpoint's training control mode.")] = None,
    stop_on_success: Annotated[
        bool, typer.Option(help="End an episode at its first success (faster; no success_at_end).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per episode before a worker is restarted.")] = 600.0,
    server: Annotated[str | None, typer.Option(help=_SERVER_HELP)] = None,
    old_steps: Annotated[int | None, _deprecated_option("--steps")] = None,
    old_max_steps: Annotated[int | None, _deprecated_option("--max-steps")] = None,
) -> None:
    """ManiSkill success rate of an engine or of the PyTorch reference (the paper's 25 states x 5 seeds)."""
    from par_deploy.eval import run_eval

    run_eval(
        task,
        engine,
        checkpoint,
        backend=backend,
        sampler=sampler,
        steps=_renamed(ctx, "denoise_steps", old_steps, "--steps", "--denoise-steps"),
        episodes=episodes,
        states=states,
        seeds=seeds,
        seed_base=seed_base,
        workers=workers,
        threads=threads,
        json_path=json_out,
        video_dir=video,
        compare=compare,
        max_steps=_renamed(ctx, "max_env_steps", old_max_steps, "--max-steps", "--max-env-steps"),
        control_mode=control_mode,
        stop_on_success=stop_on_success,
        timeout=timeout,
        server=server,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
