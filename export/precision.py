"""Reduced precision as a bundle property: which backend runs which precision, and the int8 ONNX graphs.

- ``fp32``: every backend.
- ``int8``: ONNX Runtime dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) of the
  MatMul/Gemm weights of the graphs in ``INT8_GRAPHS``: int8 weights, activations quantized per call,
  ``MatMulInteger``/``DynamicQuantizeLinear`` kernels (AVX512-VNNI where the CPU has it). The fp32 graph the
  exporter wrote stays in the bundle as the engine's ``source`` (TensorRT builds from it: ``export.tensorrt``).
  TorchScript runs fp32 only.
- ``bf16``: offered only if this ONNX Runtime's CPU provider has a bf16 ``MatMul`` kernel
  (``ort_has_bf16_matmul``, probed on a one-node graph); otherwise a clear ``BackendUnavailable``.
- ``fp16``: TensorRT only.
"""

from __future__ import annotations

from pathlib import Path

from par_deploy.runtime.bundle import BackendUnavailable

# Graphs quantized in an int8 bundle. The transformer step's matmuls are [Bl=25 tokens x D] by [D x 4D]: int8
# ran them ~1.5x faster here (1.72x for the whole step graph in the issue-#10 session, interleaved, loaded
# machine). The sampler stays fp32: dynamically quantized it ran 1.33x faster, but its normalised actions moved
# by up to 0.66 from the fp32 graph's (per-tensor or per-channel weights alike: 0.66 / 0.65; the activations'
# per-call uint8 range is the error), 13x the int8 action tolerance (export/parity.py), measured on the shipped
# checkpoint's real conditions with the same noise.
INT8_GRAPHS = ("step",)
INT8_METHOD = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "op_types": ["MatMul", "Gemm"],
    "per_channel": False,
    "graphs": list(INT8_GRAPHS),
}


def check_precision(precision: str, backends: tuple[str, ...]) -> None:
    """``BackendUnavailable`` with the reason if ``backends`` cannot run ``precision`` here."""
    if precision == "fp16":
        cpu_only = [b for b in backends if b in ("onnx", "torchscript")]
        if cpu_only:
            raise BackendUnavailable(
                f"precision 'fp16' is not available for {cpu_only}: the ONNX Runtime CPU and TorchScript CPU "
                "backends run fp32 (and ONNX Runtime int8) only. Export with precision='fp32' or 'int8', or "
                "backends=('tensorrt',) for fp16 engines."
            )
    if precision in ("int8", "bf16") and "torchscript" in backends:
        raise BackendUnavailable(
            f"precision {precision!r} is not available for the torchscript backend (fp32 only); export it "
            "separately with precision='fp32'"
        )
    if precision == "bf16":
        if not ort_has_bf16_matmul():
            raise BackendUnavailable(
                "precision 'bf16' skipped: this ONNX Runtime's CPU execution provider has no bfloat16 MatMul "
                "kernel (probed on a one-node graph), so a bf16 graph would not load or would run in fp32 with "
                "casts around every op. Use precision='int8' for a faster CPU engine."
            )
        raise BackendUnavailable(
            "precision 'bf16': this ONNX Runtime has a bfloat16 MatMul kernel, but par-deploy does not convert "
            "graphs to bf16 yet; use precision='int8'"
        )


def ort_has_bf16_matmul() -> bool:
    """Whether ONNX Runtime's CPU provider has a kernel for a one-node bfloat16 ``MatMul`` graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    bf16 = TensorProto.BFLOAT16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "bf16_probe",
        [helper.make_tensor_value_info("a", bf16, [2, 2]), helper.make_tensor_value_info("b", bf16, [2, 2])],
        [helper.make_tensor_value_info("c", bf16, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:  # no kernel: session creation fails ("Could not find an implementation for MatMul")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises NOT_IMPLEMENTED / Fail types of its own
        return False
    return True


def quantize_int8(src: Path, dst: Path, external_data: bool = False) -> list[Path]:
    """``src`` (fp32 ONNX) -> ``dst``: dynamic int8 quantization of the constant MatMul/Gemm weights; returns
    the files written (``dst`` first, then its external data)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    log = logging.getLogger("root")  # onnxruntime.quantization logs through the root logger
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=INT8_METHOD["op_types"],
            per_channel=INT8_METHOD["per_channel"],
            use_external_data_format=external_data,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        log.setLevel(level)
    return [dst] + sorted(p for p in dst.parent.glob(dst.name + "*") if p != dst)
