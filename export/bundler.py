"""``export_bundle``: checkpoint -> deployment bundle (graphs per backend, text prefix, manifest, parity)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import par_deploy
from par_deploy.checkpoint import checkpoint_hash, from_pretrained
from par_deploy.errors import ConfigError
from par_deploy.export.errors import ExportError
from par_deploy.export.graphs import build_graphs, check_exportable, example_inputs
from par_deploy.export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS, export_onnx
from par_deploy.export.parity import parity_report
from par_deploy.export.precision import INT8_GRAPHS, INT8_METHOD, check_precision, quantize_int8
from par_deploy.export.torchscript_export import export_torchscript
from par_deploy.locate import portable_path
from par_deploy.model.diffusion import SamplerSchedule
from par_deploy.model.par import PARModel
from par_deploy.runtime import load, load_batch, read_manifest
from par_deploy.runtime.bundle import (
    BACKENDS,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    PRECISIONS,
    SAMPLER_GRAPHS,
    TEXT_PREFIX_FILE,
    UNROLL_MAX_STEPS,
    GraphSpec,
    cache_layout,
    check_batch,
    file_entry,
    graph_specs,
    text_prefix_shape,
    write_manifest,
)
from par_deploy.runtime.bundle_policy import BundlePolicy


@dataclass
class ExportReport:
    """What ``export_bundle`` did: times (s), file sizes (bytes), parity per backend (as in the manifest)."""

    bundle_dir: Path
    backends: tuple[str, ...]
    precision: str
    sampler: str
    denoise_steps: int
    sampler_graph: str
    onnx_exporter: str
    seconds: dict[str, float] = field(default_factory=dict)  # "load", "text_prefix", each backend, "parity", "total"
    sizes: dict[str, int] = field(default_factory=dict)  # bundle-relative file -> bytes
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> parity_report(...)

    @property
    def bundle_bytes(self) -> int:
        return sum(self.sizes.values())

    def backend_bytes(self, backend: str) -> int:
        return sum(n for f, n in self.sizes.items() if f.startswith(backend + "/"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle_dir"] = portable_path(self.bundle_dir)
        d["bundle_bytes"] = self.bundle_bytes
        return d

    def summary(self) -> str:
        lines = [
            f"bundle {self.bundle_dir} ({self.bundle_bytes / 1e6:.2f} MB), precision {self.precision}, "
            f"{self.sampler} K={self.denoise_steps} ({self.sampler_graph} sampler graph)"
        ]
        for b in self.backends:
            p = self.parity.get(b, {})
            keys = ("hidden_max_abs", "cond_max_abs", "sampler_max_abs", "actions_max_abs")
            diffs = [p.get(k, float("nan")) for k in keys]
            lines.append(
                f"  {b:12s} export {self.seconds.get(b, 0.0):6.1f} s  {self.backend_bytes(b) / 1e6:7.2f} MB  "
                f"parity: hidden {diffs[0]:.1e}, cond {diffs[1]:.1e}, sampler {diffs[2]:.1e}, end-to-end actions "
                f"{diffs[3]:.1e} ({'ok' if p.get('passed') else 'FAILED'})"
            )
        return "\n".join(lines)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def text_prefix(model: PARModel) -> tuple[np.ndarray, np.ndarray]:
    """Keys/values of every instruction's text prefix: ``[instructions, layers, 1, H, K_t, hd]`` each."""
    Kt = model.cfg.num_text_tokens
    ks, vs = [], []
    with torch.no_grad():
        for instruction in model.cfg.instructions:
            cache = model.new_cache(1)
            model.prefill(model.text([instruction]), cache)
            ks.append(cache[0][:, :, :, :Kt].numpy().copy())
            vs.append(cache[1][:, :, :, :Kt].numpy().copy())
    return np.stack(ks), np.stack(vs)


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{out}: directory exists and is not empty; choose a new directory or pass overwrite=True (--overwrite)"
            )
        if not (out / MANIFEST_FILE).is_file():
            raise ExportError(f"{out}: not empty and not a bundle; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _check_args(backends, denoise_steps, sampler, precision, sampler_graph, onnx_exporter, batch=1) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"backends must be a non-empty subset of {BACKENDS}, got {tuple(backends)}")
    if check_batch(batch) > 1 and tuple(backends) != ("onnx",):
        raise ConfigError(
            f"batch {batch}: batched engines are exported for the onnx backend only (the TorchScript and "
            "TensorRT runtimes run one episode per call); export with --backend onnx"
        )
    if sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if not isinstance(denoise_steps, int) or denoise_steps < 1:
        raise ConfigError(f"denoise_steps must be a positive integer, got {denoise_steps!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if sampler_graph not in ("auto",) + SAMPLER_GRAPHS:
        raise ConfigError(f"sampler_graph must be 'auto', 'unrolled' or 'loop', got {sampler_graph!r}")
    if onnx_exporter not in EXPORTERS:
        raise ConfigError(f"onnx_exporter must be one of {EXPORTERS}, got {onnx_exporter!r}")
    check_precision(precision, tuple(backends))
    if "tensorrt" in backends:
        from par_deploy.runtime.tensorrt_policy import import_tensorrt

        import_tensorrt()  # BackendUnavailable with the reason, before any work


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    backends: tuple[str, ...] = ("onnx",),
    denoise_steps: int = 4,
    sampler: str = "ddim",
    precision: str = "fp32",
    progress: bool = True,
    sampler_graph: str = "auto",
    onnx_exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
    parity_steps: int = 4,
    overwrite: bool = False,
    require_parity: bool = True,
    batch: int = 1,
) -> ExportReport:
    """Export a checkpoint (``save_pretrained`` directory) to a deployment bundle in ``out_dir``.

    ``backends``: any of ``"onnx"``, ``"torchscript"``, ``"tensorrt"`` (TensorRT engines are built from
    the ONNX graphs, which are then always written; needs TensorRT + CUDA). ``denoise_steps``/``sampler``:
    the few-step Action-DiT sampler baked into the graphs. ``sampler_graph``: ``"unrolled"`` (K steps in one
    graph), ``"loop"`` (condition graph + one denoise-step graph called K times) or ``"auto"`` (unrolled for
    K <= 16). ``precision`` (recorded in the manifest; ``par_deploy.export.precision``): ``"fp32"``;
    ``"int8"`` (ONNX Runtime dynamic quantization of the transformer step's MatMul weights; the fp32 ONNX stays as
    the engine's ``source``, which TensorRT builds int8 engines from); ``"fp16"`` (TensorRT only); ``"bf16"``
    (refused with the reason while ONNX Runtime's CPU provider has no bf16 kernels). ``onnx_exporter``: ``"dynamo"`` or
    ``"legacy"``. ``batch``: episodes per engine call (each row its own cache row and position; ONNX only;
    ``runtime.load_batch``). After export every backend is loaded and run against ``TorchPolicy`` on
    ``parity_steps``-step synthetic episodes with the same noise; the parity numbers go into the manifest and the
    report, and ``ExportError`` is raised if they exceed the tolerances (``require_parity=False``: recorded
    only, for bundles that are timed rather than deployed, e.g. the benchmark's K sweep).
    """
    _check_args(backends, denoise_steps, sampler, precision, sampler_graph, onnx_exporter, batch)
    t_start = time.perf_counter()
    root = Path(out_dir)
    seconds: dict[str, float] = {}
    with _timed(seconds, "load"):
        model, normalizer, ckpt_hash = _load_checkpoint(checkpoint_dir, denoise_steps)
    _prepare_dir(root, overwrite)
    sampler_graph = _sampler_graph(sampler_graph, denoise_steps)
    schedule = model.sampler(sampler, denoise_steps)
    specs = graph_specs(model.cfg, denoise_steps, sampler_graph, batch)
    modules = build_graphs(model, schedule, sampler_graph)
    what = f"{sampler} K={denoise_steps} ({sampler_graph}), {precision}" + (f", batch {batch}" * (batch > 1))
    _log(progress, f"exporting {checkpoint_dir} -> {root}: {', '.join(backends)}, {what}")
    with _timed(seconds, "text_prefix"):
        k, v = text_prefix(model)
        np.savez(root / TEXT_PREFIX_FILE, k=k, v=v)
    job = _Job(root, specs, modules, model.cfg.max_blocks, sampler, schedule, precision, onnx_exporter, opset, progress)
    engines = _export_engines(job, backends, seconds)
    manifest = _manifest(job, model, normalizer, ckpt_hash, checkpoint_dir, backends, engines)
    manifest["export_seconds"] = seconds
    write_manifest(root, manifest)
    if "tensorrt" in backends:
        from par_deploy.export.tensorrt import build_engines

        with _timed(seconds, "tensorrt"):
            build_engines(root, precision, progress=progress)
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    with _timed(seconds, "parity"):
        parity = _parity(root, backends, model, normalizer, parity_steps, precision)
    seconds["total"] = time.perf_counter() - t_start
    manifest["parity"] = parity
    manifest["export_seconds"] = seconds
    write_manifest(root, manifest)

    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    report = ExportReport(
        root, tuple(backends), precision, sampler, denoise_steps, sampler_graph, onnx_exporter, seconds, sizes, parity
    )
    _log(progress, report.summary())
    failed = {b: p for b, p in parity.items() if not p["passed"]}
    if failed and require_parity:
        raise ExportError(
            f"{root}: parity check failed for {sorted(failed)}: {failed}. The bundle is kept for inspection; "
            "do not deploy it"
        )
    return report


def _sampler_graph(requested: str, denoise_steps: int) -> str:
    """``"auto"``: the K steps unrolled in one graph up to ``UNROLL_MAX_STEPS``, else the loop form."""
    if requested != "auto":
        return requested
    return "unrolled" if denoise_steps <= UNROLL_MAX_STEPS else "loop"


@contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time in ``seconds[key]``."""
    t0 = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - t0


def _load_checkpoint(checkpoint_dir: str | Path, denoise_steps: int):
    """(model, normalizer, checkpoint hash) of a checkpoint exportable with these options."""
    model, normalizer = from_pretrained(checkpoint_dir)
    check_exportable(model)
    if denoise_steps > model.cfg.train_timesteps:
        raise ConfigError(
            f"denoise_steps={denoise_steps} exceeds the checkpoint's train_timesteps={model.cfg.train_timesteps}"
        )
    return model, normalizer, checkpoint_hash(checkpoint_dir)


@dataclass(frozen=True)
class _Job:
    """What the engine exporters of one bundle share."""

    root: Path
    specs: dict[str, GraphSpec]
    modules: dict[str, torch.nn.Module]
    max_blocks: int
    sampler: str
    schedule: SamplerSchedule
    precision: str
    onnx_exporter: str
    opset: int
    progress: bool

    @property
    def denoise_steps(self) -> int:
        return self.schedule.steps

    @property
    def sampler_graph(self) -> str:
        return "unrolled" if "sampler" in self.specs else "loop"

    @property
    def batch(self) -> int:
        return self.specs["step"].tensor("rgb").shape[0]


def _export_engines(job: _Job, backends: tuple[str, ...], seconds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The ONNX graphs (also for TensorRT, built from them later) and the TorchScript modules: manifest entries."""
    position = min(1, job.max_blocks - 1)  # example block index (traced positions are tensors)
    engines: dict[str, dict[str, Any]] = {}
    if any(b in backends for b in ("onnx", "tensorrt")):
        with _timed(seconds, "onnx"):
            engines["onnx"] = {name: _export_onnx_graph(job, name, position) for name in job.specs}
    if "torchscript" in backends:
        with _timed(seconds, "torchscript"):
            other = min(job.max_blocks - 1, position + 2)
            engines["torchscript"] = {name: _export_torchscript_graph(job, name, position, other) for name in job.specs}
    return engines


def _export_onnx_graph(job: _Job, name: str, position: int) -> dict[str, Any]:
    spec = job.specs[name]
    files = export_onnx(
        job.modules[name],
        spec,
        example_inputs(spec, 0, position),
        job.root / "onnx" / f"{name}.onnx",
        job.onnx_exporter,
        job.opset,
    )
    entry = _onnx_entry(job.root, name, files, job.precision)
    _log(job.progress, f"  onnx {name} ({entry['precision']}): {entry['bytes'] / 1e6:.2f} MB")
    return entry


def _export_torchscript_graph(job: _Job, name: str, position: int, other: int) -> dict[str, Any]:
    spec = job.specs[name]
    files = export_torchscript(
        job.modules[name],
        spec,
        example_inputs(spec, 0, position),
        example_inputs(spec, 1, other, job.denoise_steps - 1),
        job.root / "torchscript" / f"{name}.pt",
    )
    entry = {**file_entry(job.root, files[0]), "precision": "fp32", "external_data": []}
    _log(job.progress, f"  torchscript {name}: {entry['bytes'] / 1e6:.2f} MB")
    return entry


def _manifest(job: _Job, model, normalizer, ckpt_hash, checkpoint_dir, backends, engines) -> dict:
    """The manifest before TensorRT and parity (``parity`` and ``export_seconds`` are filled in afterwards)."""
    cfg, root = model.cfg, job.root
    has_onnx = "onnx" in engines
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "par_deploy_version": par_deploy.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint_hash": ckpt_hash,
        "source_checkpoint": portable_path(checkpoint_dir),  # relative to the working directory
        "config": cfg.to_dict(),
        "precision": job.precision,
        "batch": job.batch,
        "quantization": INT8_METHOD if job.precision == "int8" else None,
        "backends": sorted(b for b in backends if b != "tensorrt"),
        "sampler": {
            "kind": job.sampler,
            "steps": job.denoise_steps,
            "graph": job.sampler_graph,
            "clip": 1.0,
            "timesteps": job.schedule.timesteps.tolist(),
            "coeffs": job.schedule.coeffs.tolist(),
            "coeffs_layout": ["sqrt_recip_a_t", "sqrt_recip_a_t_minus_1", "coef_x0", "coef_xt", "sigma"],
        },
        "cache": {**cache_layout(cfg), "overflow": cfg.overflow},
        "graphs": {name: spec.to_dict() for name, spec in job.specs.items()},
        "engines": engines,
        "onnx": {"exporter": job.onnx_exporter, "opset": job.opset, "torch": torch.__version__} if has_onnx else None,
        "text_prefix": {
            **file_entry(root, root / TEXT_PREFIX_FILE),
            "instructions": list(cfg.instructions),
            "shape": list(text_prefix_shape(cfg)),
        },
        "normalization": normalizer.to_dict(),
        "parity": {},
        "export_seconds": {},
    }


