"""The policy server and its torch-free client: handshake, parity with the in-process runtime (with and without
executed chunks), isolation of clients, bad input, health check, SIGTERM, and the strict wire decoding. Episodes
of 10x the cache length (sliding and error overflow): tests/test_long_episodes.py."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap

import msgpack
import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from par_deploy import runtime
from par_deploy.client import RemotePolicy
from par_deploy.errors import InputError
from par_deploy.export import export_bundle
from par_deploy.files import sha256_file
from par_deploy.serve import protocol
from par_deploy.serve.protocol import ProtocolError, RemoteError, ServerUnavailable
from par_deploy.serve.server import PolicyServer, ServerProcess, ServerThread
from par_deploy.synthetic import randomized_checkpoint

torch.set_num_threads(1)
INSTRUCTIONS = ("push the cube", "pick the cube")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    ckpt = randomized_checkpoint("tiny", work / "ckpt", scale=0.05, beta_schedule="linear", instructions=INSTRUCTIONS)
    return export_bundle(ckpt, work / "bundle", backends=("onnx",), denoise_steps=4, progress=False).bundle_dir


@pytest.fixture(scope="module")
def server(bundle):
    with ServerThread(PolicyServer(bundle, "onnx", threads=1, pool_size=1, max_clients=8)) as st:
        yield st


def _obs(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "rgb": rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), dtype=np.uint8),
        "state": rng.standard_normal(spec.state_dim).astype(np.float32),
    }


def _raw(url, frame):
    """Send one raw frame on a fresh connection (after its hello) and return the decoded reply."""
    with connect(url, compression=None, proxy=None) as ws:
        ws.recv(timeout=30)
        ws.send(frame)
        return protocol.unpack(ws.recv(timeout=30))


def test_handshake_sends_the_policy_spec(server, bundle):
    local = runtime.load(bundle, "onnx")
    with RemotePolicy(server.url) as remote:
        assert remote.spec == local.spec and remote.spec.instructions == INSTRUCTIONS
        assert remote.noise_shape() == local.noise_shape() and remote.denoise_steps == 4
        assert remote.info["backend"] == "onnx"
        assert remote.info["bundle_hash"] == sha256_file(bundle / "manifest.json")
        assert remote.steps_left == local.spec.max_blocks


def test_same_chunks_as_the_in_process_runtime(server, bundle):
    local = runtime.load(bundle, "onnx")
    rng = np.random.default_rng(7)
    with RemotePolicy(server.url) as remote:
        for policy in (local, remote):
            policy.reset("pick the cube", seed=3)
        for step in range(4):  # explicit noise, then the policies' own seeded noise
            noise = rng.standard_normal(local.noise_shape()).astype(np.float32) if step < 2 else None
            a, b = local.act(_obs(local.spec, step), noise), remote.act(_obs(local.spec, step), noise)
            assert b.dtype == np.float32 and b.shape == a.shape
            np.testing.assert_array_equal(a, b)
            assert remote.steps_left == local.steps_left == local.spec.max_blocks - step - 1
        t = remote.last_timing
        assert 0 < t["compute_ms"] <= t["server_ms"] <= t["round_trip_ms"]


def test_two_clients_are_independent_episodes(server, bundle):
    refs = [runtime.load(bundle, "onnx"), runtime.load(bundle, "onnx")]
    with RemotePolicy(server.url) as a, RemotePolicy(server.url) as b:
        for (remote, ref), (instruction, seed) in zip(
            ((a, refs[0]), (b, refs[1])), ((INSTRUCTIONS[0], 1), (INSTRUCTIONS[1], 2)), strict=True
        ):
            remote.reset(instruction, seed=seed)
            ref.reset(instruction, seed=seed)
        for step in range(5):  # interleaved; b runs one step more than a
            if step < 4:
                np.testing.assert_array_equal(a.act(_obs(a.spec, step)), refs[0].act(_obs(a.spec, step)))
            np.testing.assert_array_equal(b.act(_obs(b.spec, 9 + step)), refs[1].act(_obs(b.spec, 9 + step)))
        assert (a.steps_left, b.steps_left) == (a.spec.max_blocks - 4, b.spec.max_blocks - 5)


def test_a_bad_observation_fails_that_client_only(server, bundle):
    ref = runtime.load(bundle, "onnx")
    with RemotePolicy(server.url) as bad, RemotePolicy(server.url) as good:
        for p in (bad, good, ref):
            p.reset(seed=0)
        spec = good.spec
        obs = _obs(spec)
        wrong = [
            ({**obs, "rgb": obs["rgb"][..., :2]}, "expected shape"),
            ({**obs, "rgb": obs["rgb"].astype(np.float32)}, "expected dtype uint8"),
            ({**obs, "state": np.full(spec.state_dim, np.nan, np.float32)}, "NaN"),
            ({"rgb": obs["rgb"]}, "expected a numpy array, found NoneType"),
        ]
        for observation, message in wrong:
            with pytest.raises(InputError, match=message):
                bad.act(observation)
            assert bad.steps_left == spec.max_blocks  # nothing was consumed
            np.testing.assert_array_equal(good.act(obs), ref.act(obs))
        with pytest.raises(InputError, match="found list"):  # refused by the client before sending
            bad.act({"rgb": obs["rgb"], "state": [0.0] * spec.state_dim})
        with pytest.raises(InputError, match="unknown instruction"):
            bad.reset("fly to the moon")
        fresh = runtime.load(bundle, "onnx")
        fresh.reset(seed=0)
        np.testing.assert_array_equal(bad.act(obs), fresh.act(obs))  # the errors cost the episode nothing


def test_executed_chunks_through_the_server_equal_the_in_process_run(server, bundle):
    """A controller that overrides every other chunk and says so with ``executed``: the server's chunks equal the
    in-process runtime's for the same executed chunks and noise, and differ from a run without them (so a server
    that dropped ``executed`` would fail here)."""
    local, plain = runtime.load(bundle, "onnx"), runtime.load(bundle, "onnx")
    rng = np.random.default_rng(11)
    with RemotePolicy(server.url) as remote:
        for policy in (local, plain, remote):
            policy.reset(INSTRUCTIONS[0], seed=4)
        executed, differed = None, False
        for step in range(6):
            obs = _obs(local.spec, 20 + step)
            noise = rng.standard_normal(local.noise_shape()).astype(np.float32) if step % 3 else None
            a = local.act(obs, noise, executed=executed)
            np.testing.assert_array_equal(remote.act(obs, noise, executed=executed), a, err_msg=f"step {step}")
            differed |= not np.array_equal(plain.act(obs, noise), a)
            executed = (0.5 * a + 0.1).astype(np.float32) if step % 2 == 0 else None  # the override, controller units
        assert differed, "executed= changed nothing in-process: this test could not see a server ignore it"
        assert remote.steps_left == local.steps_left == local.spec.max_blocks - 6


def test_a_bad_executed_chunk_fails_that_client_only(server, bundle):
    ref = runtime.load(bundle, "onnx")
    with RemotePolicy(server.url) as bad, RemotePolicy(server.url) as good:
        for p in (bad, good, ref):
            p.reset(seed=0)
        spec = bad.spec
        obs, chunk = _obs(spec), np.full((spec.chunk_len, spec.action_dim), 0.25, np.float32)
        with pytest.raises(InputError, match="first act"):  # the first block's action part is BOA
            bad.act(obs, executed=chunk)
        assert bad.steps_left == spec.max_blocks  # nothing was consumed
        bad.act(obs)
        wrong = [
            (chunk[:-1], "executed: expected shape"),
            (chunk.astype(np.float64), "executed: expected dtype float32"),
            (np.full_like(chunk, np.inf), "executed: contains NaN"),
            (chunk.tolist(), "executed: expected a numpy array, found list"),  # refused by the client
            (chunk.astype(object), "executed: dtype object cannot be sent"),  # refused by the client
        ]
        for i, (executed, message) in enumerate(wrong):
            with pytest.raises(InputError, match=message):
                bad.act(_obs(spec, 1), executed=executed)
            assert bad.steps_left == spec.max_blocks - 1
            np.testing.assert_array_equal(good.act(_obs(spec, 30 + i)), ref.act(_obs(spec, 30 + i)))
        fresh = runtime.load(bundle, "onnx")
        fresh.reset(seed=0)
        fresh.act(obs)
        want = fresh.act(_obs(spec, 1), executed=chunk)
        np.testing.assert_array_equal(bad.act(_obs(spec, 1), executed=chunk), want)  # the errors cost nothing


def test_malformed_requests_get_protocol_errors_and_the_server_keeps_running(server):
    arr = protocol.encode_array(np.zeros(3, np.float32), "x")
    cases = [
        (b"\xc1not msgpack", "not valid msgpack"),
        (b"\x93\x01\x02\x03", "must be a msgpack map"),
        (msgpack.packb({"op": "act", "observation": {"rgb": msgpack.ExtType(1, b"x")}}), "extension type"),
        (protocol.pack({"op": "steal"}), "unknown op"),
        (protocol.pack({"op": "reset", "seed": "0"}), "field 'seed'"),
        (protocol.pack({"op": "reset", "seed": True}), "field 'seed'"),
        (protocol.pack({"op": "reset", "seed": -1}), "field 'seed'"),
        (protocol.pack({"op": "reset", "extra": 1}), "unknown field"),
        (protocol.pack({"op": "act", "observation": {"rgb": {**arr, "dtype": "object"}}}), "not allowed"),
        (protocol.pack({"op": "act", "observation": {"rgb": {**arr, "shape": [4]}}}), "needs 16 bytes, found 12"),
        (protocol.pack({"op": "act", "observation": {"rgb": {**arr, "shape": [1 << 40]}}}), "exceed the limit"),
        (protocol.pack({"op": "act", "observation": {"rgb": {**arr, "shape": [-3]}}}), "non-negative"),
        (protocol.pack({"op": "act", "observation": {"depth": arr}}), "unknown field"),
        (protocol.pack({"op": "act", "observation": {}, "executed": {**arr, "dtype": "object"}}), "executed: dtype"),
        (protocol.pack({"op": "act", "observation": {}, "executed": [0.0] * 3}), "executed: expected an array map"),
        (b"\x80\x04\x95" + b"pickle-like", "not valid msgpack"),
    ]
    for frame, message in cases:
        reply = _raw(server.url, frame)
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", (frame, reply)
        assert message in reply["error"]["message"], (message, reply)
    with connect(server.url, compression=None, proxy=None) as ws:  # a text frame
        ws.recv(timeout=30)
        ws.send("{}")
        assert protocol.unpack(ws.recv(timeout=30))["error"]["message"].startswith("expected a binary")
    with RemotePolicy(server.url) as p:  # still serving
        p.reset()
        assert p.act(_obs(p.spec)).shape == (p.spec.chunk_len, p.spec.action_dim)


def test_act_before_reset_and_oversized_requests(server):
    with RemotePolicy(server.url) as p:
        with pytest.raises(RemoteError, match="call reset"):
            p.act(_obs(p.spec))
        assert isinstance(RemoteError("x"), RuntimeError)  # as the in-process policy's RuntimeError
        p.reset()
        huge = {"rgb": np.zeros((64, 64, 64, 3), np.uint8), "state": np.zeros(p.spec.state_dim, np.float32)}
        with pytest.raises(InputError, match="exceeds the server's limit"):
            p.act(huge)
        p.act(_obs(p.spec))
        p._lock.acquire()  # as if another thread were waiting for a reply
        try:
            with pytest.raises(RuntimeError, match="not re-entrant"):
                p.act(_obs(p.spec))
        finally:
            p._lock.release()


def test_health_endpoint(server, bundle):
    with RemotePolicy(server.url):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # no proxy from the environment
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "application/json"
        body = json.loads(r.read())
        conn.close()
    assert body["status"] == "ok" and body["clients"] >= 1 and body["backend"] == "onnx"
    assert body["bundle_hash"] == sha256_file(bundle / "manifest.json")


def test_clients_beyond_the_limit_are_refused(bundle):
    with ServerThread(PolicyServer(bundle, max_clients=1, pool_size=0)) as st, RemotePolicy(st.url) as first:
        with pytest.raises(ServerUnavailable, match="1013.*server full"):
            RemotePolicy(st.url)
        first.reset()
        first.act(_obs(first.spec))


def test_client_imports_neither_torch_nor_onnxruntime(server):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from par_deploy.client import RemotePolicy
        with RemotePolicy({server.url!r}) as p:
            p.reset(seed=0)
            s = p.spec
            chunk = p.act({{"rgb": np.zeros((s.num_cameras, s.image_size, s.image_size, 3), np.uint8),
                           "state": np.zeros(s.state_dim, np.float32)}})
            assert chunk.shape == (s.chunk_len, s.action_dim)
        banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "onnx")
                  or m.startswith(("par_deploy.model", "par_deploy.export", "par_deploy.serve.server"))]
        print("banned:", banned)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "banned: []", out.stdout


def test_sigterm_closes_clients_and_exits_cleanly(bundle):
    with ServerProcess(bundle) as server, RemotePolicy(server.url) as p:
        p.reset()
        p.act(_obs(p.spec))
        assert server.stop() == 0  # SIGTERM, then wait
        with pytest.raises(ServerUnavailable, match="1001"):  # going away
            p.act(_obs(p.spec))
        assert "stopped" in server.proc.stdout.read()


def test_serve_refuses_a_bad_bundle_with_a_message(tmp_path):
    with pytest.raises(RuntimeError, match="did not start.*error: .*not a bundle directory"):
        ServerProcess(tmp_path / "missing")


def test_array_wire_format_round_trip_and_limits():
    for dtype in ("uint8", "float32", "float64", "int64", "bool"):
        x = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
        y = protocol.decode_array(
            protocol.unpack(protocol.pack({"a": protocol.encode_array(x, "x")}))["a"], "x", 1 << 10
        )
        assert y.dtype == x.dtype and y.flags.writeable and np.array_equal(x, y)
    big_endian = np.arange(3, dtype=">f4")
    assert np.array_equal(protocol.decode_array(protocol.encode_array(big_endian, "x"), "x", 64), big_endian)
    with pytest.raises(InputError, match="cannot be sent"):
        protocol.encode_array(np.array([object()]), "x")
    with pytest.raises(ProtocolError, match="exceed the limit of 8"):
        protocol.decode_array(protocol.encode_array(np.zeros(4, np.float32), "x"), "x", 8)
    with pytest.raises(ProtocolError, match="at most 8"):
        protocol.decode_array({"dtype": "uint8", "shape": [1] * 9, "data": b"\0"}, "x", 8)
    with pytest.raises(ProtocolError, match="keys dtype, shape, data"):
        protocol.decode_array({"dtype": "uint8", "shape": [1], "data": b"\0", "code": "x"}, "x", 8)
