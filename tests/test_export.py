"""Export to bundles (ONNX + TorchScript) and parity with the eager reference over multi-step episodes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from par_deploy.checkpoint import checkpoint_hash, from_pretrained
from par_deploy.config import preset
from par_deploy.errors import CacheFullError, ConfigError
from par_deploy.export import BackendUnavailable, BundleError, ExportError, export_bundle, load_policy
from par_deploy.export.graphs import StepGraph
from par_deploy.export.onnx_export import export_onnx
from par_deploy.export.parity import synthetic_observations
from par_deploy.export.torchscript_export import export_torchscript
from par_deploy.model.par import PARModel
from par_deploy.reference import TorchPolicy
from par_deploy.runtime.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    GraphSpec,
    TensorSpec,
    graph_specs,
    open_bundle,
    read_manifest,
    sha256_file,
)
from par_deploy.synthetic import randomized_checkpoint
from tests.conftest import use_skewed_normalizer

torch.set_num_threads(1)

# The linear beta schedule keeps a randomised (untrained) Action-DiT's samples mostly inside (-1, 1): with the
# cosine schedule x0 = x_T / sqrt(a_T) saturates at the clip, and action parity would compare mostly +-1.
TINY = dict(beta_schedule="linear")
# state_dim=0 (no state input), 2 cameras, 2 instructions, 3-step DDPM with the condition + step-loop sampler
CUSTOM = dict(
    beta_schedule="linear",
    state_dim=0,
    num_cameras=2,
    image_size=16,
    patch_size=8,
    max_blocks=5,
    instructions=("push the cube", "pick the cube"),
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def tiny(work):
    ckpt = use_skewed_normalizer(randomized_checkpoint("tiny", work / "tiny_ckpt", scale=0.05, **TINY))
    report = export_bundle(
        ckpt, work / "tiny_bundle", backends=("onnx", "torchscript"), denoise_steps=4, progress=False
    )
    return ckpt, report


@pytest.fixture(scope="module")
def custom(work):
    ckpt = use_skewed_normalizer(randomized_checkpoint("tiny", work / "custom_ckpt", scale=0.05, **CUSTOM))
    report = export_bundle(
        ckpt,
        work / "custom_bundle",
        backends=("onnx", "torchscript"),
        denoise_steps=3,
        sampler="ddpm",
        sampler_graph="loop",
        progress=False,
    )
    return ckpt, report


def _episode(ckpt, bundle_dir, backend, instruction_index=0, steps=6, seed=3):
    """Same observations and noise through the engine and TorchPolicy; returns max diffs and ref actions."""
    model, normalizer = from_pretrained(ckpt)
    engine = load_policy(bundle_dir, backend, threads=1)
    ref = TorchPolicy(model, normalizer, sampler=engine.bundle.manifest["sampler"]["kind"], steps=engine.denoise_steps)
    instruction = model.cfg.instructions[instruction_index]
    engine.reset(instruction)
    ref.reset(instruction)
    rng = np.random.default_rng(seed)
    d = {"hidden": 0.0, "cond": 0.0, "actions": 0.0}
    actions = []
    for o in synthetic_observations(model, min(steps, model.cfg.max_blocks), seed):
        noise = rng.standard_normal(engine.noise_shape()).astype(np.float32)
        a = engine.act(o, noise=noise)
        b = ref.act(o, noise=noise)
        h = ref.last_hidden[0]
        with torch.no_grad():
            cond = model.action_condition(ref.last_hidden)[0].numpy()
        d["hidden"] = max(
            d["hidden"], float(np.abs(engine.last_frame_hidden - h[: model.cfg.frame_tokens].numpy()).max())
        )
        d["cond"] = max(d["cond"], float(np.abs(engine.last_action_cond - cond).max()))
        d["actions"] = max(d["actions"], float(np.abs(a - b).max()))
        actions.append(ref.last_chunk)
    return d, np.stack(actions)


@pytest.mark.parametrize("which", ["tiny", "custom"])
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_episode_parity_with_torch_policy(request, which, backend):
    ckpt, report = request.getfixturevalue(which)
    n_instr = len(preset("tiny", **(TINY if which == "tiny" else CUSTOM)).instructions)
    for i in range(n_instr):
        d, actions = _episode(ckpt, report.bundle_dir, backend, instruction_index=i)
        assert d["hidden"] < 1e-4 and d["cond"] < 1e-4, d
        assert d["actions"] < 1e-3, d
        # the comparison means something: actions vary across steps and dims, most are not clipped
        assert np.ptp(actions) > 0.5 and not np.allclose(actions[0], actions[1])
        assert (np.abs(actions) < 0.999).mean() > 0.3


def test_export_report_and_manifest(tiny, custom):
    for ckpt, report in (tiny, custom):
        assert set(report.parity) == set(report.backends) == {"onnx", "torchscript"}
        for p in report.parity.values():
            assert p["passed"] and p["hidden_max_abs"] < 1e-4 and p["actions_max_abs"] < 1e-3
            assert p["reference_actions_std"] > 0.1 and p["reference_actions_unsaturated"] > 0.3
        m = read_manifest(report.bundle_dir)
        assert m["checkpoint_hash"] == checkpoint_hash(ckpt)
        assert m["format_version"] == BUNDLE_FORMAT_VERSION and m["precision"] == "fp32"
        assert m["cache"]["overflow"] == "error" and m["cache"]["max_blocks"] == m["config"]["max_blocks"]
        assert m["parity"] == json.loads(json.dumps(report.parity))
        for backend in report.backends:
            for entry in m["engines"][backend].values():
                assert sha256_file(report.bundle_dir / entry["file"]) == entry["sha256"]
        assert report.bundle_bytes == sum(report.sizes.values()) > 0
        assert report.seconds["onnx"] > 0 and report.seconds["torchscript"] > 0
    m = read_manifest(custom[1].bundle_dir)
    assert m["sampler"]["kind"] == "ddpm" and m["sampler"]["steps"] == 3 and m["sampler"]["graph"] == "loop"
    assert len(m["sampler"]["timesteps"]) == 3 and m["sampler"]["timesteps"][0] == m["config"]["train_timesteps"] - 1
    assert set(m["graphs"]) == {"step", "condition", "denoise"}
    assert set(read_manifest(tiny[1].bundle_dir)["graphs"]) == {"step", "sampler"}


def test_step_graph_returns_new_kv_and_omits_state_when_absent(tiny, custom):
    for (_, report), has_state in ((tiny, True), (custom, False)):
        g = onnx.load(str(report.bundle_dir / "onnx" / "step.onnx"), load_external_data=False).graph
        inputs, outputs = [i.name for i in g.input], [o.name for o in g.output]
        assert outputs == ["action_cond", "frame_hidden", "new_k", "new_v"]
        assert ("state" in inputs) == has_state
        layers = read_manifest(report.bundle_dir)["cache"]["layers"]
        caches = {f"cache_{kind}_{i}" for kind in "kv" for i in range(layers)}
        assert caches | {"pos", "first", "rgb", "prev_actions"} <= set(inputs)
        # issue #10: the cache is read in place, never split out of one tensor or concatenated with the block
        consumers = {n.op_type for n in g.node for i in n.input if i in caches}
        assert consumers and not consumers & {"Split", "Concat", "Slice", "Gather"}, consumers


def test_manifest_round_trip(tiny):
    _, report = tiny
    bundle = open_bundle(report.bundle_dir, "onnx")
    m = bundle.manifest
    assert json.loads(json.dumps(m)) == m
    cfg = bundle.config
    assert cfg.to_dict() == m["config"]
    specs = graph_specs(cfg, m["sampler"]["steps"], m["sampler"]["graph"])
    assert {k: GraphSpec.from_dict(k, v) for k, v in m["graphs"].items()} == specs == bundle.graphs
    assert TensorSpec.from_dict(specs["step"].inputs[0].to_dict()) == specs["step"].inputs[0]
    assert bundle.normalizer.to_dict() == m["normalization"]
    k, v = bundle.text_prefix()
    assert k.shape == (1, cfg.depth, 1, cfg.heads, cfg.num_text_tokens, cfg.dim // cfg.heads) == v.shape


def _copy(report, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(report.bundle_dir, dst)
    return dst


def _rewrite(bundle_dir, fn):
    m = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    fn(m)
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(m))


def test_tampered_files_are_refused_by_name(tiny, tmp_path):
    b = _copy(tiny[1], tmp_path)
    for rel in ("onnx/step.onnx", "torchscript/sampler.pt", "text_prefix.npz"):
        path = b / rel
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        backend = "torchscript" if rel.startswith("torchscript") else "onnx"
        with pytest.raises(BundleError, match=rel.split("/")[-1]):
            load_policy(b, backend)
        path.write_bytes(original)
    (b / "onnx" / "sampler.onnx").unlink()
    with pytest.raises(BundleError, match="sampler.onnx"):
        load_policy(b, "onnx")
    load_policy(b, "torchscript")  # the other backend's files are intact


def test_bundle_for_another_model_is_refused(tiny, custom, tmp_path):
    b = _copy(tiny[1], tmp_path)
    other = custom[1].bundle_dir
    for backend, rel in (("onnx", "onnx/step.onnx"), ("torchscript", "torchscript/step.pt")):
        shutil.copy(other / rel, b / rel)  # a foreign engine with its hash "fixed" in the manifest

        def fix(m, backend=backend, rel=rel):
            m["engines"][backend]["step"].update(sha256=sha256_file(b / rel), bytes=(b / rel).stat().st_size)

        _rewrite(b, fix)
        with pytest.raises(BundleError, match="step"):
            load_policy(b, backend)
    # the bundle is refused for a checkpoint it was not exported from
    with pytest.raises(BundleError, match="not from"):
        load_policy(tiny[1].bundle_dir, "onnx", checkpoint=custom[0])
    load_policy(tiny[1].bundle_dir, "onnx", checkpoint=tiny[0])
    # a manifest whose config was edited no longer matches its graph signatures
    b2 = tmp_path / "edited"
    shutil.copytree(tiny[1].bundle_dir, b2)
    _rewrite(b2, lambda m: m["config"].update(dim=64))
    with pytest.raises(BundleError, match="manifest.json"):
        load_policy(b2, "onnx")
    # newer format versions and other files are refused
    _rewrite(b2, lambda m: m.update(format_version=BUNDLE_FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer"):
        load_policy(b2, "onnx")
    # format 1 (graph input ``cond``, before ``action_cond`` was one name end to end): a re-export hint
    _rewrite(b2, lambda m: m.update(format_version=1))
    with pytest.raises(BundleError, match="older than this par-deploy reads.*re-export"):
        load_policy(b2, "onnx")
    _rewrite(b2, lambda m: m.update(format="something-else"))
    with pytest.raises(BundleError, match="not a par-deploy bundle"):
        load_policy(b2, "onnx")


def test_episode_longer_than_the_cache_raises(custom):
    ckpt, report = custom
    policy = load_policy(report.bundle_dir, "onnx")
    model, _ = from_pretrained(ckpt)
    obs = synthetic_observations(model, 1)[0]
    for _ in range(2):
        policy.reset("pick the cube")
        for _ in range(model.cfg.max_blocks):
            policy.act(obs)
        assert policy.steps_left == 0
        with pytest.raises(CacheFullError, match="reset"):
            policy.act(obs)


def test_fp16_on_cpu_backends_is_a_clear_error(tiny, tmp_path):
    ckpt, _ = tiny
    for backends in (("onnx",), ("torchscript",)):
        with pytest.raises(BackendUnavailable, match="fp32"):
            export_bundle(ckpt, tmp_path / "fp16", backends=backends, precision="fp16", progress=False)
    assert not (tmp_path / "fp16").exists()
    # an fp16 manifest is refused by the ONNX Runtime backend too
    b = _copy(tiny[1], tmp_path)
    _rewrite(b, lambda m: m.update(precision="fp16"))
    with pytest.raises(BackendUnavailable, match="fp32"):
        load_policy(b, "onnx")


def test_argument_and_directory_errors(tiny, tmp_path):
    ckpt, report = tiny
    with pytest.raises(ValueError, match="backends"):
        export_bundle(ckpt, tmp_path / "x", backends=("tflite",), progress=False)
    with pytest.raises(ValueError, match="sampler"):
        export_bundle(ckpt, tmp_path / "x", sampler="euler", progress=False)
    with pytest.raises(ExportError, match="not empty"):
        export_bundle(ckpt, report.bundle_dir, progress=False)
    # without TensorRT/CUDA that is what is missing; with them, the bundle's engines are
    with pytest.raises((BackendUnavailable, BundleError), match="TensorRT|no tensorrt engines"):
        load_policy(report.bundle_dir, "tensorrt")
    with pytest.raises(BundleError, match="unknown backend"):
        load_policy(report.bundle_dir, "tflite")


def test_legacy_exporter_and_overwrite(tiny, tmp_path):
    ckpt, _ = tiny
    out = tmp_path / "legacy"
    report = export_bundle(ckpt, out, backends=("onnx",), onnx_exporter="legacy", denoise_steps=2, progress=False)
    assert report.parity["onnx"]["passed"] and report.parity["onnx"]["actions_max_abs"] < 1e-3
    report = export_bundle(
        ckpt,
        out,
        backends=("onnx",),
        onnx_exporter="legacy",
        denoise_steps=2,
        sampler_graph="loop",
        progress=False,
        overwrite=True,
    )
    assert read_manifest(out)["sampler"]["graph"] == "loop" and report.parity["onnx"]["passed"]


def test_ablation_variants_are_refused():
    with pytest.raises(ConfigError, match="variant 'full'"):
        StepGraph(PARModel(preset("tiny", variant="noar")))


class _InPlaceCacheStep(nn.Module):
    """Writes its cache in place and returns only the hidden state: what exporters silently mangle."""

    def forward(self, x, pos, cache):
        cache.index_copy_(0, pos, x)
        return x * 2


class _BakedPositionStep(nn.Module):
    """Slices with a Python int taken from the position tensor: jit.trace bakes the position in."""

    def forward(self, x, pos, cache):
        p = int(pos[0])
        return cache[p : p + 1] + x


def test_export_checks_catch_silent_exporter_failures(tmp_path):
    spec = GraphSpec(
        "step",
        (
            TensorSpec("x", "float32", (1, 4)),
            TensorSpec("pos", "int64", (1,)),
            TensorSpec("cache", "float32", (6, 4)),
        ),
        (TensorSpec("h", "float32", (1, 4)), TensorSpec("new_cache", "float32", (6, 4))),
    )
    args = (torch.randn(1, 4), torch.tensor([2]), torch.randn(6, 4))
    with pytest.raises(ExportError, match="dropped an output"):
        export_onnx(_InPlaceCacheStep(), spec, args, tmp_path / "inplace.onnx")
    ts_spec = GraphSpec("step", spec.inputs, spec.outputs[:1])
    other = (torch.randn(1, 4), torch.tensor([4]), torch.randn(6, 4))
    with pytest.raises(ExportError, match="baked in"):
        export_torchscript(_BakedPositionStep(), ts_spec, args, other, tmp_path / "baked.pt")


@pytest.mark.parametrize("part", ["action_head", "transformer"])
def test_parity_report_fails_a_wrong_graph(tiny, part):
    """The engine against a reference whose Action-DiT (or transformer) has one weight off by 0.05: the sampler
    check (or the hidden/condition check) fails, the other graph's check still passes."""
    from par_deploy.export.parity import parity_report

    ckpt, report = tiny
    model, normalizer = from_pretrained(ckpt)
    engine = load_policy(report.bundle_dir, "onnx", threads=1)
    assert parity_report(model, normalizer, engine)["passed"]
    weight = next(p for n, p in model.named_parameters() if n.startswith(part) and p.ndim == 2)
    with torch.no_grad():
        weight[0, 0] += 0.05
    p = parity_report(model, normalizer, engine)
    assert not p["passed"]
    if part == "action_head":
        assert p["sampler_over_tolerance"] > 1 and p["cond_max_abs"] <= p["tolerance"]["cond"]
    else:
        assert p["cond_max_abs"] > p["tolerance"]["cond"] or p["hidden_max_abs"] > p["tolerance"]["hidden"]
