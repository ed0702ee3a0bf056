"""ONNX export of the graph modules, with the checks that catch the silent export failures (docs/design-notes.md
§3)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from par_deploy.export.errors import ExportError
from par_deploy.runtime.bundle import GraphSpec

EXPORTERS = ("dynamo", "legacy")
DEFAULT_EXPORTER = "dynamo"
# >= 17 (LayerNormalization); 20: GELU exports as one Gelu node (ONNX Runtime fuses it into FastGelu) instead of
# ~8 elementwise nodes: 971 -> 887 sampler nodes, 404 -> 362 step nodes on the shipped model (issue #10);
# <= 20, the newest opset TensorRT 10.0's ONNX parser accepts
DEFAULT_OPSET = 20
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (protobuf's 2 GB limit)


def export_onnx(
    module: nn.Module,
    spec: GraphSpec,
    args: tuple[torch.Tensor, ...],
    path: Path,
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
) -> list[Path]:
    """Export ``module`` (a pure function of ``args``) to ``path``; return the files written.

    ``exporter``: ``"dynamo"`` (``torch.export``-based, the maintained path) or ``"legacy"``
    (TorchScript-based, deprecated since torch 2.9, exports 7-25x faster here). The result is checked with
    ``onnx.checker`` and its inputs/outputs must be exactly the signature's (an exporter that drops an output
    or an unused input fails).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = nbytes > EXTERNAL_DATA_BYTES
    kw = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    # the dynamo exporter and onnxscript's optimizer log each phase, missing torchvision ops, skipped folds
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=True,
                    external_data=external,
                    verbose=False,
                    optimize=True,
                    **kw,
                )
            else:
                torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True, **kw)
    except Exception as e:  # exporters raise many exception types; name the graph and the exporter
        raise ExportError(f"{exporter} ONNX export of graph {spec.name!r} failed: {type(e).__name__}: {e}") from e
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    files = [path] + sorted(p for p in path.parent.glob(path.name + "*") if p != path)
    check_onnx_signature(path, spec, min_opset=17)
    return files


_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
}


def load_onnx(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def onnx_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of the main graph, its subgraphs and local functions (``domain::op`` outside ai.onnx)."""
    ops: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for n in graph.node:
            ops.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                for g in a.graphs:
                    visit(g)

    visit(model.graph)
    for f in model.functions:
        for n in f.node:
            ops.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
    return ops


def value_info(v: onnx.ValueInfoProto) -> tuple[str, str, tuple[int | str, ...]]:
    t = v.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return v.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims


def check_onnx_signature(path: Path, spec: GraphSpec, min_opset: int = 17) -> onnx.ModelProto:
    """The file's inputs/outputs are the signature's (names, order, dtypes, static shapes); opset >= min."""
    model = load_onnx(path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: invalid ONNX model ({e})") from None
    opset = onnx_opset(model)
    if opset < min_opset:
        raise ExportError(f"{path}: opset {opset} < {min_opset}")
    initializers = {i.name for i in model.graph.initializer}
    for kind, got, want in (
        ("inputs", [i for i in model.graph.input if i.name not in initializers], spec.inputs),
        ("outputs", list(model.graph.output), spec.outputs),
    ):
        got_sig = [value_info(v) for v in got]
        want_sig = [(t.name, t.dtype, t.shape) for t in want]
        if got_sig != want_sig:
            raise ExportError(
                f"{path}: graph {kind} {got_sig} differ from the expected signature {want_sig} (an exporter "
                "dropped an output such as the new cache keys/values, pruned an input, or left a dimension "
                "dynamic)"
            )
    return model
