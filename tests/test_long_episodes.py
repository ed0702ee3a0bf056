"""Episodes of 10x ``max_blocks`` control steps, in-process and through the policy server: a sliding cache runs
through them without error (and the server slides exactly as the runtime does); the ``error`` overflow raises
``CacheFullError`` at step ``max_blocks`` of every episode, through both, consuming nothing. And the soak
measurement (``par_deploy.bench.soak``) on a short run."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest

from par_deploy import runtime
from par_deploy.client import RemotePolicy
from par_deploy.errors import CacheFullError, ConfigError
from par_deploy.export import export_bundle
from par_deploy.serve.server import PolicyServer, ServerThread
from par_deploy.synthetic import randomized_checkpoint

LENGTHS = 10  # episode length in multiples of max_blocks


@pytest.fixture(scope="module")
def slide_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("long")
    ckpt = randomized_checkpoint("tiny", work / "ckpt", scale=0.05, overflow="slide")
    return export_bundle(ckpt, work / "bundle", backends=("onnx",), denoise_steps=4, progress=False).bundle_dir


@contextmanager
def _policy(bundle, where: str):
    """The policy under test: the in-process runtime, or a client of a server on a loopback port the OS picks."""
    if where == "runtime":
        yield runtime.load(bundle, "onnx", threads=1)
        return
    with (
        ServerThread(PolicyServer(bundle, "onnx", threads=1, pool_size=0, max_clients=1)) as st,
        RemotePolicy(st.url) as remote,
    ):
        yield remote


def _obs(spec, seed):
    rng = np.random.default_rng(seed)
    return {
        "rgb": rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), dtype=np.uint8),
        "state": rng.standard_normal(spec.state_dim).astype(np.float32),
    }


def _recording_positions(policy) -> list[int]:
    """Record the cache position of every block the in-process ``policy`` appends (slides included)."""
    positions: list[int] = []
    step_block = policy.step_block

    def recorded(*args):
        positions.append(args[-1])
        return step_block(*args)

    policy.step_block = recorded
    return positions


@pytest.mark.parametrize("where", ["runtime", "server"])
def test_sliding_cache_runs_an_episode_of_10x_max_blocks(slide_bundle, where):
    ref = runtime.load(slide_bundle, "onnx", threads=1)  # in-process twin, same noise: the chunks must agree
    positions = _recording_positions(ref)
    n, half = ref.spec.max_blocks, ref.spec.max_blocks // 2
    rng = np.random.default_rng(3)
    with _policy(slide_bundle, where) as policy:
        assert policy.spec == ref.spec and policy.spec.overflow == "slide"
        for p in (policy, ref):
            p.reset(seed=1)
        for step in range(LENGTHS * n):
            noise = rng.standard_normal(ref.noise_shape()).astype(np.float32) if step % 2 else None
            obs = _obs(ref.spec, step)
            np.testing.assert_array_equal(policy.act(obs, noise), ref.act(obs, noise), err_msg=f"step {step}")
            assert policy.steps_left == float("inf")
    # a slide at step n and every n - n/2 steps after it, each re-encoding the newest n/2 blocks at 0 .. n/2-1
    slides = len(range(n, LENGTHS * n, n - half))
    assert len(positions) == LENGTHS * n + slides * half and max(positions) == n - 1
    assert positions[: n + half + 1] == [*range(n), *range(half), half]


@pytest.mark.parametrize("where", ["runtime", "server"])
def test_error_overflow_raises_cache_full_at_step_max_blocks(runtime_bundle, where):
    ref = runtime.load(runtime_bundle, "onnx", threads=1)
    n, instruction = ref.spec.max_blocks, ref.spec.instructions[1]
    rng = np.random.default_rng(4)
    raised_at, in_episode = [], 0
    with _policy(runtime_bundle, where) as policy:
        assert policy.spec.overflow == "error"
        for p in (policy, ref):
            p.reset(instruction, seed=2)
        for step in range(LENGTHS * n):
            obs, noise = _obs(ref.spec, step), rng.standard_normal(ref.noise_shape()).astype(np.float32)
            if in_episode == n:  # the cache is full: refused, nothing consumed, until reset
                for _ in range(2):
                    with pytest.raises(CacheFullError, match=f"static KV-cache length \\({n} control steps\\)"):
                        policy.act(obs, noise)
                    assert policy.steps_left == 0
                raised_at.append(step)
                for p in (policy, ref):
                    p.reset(instruction)
                in_episode = 0
            assert policy.steps_left == n - in_episode
            np.testing.assert_array_equal(policy.act(obs, noise), ref.act(obs, noise), err_msg=f"step {step}")
            in_episode += 1
    assert raised_at == [k * n for k in range(1, LENGTHS)]


def test_soak_samples_rss_and_latency_per_window(slide_bundle, runtime_bundle, tmp_path, capsys):
    """``python -m par_deploy.bench.soak``: one sample per window (the last one shorter), a table, a JSON file;
    a sliding cache runs as one episode, an ``error`` cache is reset whenever it is full."""
    from par_deploy.bench import soak

    out = tmp_path / "soak.json"
    soak.main([str(slide_bundle), "--control-steps", "25", "--every", "10", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["schema"] == "par-soak" and r["overflow"] == "slide" and r["resets"] == 0
    assert [s["step"] for s in r["series"]] == [10, 20, 25]
    for s in r["series"]:
        assert s["rss_mb"] > 10 and 0 < s["cpu_p50_ms"] and 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert r["summary"]["rss_growth_mb"] == r["series"][-1]["rss_mb"] - r["series"][0]["rss_mb"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["steps", "RSS", "MB"] and [row.split()[0] for row in table[1:4]] == [
        "10",
        "20",
        "25",
    ]
    assert "25 control steps, overflow slide (max_blocks 8), 0 resets" in table[4]
    n = runtime.load(runtime_bundle).spec.max_blocks
    assert soak.soak(runtime_bundle, control_steps=3 * n + 1, every=n)["resets"] == 3  # full at steps n, 2n, 3n
    with pytest.raises(ConfigError, match="must be >= 1"):
        soak.soak(runtime_bundle, control_steps=10, every=0)
