"""Reduced precision as a bundle property: ``export_bundle(precision=...)`` on the tiny preset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from par_deploy.export import BackendUnavailable, ExportError, export_bundle, load_policy
from par_deploy.export.parity import TOLERANCES
from par_deploy.export.precision import INT8_GRAPHS, ort_has_bf16_matmul
from par_deploy.export.tensorrt import onnx_source
from par_deploy.runtime.bundle import MANIFEST_FILE, read_manifest
from par_deploy.synthetic import randomized_checkpoint

torch.set_num_threads(1)

TINY = dict(beta_schedule="linear")  # keeps the untrained sampler's actions mostly unclipped (test_export.py)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    ckpt = randomized_checkpoint("tiny", root / "ckpt", scale=0.05, **TINY)
    return ckpt, {
        p: export_bundle(ckpt, root / p, precision=p, denoise_steps=2, progress=False) for p in ("fp32", "int8")
    }


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_each_precision_exports_within_its_tolerance(bundles, precision):
    _, reports = bundles
    report = reports[precision]
    m = read_manifest(report.bundle_dir)
    assert m["precision"] == report.precision == precision
    p = m["parity"]["onnx"]
    rel = TOLERANCES[precision]["hidden_rel"]
    assert p["passed"] and p["tolerance"]["sampler"] == TOLERANCES[precision]["actions"]
    assert p["sampler_over_tolerance"] <= 1.0 and p["feedback"] == "reference chunk (executed=)"
    assert p["tolerance"]["hidden"] == pytest.approx(rel * max(1.0, p["hidden_scale"]))
    assert p["reference_actions_unsaturated"] > 0.5  # the action comparison means something
    policy = load_policy(report.bundle_dir, "onnx")
    assert policy.bundle.precision == precision
    policy.reset()
    assert policy.act({"rgb": _rgb(policy), "state": _state(policy)}).shape == (
        policy.spec.chunk_len,
        policy.spec.action_dim,
    )


def test_int8_graphs_are_quantized_and_keep_their_fp32_source(bundles):
    _, reports = bundles
    root = reports["int8"].bundle_dir
    m = read_manifest(root)
    assert m["quantization"]["graphs"] == list(INT8_GRAPHS)
    assert read_manifest(reports["fp32"].bundle_dir)["quantization"] is None
    for name, entry in m["engines"]["onnx"].items():
        graph = onnx.load(str(root / entry["file"]), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        weights = {i.name for i in graph.initializer}
        if name in INT8_GRAPHS:
            assert entry["precision"] == "int8" and entry["file"].endswith(".int8.onnx")
            assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
            # every matmul by a weight is quantized; activation x activation (attention) stays fp32
            assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
            src = onnx_source(root, m, name)  # what TensorRT builds from: the exporter's fp32 graph
            assert src.name == f"{name}.onnx" and "MatMul" in {n.op_type for n in onnx.load(str(src)).graph.node}
        else:
            assert entry["precision"] == "fp32" and "source" not in entry
            assert "MatMulInteger" not in ops
    # a modified fp32 source is refused by name
    src = root / m["engines"]["onnx"][INT8_GRAPHS[0]]["source"]["file"]
    src.write_bytes(src.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="fp32 source"):
        onnx_source(root, m, INT8_GRAPHS[0])


def test_int8_differs_from_fp32_but_stays_close(bundles):
    _, reports = bundles
    p32 = read_manifest(reports["fp32"].bundle_dir)["parity"]["onnx"]
    p8 = read_manifest(reports["int8"].bundle_dir)["parity"]["onnx"]
    assert p8["hidden_max_abs"] > 10 * p32["hidden_max_abs"]  # the int8 graph really runs in int8
    tol = TOLERANCES["int8"]["hidden_rel"] * max(1.0, p8["hidden_scale"])
    assert p8["hidden_max_abs"] <= p8["tolerance"]["hidden"] == tol


def test_unavailable_precisions_are_clear_errors(bundles, tmp_path):
    ckpt, reports = bundles
    with pytest.raises(BackendUnavailable, match="torchscript"):
        export_bundle(ckpt, tmp_path / "a", backends=("onnx", "torchscript"), precision="int8", progress=False)
    if not ort_has_bf16_matmul():
        with pytest.raises(BackendUnavailable, match="no bfloat16 MatMul kernel"):
            export_bundle(ckpt, tmp_path / "b", precision="bf16", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a manifest precision the ONNX Runtime backend cannot run is refused with the reason
    root = tmp_path / "fp16"
    shutil.copytree(reports["fp32"].bundle_dir, root)
    m = json.loads((root / MANIFEST_FILE).read_text())
    (root / MANIFEST_FILE).write_text(json.dumps({**m, "precision": "fp16"}))
    with pytest.raises(BackendUnavailable, match="fp32 and int8"):
        load_policy(root, "onnx")


def _rgb(policy):
    s = policy.spec
    return np.zeros((s.num_cameras, s.image_size, s.image_size, 3), np.uint8)


def _state(policy):
    return np.zeros(policy.spec.state_dim, np.float32)


def test_profile_reports_node_counts_and_op_times(bundles):
    from par_deploy.export.ort_profile import format_profile, profile_bundle

    _, reports = bundles
    prof = {p: profile_bundle(reports[p].bundle_dir, runs=3) for p in ("fp32", "int8")}
    for p in prof.values():
        assert set(p) == {"step", "sampler"}
        for g in p.values():
            assert g["nodes"] == sum(g["nodes_by_op"].values()) > 0 and g["optimized_nodes"] > 0
            assert sum(o["share"] for o in g["ops_by_time"]) == pytest.approx(1.0)
            assert g["kernel_ms_per_run"] > 0
    assert "MatMulInteger" in prof["int8"]["step"]["nodes_by_op"]
    assert "MatMulInteger" not in prof["fp32"]["step"]["nodes_by_op"]
    assert prof["int8"]["sampler"]["nodes_by_op"] == prof["fp32"]["sampler"]["nodes_by_op"]  # kept fp32
    assert "after ONNX Runtime's optimizer" in format_profile(prof["int8"])


def test_engines_compare_fp32_and_int8_in_one_run(bundles):
    from par_deploy.bench.engines import compare

    _, reports = bundles
    r = compare(reports["fp32"].bundle_dir, reports["int8"].bundle_dir, reps=2, warmup=1)
    assert (r["a"]["precision"], r["b"]["precision"]) == ("fp32", "int8")
    for key in ("b_over_a", "a_over_reference", "b_over_reference"):
        assert set(r[key]) == {"transformer_step", "sampler", "control_step"}
        assert all(v > 0 and np.isfinite(v) for v in r[key].values())
    assert r["b_over_a"]["control_step"] == pytest.approx(r["p50_ms"]["a/control_step"] / r["p50_ms"]["b/control_step"])
