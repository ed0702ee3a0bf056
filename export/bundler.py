"""``export_bundle``: checkpoint -> deployment bundle (graphs per backend, text prefix, manifest, parity)."""

from __future__ import annotations

import json
import shutil
import time
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
from par_deploy.model.par import PARModel
from par_deploy.runtime import load, load_batch
from par_deploy.runtime.bundle import (
    BACKENDS,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    PRECISIONS,
    SAMPLER_GRAPHS,
    TEXT_PREFIX_FILE,
    UNROLL_MAX_STEPS,
    cache_layout,
    check_batch,
    file_entry,
    graph_specs,
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
            diffs = [p.get(k, float("nan")) for k in ("hidden_max_abs", "cond_max_abs", "actions_max_abs")]
            lines.append(
                f"  {b:12s} export {self.seconds.get(b, 0.0):6.1f} s  {self.backend_bytes(b) / 1e6:7.2f} MB  "
                f"parity: hidden {diffs[0]:.1e}, cond {diffs[1]:.1e}, actions {diffs[2]:.1e} "
                f"({'ok' if p.get('passed') else 'FAILED'})"
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
    ``"legacy"``. ``batch``: B independent episodes per engine call (every graph's leading dimension; each row
    its own cache row and position; ONNX only; run by ``runtime.load_batch``). After export every backend is
    loaded from the bundle and run against ``TorchPolicy`` on ``parity_steps``-step synthetic episodes with the
    same noise; the parity numbers go into the manifest and the report, and ``ExportError`` is raised if they
    exceed the tolerances (``require_parity=False``: recorded only, for bundles that are timed rather than
    deployed, e.g. the benchmark's K sweep).
    """
    _check_args(backends, denoise_steps, sampler, precision, sampler_graph, onnx_exporter, batch)
    t_start = time.perf_counter()
    root = Path(out_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, normalizer = from_pretrained(checkpoint_dir)
    check_exportable(model)
    cfg = model.cfg
    if denoise_steps > cfg.train_timesteps:
        raise ConfigError(
            f"denoise_steps={denoise_steps} exceeds the checkpoint's train_timesteps={cfg.train_timesteps}"
        )
    ckpt_hash = checkpoint_hash(checkpoint_dir)
    seconds["load"] = time.perf_counter() - t0
    _prepare_dir(root, overwrite)
    if sampler_graph == "auto":
        sampler_graph = "unrolled" if denoise_steps <= UNROLL_MAX_STEPS else "loop"
    schedule = model.sampler(sampler, denoise_steps)
    specs = graph_specs(cfg, denoise_steps, sampler_graph, batch)
    modules = build_graphs(model, schedule, sampler_graph)
    _log(
        progress,
        f"exporting {checkpoint_dir} -> {root}: {', '.join(backends)}, {sampler} K={denoise_steps} "
        f"({sampler_graph}), {precision}" + (f", batch {batch}" if batch > 1 else ""),
    )

    t0 = time.perf_counter()
    k, v = text_prefix(model)
    np.savez(root / TEXT_PREFIX_FILE, k=k, v=v)
    seconds["text_prefix"] = time.perf_counter() - t0

    position = min(1, cfg.max_blocks - 1)
    engines: dict[str, dict[str, Any]] = {}
    onnx_backends = [b for b in ("onnx", "tensorrt") if b in backends]
    if onnx_backends:
        t0 = time.perf_counter()
        engines["onnx"] = {}
        for name, spec in specs.items():
            files = export_onnx(
                modules[name],
                spec,
                example_inputs(spec, 0, position),
                root / "onnx" / f"{name}.onnx",
                onnx_exporter,
                opset,
            )
            engines["onnx"][name] = _onnx_entry(root, name, files, precision)
            _log(
                progress,
                f"  onnx {name} ({engines['onnx'][name]['precision']}): {engines['onnx'][name]['bytes'] / 1e6:.2f} MB",
            )
        seconds["onnx"] = time.perf_counter() - t0
    if "torchscript" in backends:
        t0 = time.perf_counter()
        engines["torchscript"] = {}
        other = min(cfg.max_blocks - 1, position + 2)
        for name, spec in specs.items():
            files = export_torchscript(
                modules[name],
                spec,
                example_inputs(spec, 0, position),
                example_inputs(spec, 1, other, denoise_steps - 1),
                root / "torchscript" / f"{name}.pt",
            )
            engines["torchscript"][name] = {
                **file_entry(root, files[0]),
                "precision": "fp32",
                "external_data": [],
            }
            _log(progress, f"  torchscript {name}: {engines['torchscript'][name]['bytes'] / 1e6:.2f} MB")
        seconds["torchscript"] = time.perf_counter() - t0

    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "par_deploy_version": par_deploy.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint_hash": ckpt_hash,
        "source_checkpoint": portable_path(checkpoint_dir),  # relative to the working directory
        "config": cfg.to_dict(),
        "precision": precision,
        "batch": batch,
        "quantization": INT8_METHOD if precision == "int8" else None,
        "backends": sorted(b for b in backends if b != "tensorrt"),
        "sampler": {
            "kind": sampler,
            "steps": denoise_steps,
            "graph": sampler_graph,
            "clip": 1.0,
            "timesteps": schedule.timesteps.tolist(),
            "coeffs": schedule.coeffs.tolist(),
            "coeffs_layout": ["sqrt_recip_a_t", "sqrt_recip_a_t_minus_1", "coef_x0", "coef_xt", "sigma"],
        },
        "cache": {**cache_layout(cfg), "overflow": cfg.overflow},
        "graphs": {name: spec.to_dict() for name, spec in specs.items()},
        "engines": engines,
        "onnx": {"exporter": onnx_exporter, "opset": opset, "torch": torch.__version__} if onnx_backends else None,
        "text_prefix": {
            **file_entry(root, root / TEXT_PREFIX_FILE),
            "instructions": list(cfg.instructions),
            "shape": list(k.shape),
        },
        "normalization": normalizer.to_dict(),
        "parity": {},
        "export_seconds": seconds,
    }
    write_manifest(root, manifest)
    if "tensorrt" in backends:
        from par_deploy.export.tensorrt import build_engines

        t0 = time.perf_counter()
        build_engines(root, precision, progress=progress)
        seconds["tensorrt"] = time.perf_counter() - t0
        manifest = json.loads((root / MANIFEST_FILE).read_text())

    t0 = time.perf_counter()
    parity = {}
    for backend in backends:
        if batch > 1:
            policy = load_batch(root, threads=1)
        else:  # one ORT thread; None for TorchScript: torch.set_num_threads would change this process's setting
            policy = load(root, backend, threads=1 if backend == "onnx" else None)
        parity[backend] = parity_report(model, normalizer, policy, parity_steps, precision=precision)
        _close(policy)
    seconds["parity"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    manifest["parity"] = parity
    manifest["export_seconds"] = seconds
    write_manifest(root, manifest)

    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    report = ExportReport(
        root,
        tuple(backends),
        precision,
        sampler,
        denoise_steps,
        sampler_graph,
        onnx_exporter,
        seconds,
        sizes,
        parity,
    )
    _log(progress, report.summary())
    failed = {b: p for b, p in parity.items() if not p["passed"]}
    if failed and require_parity:
        raise ExportError(
            f"{root}: parity check failed for {sorted(failed)}: {failed}. The bundle is kept for inspection; "
            "do not deploy it"
        )
    return report


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