def _parity(root: Path, backends, model, normalizer, steps: int, precision: str) -> dict[str, dict[str, Any]]:
    """Every backend loaded from the bundle and compared with the PyTorch reference (``parity_report``)."""
    parity = {}
    batched = read_manifest(root)["batch"] > 1  # batched bundles: ONNX only, every row checked
    for backend in backends:
        # one ORT thread; None for TorchScript: torch.set_num_threads would change this process's setting
        threads = 1 if backend == "onnx" else None
        policy = load_batch(root, threads=1) if batched else load(root, backend, threads=threads)
        parity[backend] = parity_report(model, normalizer, policy, steps, precision=precision)
        _close(policy)
    return parity


def _onnx_entry(root: Path, name: str, files: list[Path], precision: str) -> dict[str, Any]:
    """The manifest entry of one ONNX graph: the exporter's fp32 file, or (int8 bundles, graphs in
    ``INT8_GRAPHS``) its quantized copy with the fp32 file kept as ``source`` (what TensorRT builds from)."""
    entry = {
        **file_entry(root, files[0]),
        "precision": "fp32",
        "external_data": [file_entry(root, f) for f in files[1:]],
    }
    if precision != "int8" or name not in INT8_GRAPHS:
        return entry
    quantized = quantize_int8(files[0], files[0].with_suffix(".int8.onnx"), external_data=len(files) > 1)
    return {
        **file_entry(root, quantized[0]),
        "precision": "int8",
        "external_data": [file_entry(root, f) for f in quantized[1:]],
        "source": entry,
    }


def _close(policy: BundlePolicy) -> None:
    close = getattr(policy, "close", None)
    if close is not None:
        close()


load_policy = load  # the runtime's loader, re-exported: ``par_deploy.export.load_policy(bundle, backend, ...)``
