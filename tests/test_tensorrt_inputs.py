"""What the TensorRT path consumes, checked without TensorRT: the ONNX graphs (opset, op list, static shapes,
uint8 handling) and the optimisation profiles from the manifest. Building and running engines needs
TensorRT + CUDA and is skipped here with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from par_deploy.export import BackendUnavailable, ExportError, export_bundle
from par_deploy.export.onnx_export import load_onnx, onnx_ops, onnx_opset
from par_deploy.export.tensorrt import TRT_MAX_OPSET, TRT_SUPPORTED_OPS, check_onnx_for_tensorrt
from par_deploy.runtime import load, open_bundle, tensorrt_profiles
from par_deploy.runtime.bundle import GraphSpec, TensorSpec
from par_deploy.runtime.tensorrt_policy import import_tensorrt
from par_deploy.synthetic import randomized_checkpoint

torch.set_num_threads(1)


def _tensorrt_reason() -> str | None:
    try:
        import_tensorrt()
    except BackendUnavailable as e:
        return str(e)
    return None


TRT_MISSING = _tensorrt_reason()


@pytest.fixture(scope="module", params=["tiny-unrolled", "custom-loop"])
def bundle(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny-unrolled":
        ckpt = randomized_checkpoint("tiny", work / "ckpt", scale=0.05, beta_schedule="linear")
        kw = dict(sampler_graph="unrolled")
    else:
        ckpt = randomized_checkpoint(
            "tiny", work / "ckpt", scale=0.05, beta_schedule="linear", state_dim=0, num_cameras=2
        )
        kw = dict(sampler_graph="loop", sampler="ddpm")
    return open_bundle(
        export_bundle(ckpt, work / "bundle", backends=("onnx",), denoise_steps=3, progress=False, **kw).bundle_dir,
        "onnx",
    )


def test_onnx_graphs_are_buildable_by_tensorrt(bundle):
    for name, spec in bundle.graphs.items():
        path = bundle.engine_path("onnx", name)
        info = check_onnx_for_tensorrt(path, spec)
        model = load_onnx(path)
        assert 17 <= onnx_opset(model) == info["opset"] <= TRT_MAX_OPSET
        ops = onnx_ops(model)
        assert ops and ops <= TRT_SUPPORTED_OPS, sorted(ops - TRT_SUPPORTED_OPS)
        assert not {"Attention", "ScaledDotProductAttention"} & ops  # opset-23 attention would not parse
        assert info["inputs"] == {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs}


def test_all_graph_shapes_are_static_and_match_the_manifest(bundle):
    for name, spec in bundle.graphs.items():
        graph = load_onnx(bundle.engine_path("onnx", name)).graph
        for values, tensors in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
            got = {
                v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in values
            }
            assert got == {t.name: list(t.shape) for t in tensors}
            assert all(d and d > 0 for dims in got.values() for d in dims)
    step = load_onnx(bundle.engine_path("onnx", "step")).graph
    rgb_consumers = {n.op_type for n in step.node if "rgb" in n.input}
    assert rgb_consumers == {"Cast"}  # TensorRT takes uint8 only as network I/O


def test_optimisation_profiles_come_from_the_manifest(bundle):
    profiles = tensorrt_profiles(bundle.manifest)
    assert set(profiles) == set(bundle.graphs)
    for name, spec in bundle.graphs.items():
        onnx_inputs = [i.name for i in load_onnx(bundle.engine_path("onnx", name)).graph.input]
        assert list(profiles[name]) == spec.input_names == onnx_inputs
        for t in spec.inputs:
            lo, opt, hi = profiles[name][t.name]
            assert lo == opt == hi == t.shape
    c = bundle.config
    cache = profiles["step"]["cache_k"][1]
    assert cache == (c.depth, 1, c.heads, c.max_seq_len, c.dim // c.heads)


def _model(op: str, dims, dtype=TensorProto.FLOAT, opset=18) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", dtype, dims)
    y = helper.make_tensor_value_info("y", dtype, dims)
    node = (
        helper.make_node(op, ["x"], ["y"])
        if op != "BitShift"
        else helper.make_node(op, ["x", "x"], ["y"], direction="LEFT")
    )
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", opset)])


def test_check_rejects_what_tensorrt_cannot_build(tmp_path):
    spec = GraphSpec("g", (TensorSpec("x", "float32", (1, 4)),), (TensorSpec("y", "float32", (1, 4)),))
    cases = {
        "ok": (_model("Relu", [1, 4]), None),
        "op": (_model("BitShift", [1, 4], TensorProto.UINT8), "does not support"),
        "dynamic": (_model("Relu", ["batch", 4]), "non-static"),
        "opset": (_model("Relu", [1, 4], opset=23), "opset 23"),
        "uint8": (_model("Identity", [1, 4], TensorProto.UINT8), "cast first"),
    }
    for name, (model, error) in cases.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        if error is None:
            assert check_onnx_for_tensorrt(path, spec)["ops"] == ["Relu"]
        else:
            with pytest.raises(ExportError, match=error):
                check_onnx_for_tensorrt(path, spec)


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a CUDA device are available here")
def test_tensorrt_unavailable_is_a_clear_error(bundle, tmp_path):
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        import_tensorrt()
    ckpt = randomized_checkpoint("tiny", tmp_path / "ckpt")
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        export_bundle(ckpt, tmp_path / "trt", backends=("tensorrt",), progress=False)
    assert not (tmp_path / "trt").exists()
    from par_deploy.runtime.tensorrt_policy import TensorRTPolicy

    with pytest.raises(BackendUnavailable, match="TensorRT"):
        TensorRTPolicy(bundle)


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT engine build needs TensorRT + CUDA: {TRT_MISSING}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_tensorrt_engines(bundle, tmp_path, precision):
    import shutil

    from par_deploy.export.tensorrt import build_engines

    root = tmp_path / "bundle"
    shutil.copytree(bundle.path, root)
    build_engines(root, precision)
    trt_policy, ort_policy = load(root, "tensorrt"), load(root, "onnx")
    tol = 1e-3 if precision == "fp32" else 5e-2
    rng = np.random.default_rng(0)
    s = trt_policy.spec
    trt_policy.reset()
    ort_policy.reset()
    for step in range(3):
        obs = {
            "rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
            "state": rng.standard_normal(s.state_dim).astype(np.float32),
        }
        noise = rng.standard_normal(trt_policy.noise_shape()).astype(np.float32)
        a, b = trt_policy.act(obs, noise=noise), ort_policy.act(obs, noise=noise)
        assert np.abs(a - b).max() < tol, step
        assert np.abs(trt_policy.last_action_cond - ort_policy.last_action_cond).max() < tol
    trt_policy.close()
