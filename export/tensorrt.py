"""TensorRT engines from a bundle's ONNX graphs (the ONNX is the engine's source of truth: docs/design-notes.md §2, §3).

``check_onnx_for_tensorrt`` verifies, without TensorRT, what the ONNX parser will consume: opset range,
every op in the parser's support list, all-static input shapes, uint8 inputs only cast (TensorRT accepts
uint8 as network I/O only). ``build_engines`` builds one engine per graph with the real ``tensorrt`` API
(explicit batch, one optimisation profile with min = opt = max = the manifest's static shapes) at the
manifest's precision (fp32; fp16; int8 from an explicitly quantized Q/DQ ONNX made by NVIDIA ModelOpt from the
bundle's fp32 graph: the ONNX Runtime int8 graphs of an int8 bundle use MatMulInteger, which TensorRT does not
parse) and serialises it to ``tensorrt/<graph>.plan``, recording it in the manifest. Engines are specific to a GPU
and a TensorRT version, so build them on the deployment machine:
``python -m par_deploy.export.tensorrt BUNDLE [--precision fp16|int8]``. None of this can run on a machine
without CUDA and TensorRT (docs/design-notes.md §2): only the ONNX it consumes is tested there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from par_deploy.errors import ParError
from par_deploy.export.errors import ExportError
from par_deploy.export.onnx_export import load_onnx, onnx_ops, onnx_opset, value_info
from par_deploy.runtime.bundle import (
    BackendUnavailable,
    GraphSpec,
    file_entry,
    open_bundle,
    tensorrt_profiles,
    verify_engine_files,
    write_manifest,
)
from par_deploy.runtime.tensorrt_policy import import_tensorrt

TRT_PRECISIONS = ("fp32", "fp16", "int8")
TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 20  # TensorRT 10.0's ONNX parser (onnx-tensorrt docs/operators.md)

# Operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md, "Supported: Y").
TRT_SUPPORTED_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split()
)


def check_onnx_for_tensorrt(path: Path, spec: GraphSpec) -> dict[str, Any]:
    """What TensorRT's ONNX parser needs; returns ``{"opset", "ops", "inputs"}`` or raises ``ExportError``."""
    model = load_onnx(path)
    problems = []
    opset = onnx_opset(model)
    if not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        problems.append(f"opset {opset} outside TensorRT's {TRT_MIN_OPSET}..{TRT_MAX_OPSET}")
    ops = onnx_ops(model)
    unsupported = sorted(ops - TRT_SUPPORTED_OPS)
    if unsupported:
        problems.append(f"ops the TensorRT ONNX parser does not support: {unsupported}")
    initializers = {i.name for i in model.graph.initializer}
    inputs = {}
    for v in model.graph.input:
        if v.name in initializers:
            continue
        name, dtype, shape = value_info(v)
        inputs[name] = {"dtype": dtype, "shape": list(shape)}
        if not all(isinstance(d, int) and d > 0 for d in shape):
            problems.append(f"input {name!r} has a non-static shape {list(shape)}")
        if dtype == "uint8":
            consumers = {n.op_type for n in model.graph.node if name in n.input}
            if consumers != {"Cast"}:
                problems.append(f"uint8 input {name!r} feeds {sorted(consumers)}; TensorRT needs it cast first")
    want = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs}
    if inputs != want:
        problems.append(f"inputs {inputs} differ from the manifest's {want}")
    if problems:
        raise ExportError(f"{path}: not buildable by TensorRT: " + "; ".join(problems))
    return {"opset": opset, "ops": sorted(ops), "inputs": inputs}


def _fp16_onnx(trt, onnx_path: Path, work_dir: Path) -> Path:
    """TensorRT 11 removed ``BuilderFlag.FP16``: fp16 engines come from an fp16 ONNX (ModelOpt AutoCast)."""
    try:
        import modelopt.onnx.autocast as autocast
    except ImportError as e:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} builds fp16 engines from an fp16 ONNX only; install NVIDIA ModelOpt "
            f"(pip install 'nvidia-modelopt[onnx]') or build with precision='fp32' ({e})"
        ) from None
    import onnx

    converted = autocast.convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    out = work_dir / (onnx_path.stem + ".fp16.onnx")
    onnx.save(converted, str(out))
    return out


