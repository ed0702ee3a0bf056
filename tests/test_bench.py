"""`par-deploy bench` on a tiny bundle: the JSON schema, every figure positive and finite, clear errors."""

import json
import math
from pathlib import Path

import pytest

from par_deploy.bench import BenchError, BenchOptions, bench
from par_deploy.bench.run import TARGETS, plot_result
from par_deploy.synthetic import randomized_checkpoint


def tiny_checkpoint(path, seed=0, **overrides):
    return randomized_checkpoint("tiny", path, scale=0.05, seed=seed, **overrides)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from par_deploy.export import export_bundle

    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny_checkpoint(root / "ckpt")
    export_bundle(ckpt, root / "bundle", backends=("onnx",), denoise_steps=2, progress=False)
    return root


def walk_numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_numbers(v, f"{path}.{k}")
    elif isinstance(obj, bool | str) or obj is None:
        return
    elif isinstance(obj, int | float):
        yield path, obj


def test_bench_json_schema_and_figures(tiny_bundle, tmp_path):
    opt = BenchOptions(reps=3, warmup=1, ks=(1,), progress=False, batch=(2,))
    result = bench(tiny_bundle / "bundle", None, opt)
    result = json.loads(json.dumps(result))  # what --json writes
    assert result["schema"] == "par-bench" and result["version"] == 1
    assert not any(Path(result[k]).is_absolute() for k in ("bundle", "reference"))  # the JSON is for docs/
    for key in ("machine", "components_ms", "history_ms", "k_ms", "memory", "ratios", "targets", "load_s"):
        assert key in result
    cases = {
        f"{p}/{c}"
        for p in ("engine", "reference_k", "reference_train", "naive_k")
        for c in ("transformer_step", "sampler", "control_step")
    }
    assert set(result["components_ms"]) == cases
    for stats in result["components_ms"].values():
        assert set(stats) == {"p50", "p90", "p99", "min", "mean", "n"} and stats["n"] == 3
        assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"]
    assert set(result["history_ms"]) == {"engine", "reference_k", "naive_k"}
    assert "1" in result["history_ms"]["engine"] and str(8) in result["history_ms"]["engine"]  # tiny: 8 blocks
    assert set(result["k_ms"]["engine"]) == {"1", "2", "50"}  # the sweep, the bundle's K, the training schedule
    assert set(result["targets"]) == set(TARGETS) - {"batch_8_robots_per_s_over_batch_1"}  # measured: batch 2
    batch = result["batch"]
    assert (
        batch["sizes"] == [1, 2] and set(batch["robots_per_s"]) == {"1", "2"} and batch["exports"]["2"]["parity_passed"]
    )
    assert result["ratios"]["batch_2_robots_per_s_over_batch_1"] == batch["robots_per_s_over_batch_1"]["2"] > 0
    assert result["memory"]["engine"]["imported_torch"] is False
    assert result["memory"]["reference"]["imported_torch"] is True
    numbers = list(
        walk_numbers(
            {k: result[k] for k in ("components_ms", "history_ms", "k_ms", "memory", "ratios", "load_s", "batch")}
        )
    )
    assert len(numbers) > 50
    for path, value in numbers:
        assert math.isfinite(value) and value > 0, path
    plot_result(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="not a bundle"):
        bench(tmp_path / "nothing", None, BenchOptions(progress=False))


def test_bundle_of_another_checkpoint_is_refused(tiny_bundle, tmp_path):
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(Exception, match="checkpoint"):
        bench(tiny_bundle / "bundle", other, BenchOptions(reps=2, progress=False, memory=False))
    with pytest.raises(BenchError, match="not found"):
        bench(tiny_bundle / "bundle", tmp_path / "missing", BenchOptions(progress=False))


def test_bench_compares_backends_and_sampler_graphs(tmp_path):
    """What export/measure.py compared, now bench options: another backend of the same bundle beside the ONNX
    engine, and both sampler graph forms at each K of the sweep (with their export cost)."""
    from par_deploy.export import export_bundle

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    export_bundle(ckpt, tmp_path / "b", backends=("onnx", "torchscript"), denoise_steps=2, progress=False)
    opt = BenchOptions(
        reps=2,
        warmup=1,
        ks=(1,),
        memory=False,
        progress=False,
        backends=("onnx", "torchscript"),
        sampler_graphs=("loop",),
        history=(1,),
    )
    result = bench(tmp_path / "b", None, opt)
    assert {"engine/control_step", "engine_torchscript/control_step"} <= set(result["components_ms"])
    assert set(result["k_ms"]) == {"engine", "reference_k", "engine_loop"}
    assert set(result["k_ms"]["engine_loop"]) == {"1", "2", "50"}
    cost = result["k_sweep_export"]["1/loop"]
    assert cost["sampler_graph"] == "loop" and cost["seconds"] > 0 and cost["onnx_bytes"] > 0
    with pytest.raises(BenchError, match="distinct"):
        bench(tmp_path / "b", None, BenchOptions(backends=("onnx", "onnx"), progress=False))