def _int8_onnx(onnx_path: Path, work_dir: Path, calibration: Path | None) -> Path:
    """A Q/DQ (explicitly quantized) int8 ONNX for TensorRT, by NVIDIA ModelOpt's ONNX post-training quantization.

    ``calibration``: an ``.npz`` keyed by the graph's input names (real observations give real activation
    ranges); without it ModelOpt calibrates on random inputs, so check the engine's parity before deploying.
    """
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise BackendUnavailable(
            f"int8 TensorRT engines are built from a Q/DQ ONNX; install NVIDIA ModelOpt (pip install "
            f"'nvidia-modelopt[onnx]') or build with precision='fp32'/'fp16' ({e})"
        ) from None
    out = work_dir / (onnx_path.stem + ".int8.qdq.onnx")
    quantize(
        onnx_path=str(onnx_path),
        quantize_mode="int8",
        output_path=str(out),
        calibration_data=None if calibration is None else str(calibration),
    )
    return out


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: dict[str, tuple[tuple[int, ...], ...]],
    precision: str = "fp32",
    workspace_bytes: int = 1 << 30,
    calibration: Path | None = None,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine and write it to ``plan_path``.

    ``profile``: ``{input: (min, opt, max)}`` for the single optimisation profile. fp16 uses
    ``BuilderFlag.FP16`` on TensorRT 10 and an fp16 ONNX (ModelOpt AutoCast) on TensorRT 11+; int8 parses a
    ModelOpt Q/DQ ONNX (``calibration``: its ``.npz`` of inputs) and sets ``BuilderFlag.INT8`` where it exists.
    """
    trt, _ = import_tensorrt()  # TensorRT >= 10
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is the only network mode of TensorRT >= 10 (its EXPLICIT_BATCH flag is deprecated)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="par-trt-") as tmp:
        source = onnx_path
        if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
            source = _fp16_onnx(trt, onnx_path, Path(tmp))
        elif precision == "int8":
            source = _int8_onnx(onnx_path, Path(tmp), calibration)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    source = onnx_path
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profile:
            raise ExportError(f"{source}: network input {tensor.name!r} has no shape in the manifest's profile")
        lo, opt, hi = profile[tensor.name]
        if tuple(tensor.shape) != tuple(opt):
            raise ExportError(f"{source}: input {tensor.name!r} is {tuple(tensor.shape)}, manifest says {tuple(opt)}")
        opt_profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{source}: TensorRT failed to build an engine (see the TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def build_engines(
    bundle_dir: str | Path,
    precision: str | None = None,
    workspace_bytes: int = 1 << 30,
    progress: bool = False,
    calibration: str | Path | None = None,
) -> dict[str, float]:
    """Build ``tensorrt/<graph>.plan`` for every graph of a bundle from its ONNX and add them to the manifest.

    ``precision``: ``"fp32"``, ``"fp16"`` or ``"int8"`` (default: the manifest's ``precision`` field, the one
    ``par-deploy export --precision`` records). Every engine is built from the fp32 ONNX the exporter wrote
    (``onnx_source``). Returns build seconds per graph.
    """
    root = Path(bundle_dir)
    bundle = open_bundle(root)
    m = bundle.manifest
    verify_engine_files(root, m, "onnx")  # the engines' source
    precision = precision or m["precision"]
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    import_tensorrt()  # fail before any work when TensorRT or the GPU is missing
    profiles = tensorrt_profiles(m)
    entries, seconds = {}, {}
    for name, spec in bundle.graphs.items():
        onnx_path = onnx_source(root, m, name)
        check_onnx_for_tensorrt(onnx_path, spec)
        t0 = time.perf_counter()
        plan = build_engine(
            onnx_path,
            root / "tensorrt" / f"{name}.plan",
            profiles[name],
            precision,
            workspace_bytes,
            None if calibration is None else Path(calibration) / f"{name}.npz",
        )
        seconds[name] = time.perf_counter() - t0
        entries[name] = {**file_entry(root, plan), "precision": precision, "external_data": []}
        if progress:
            print(f"  tensorrt {name}: {seconds[name]:.1f} s, {entries[name]['bytes'] / 1e6:.1f} MB")
    m["engines"]["tensorrt"] = entries
    m["backends"] = sorted(set(m["backends"]) | {"tensorrt"})
    m["tensorrt"] = {
        "precision": precision,
        "profiles": {g: {k: [list(s) for s in v] for k, v in p.items()} for g, p in profiles.items()},
    }
    write_manifest(root, m)
    return seconds


def onnx_source(root: Path, manifest: dict[str, Any], graph: str) -> Path:
    """The fp32 ONNX of ``graph``: the onnx engine itself, or the ``source`` an int8 bundle keeps beside its
    quantized graph (checked against its recorded sha256)."""
    entry = manifest["engines"]["onnx"][graph]
    src = entry.get("source")
    if src is None:
        return root / entry["file"]
    if file_entry(root, root / src["file"]) != {k: src[k] for k in ("file", "sha256", "bytes")}:
        raise ExportError(
            f"{root / src['file']}: fp32 source of the {graph!r} graph does not match its sha256 "
            "in the manifest; re-export the bundle"
        )
    return root / src["file"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m par_deploy.export.tensorrt", description=build_engines.__doc__)
    p.add_argument("bundle")
    p.add_argument("--precision", choices=TRT_PRECISIONS, default=None)
    p.add_argument("--calibration", default=None, help="int8: directory of <graph>.npz input batches")
    p.add_argument("--workspace-gb", type=float, default=1.0)
    a = p.parse_args(argv)
    try:
        build_engines(a.bundle, a.precision, int(a.workspace_gb * (1 << 30)), progress=True, calibration=a.calibration)
    except ParError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
