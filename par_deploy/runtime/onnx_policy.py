"""ONNX Runtime backend (numpy + onnxruntime only: no torch).

Every graph input and output is a preallocated numpy buffer wrapped once in an ``OrtValue`` (which shares
the numpy memory on CPU) and bound with ``IOBinding``: nothing is allocated per step and the cache is never
copied whole:

- the step graph reads the cache in place: its per-layer inputs ``cache_k_i`` are bound to views of one
  ``[layers, B, H, S, hd]`` buffer; it writes only the new block's keys/values, which the host copies into
  each row's slots (docs/design-notes.md §3: the fastest CPU
  path measured);
- the step graph's ``action_cond`` output buffer is bound directly as the sampler's ``action_cond`` input;
- in the loop form, ``condition`` writes ``cond_k``/``cond_v`` buffers that ``denoise`` reads, and ``x`` /
  ``x_next`` ping-pong between two buffers (two bindings).
"""

from __future__ import annotations

import numpy as np

from par_deploy.runtime.batch_policy import BatchPolicy
from par_deploy.runtime.bundle import (
    BackendUnavailable,
    Bundle,
    BundleError,
    TensorSpec,
    check_io,
    layer_cache_names,
)
from par_deploy.runtime.bundle_policy import BundlePolicy

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(int32)": "int32",
}
ONNX_PRECISIONS = ("fp32", "int8")  # int8: dynamically quantized MatMul weights, fp32 graph inputs/outputs


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        msg = f"the onnx backend needs onnxruntime: pip install onnxruntime ({e})"
        raise BackendUnavailable(msg) from None
    return onnxruntime


# ONNX Runtime graph optimizers left off: MatMulAddFusion turns each 3-D MatMul + Add into Reshape + Gemm +
# Reshape; in the few-step sampler ([1, L=8, D] activations) those extra nodes cost more than the fused bias
# add saves (measured here, 300 interleaved runs: sampler graph -12% p50 and -14% p10 without it; the transformer
# step unchanged).
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def create_session(path, so, providers: list[str] | None = None):
    """An ``InferenceSession`` as the runtime creates it (``DISABLED_OPTIMIZERS`` off)."""
    ort = _import_ort()
    return ort.InferenceSession(
        str(path), so, providers=providers or ["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


def session_options(threads: int | None):
    """One intra-op thread by default: on a shared machine more threads can be much slower (docs/design-notes.md §5)."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if threads is None else int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def _signature(args) -> list[TensorSpec]:
    out = []
    for a in args:
        shape = tuple(d if isinstance(d, int) else -1 for d in a.shape)
        out.append(TensorSpec(a.name, _ORT_TYPES.get(a.type, a.type), shape))
    return out


class OrtGraphs:
    """A bundle's ONNX graphs in ONNX Runtime: sessions, preallocated buffers (one per tensor name, shared
    across graphs), IOBindings, and the host side of the static cache, for any batch ``B``."""

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None):
        if bundle.precision not in ONNX_PRECISIONS:
            raise BackendUnavailable(
                f"{bundle.path}: bundle precision is {bundle.precision}; the ONNX Runtime CPU backend runs "
                f"{' and '.join(ONNX_PRECISIONS)} bundles (re-export with one of them, or use the tensorrt "
                "backend for fp16)"
            )
        self.bundle = bundle
        self._ort = _import_ort()
        so = session_options(threads)
        self.sessions = {}
        for name, spec in bundle.graphs.items():
            path = bundle.engine_path("onnx", name)
            try:
                sess = create_session(path, so, providers)
            except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
                raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({e})") from None
            check_io(path, spec, _signature(sess.get_inputs()), _signature(sess.get_outputs()))
            self.sessions[name] = sess
        self.buffers: dict[str, np.ndarray] = {}
        self._values: dict[str, object] = {}
        cfg = bundle.config
        for kind in "kv":  # the host cache; the step's per-layer inputs are views of it (same memory)
            cache = self._add_buffer(f"cache_{kind}", np.zeros(cfg.cache_shape(bundle.batch), np.float32))
            for i, name in enumerate(layer_cache_names(kind, cfg.depth)):
                self._add_buffer(name, cache[i])
        for spec in bundle.graphs.values():
            for t in spec.inputs + spec.outputs:
                if t.name not in self.buffers and t.name != "x_next":  # x_next: bound to x / x_alt below
                    self._add_buffer(t.name, np.zeros(t.shape, dtype=np.dtype(t.dtype)))
        if bundle.sampler_graph == "loop":
            self._add_buffer("x_alt", np.zeros(bundle.graphs["denoise"].tensor("x").shape, np.float32))
        self._bindings = {name: self._bind(name, {}) for name in bundle.graphs if name != "denoise"}
        if bundle.sampler_graph == "loop":  # ping-pong: x -> x_alt, then x_alt -> x
            self._bindings["denoise_even"] = self._bind("denoise", {"x": "x", "x_next": "x_alt"})
            self._bindings["denoise_odd"] = self._bind("denoise", {"x": "x_alt", "x_next": "x"})
        self.cache_k, self.cache_v = self.buffers["cache_k"], self.buffers["cache_v"]
        self.block_len = int(bundle.manifest["cache"]["block_len"])

    def _add_buffer(self, key: str, buf: np.ndarray) -> np.ndarray:
        self.buffers[key] = buf
        self._values[key] = self._ort.OrtValue.ortvalue_from_numpy(buf)  # shares buf's memory (contiguous)
        return buf

    def _bind(self, graph: str, rename: dict[str, str]):
        sess = self.sessions[graph]
        spec = self.bundle.graphs[graph]
        io = sess.io_binding()
        for t in spec.inputs:
            io.bind_ortvalue_input(t.name, self._values[rename.get(t.name, t.name)])
        for t in spec.outputs:
            io.bind_ortvalue_output(t.name, self._values[rename.get(t.name, t.name)])
        return sess, io

    def run(self, binding: str) -> None:
        sess, io = self._bindings[binding]
        sess.run_with_iobinding(io)

    def reset_row(self, row: int, instruction: str) -> None:
        """Zero row ``row`` of the cache and write the instruction's text prefix into its first slots."""
        k, v = self.bundle.prefix(instruction)  # [layers, 1, H, K_t, hd]
        for cache, pre in ((self.cache_k, k), (self.cache_v, v)):
            cache[:, row] = 0.0
            cache[:, row, :, : pre.shape[3]] = pre[:, 0]

    def step(self, rows) -> None:
        """Run the step graph on the staged inputs; commit the new keys/values of ``rows`` (each at its own
        ``pos``, which the caller keeps < max_blocks); other rows' caches are left as they were."""
        self.run("step")
        new_k, new_v, pos = self.buffers["new_k"], self.buffers["new_v"], self.buffers["pos"]
        for r in rows:
            s = self.bundle.config.block_slot(int(pos[r]))
            self.cache_k[:, r, :, s : s + self.block_len] = new_k[:, r]
            self.cache_v[:, r, :, s : s + self.block_len] = new_v[:, r]

    def sample(self, noise: np.ndarray) -> np.ndarray:
        """noise ``[K+1, B, L, A]`` -> normalised chunks ``[B, L, A]`` from the staged ``action_cond`` (a copy)."""
        b = self.buffers
        if self.bundle.sampler_graph == "unrolled":
            b["noise"][:] = noise
            self.run("sampler")
            return b["actions"].copy()
        self.run("condition")
        b["x"][:] = noise[0]
        steps = self.bundle.steps
        for k in range(steps):
            b["k"][0] = k
            b["z"][:] = noise[k + 1]
            self.run("denoise_even" if k % 2 == 0 else "denoise_odd")
        return (b["x_alt"] if steps % 2 else b["x"]).copy()


class OnnxPolicy(BundlePolicy):
    """Runs a batch-1 bundle's ONNX graphs with ONNX Runtime (CPU by default).

    Bundle precisions: ``fp32`` and ``int8`` (``par_deploy.export.precision``: the quantized graphs keep fp32
    inputs and outputs, so the buffers and bindings are the same). ``threads``: intra-op threads per session
    (None: 1). ``providers``: ONNX Runtime execution providers
    (default ``["CPUExecutionProvider"]``; buffers live in host memory, so other providers copy per call).
    A bundle exported with ``--batch N > 1`` runs through ``OnnxBatchPolicy`` (``runtime.load_batch``).
    """

    backend = "onnx"

    def __init__(self, bundle: Bundle, threads: int | None = None, seed: int = 0, providers: list[str] | None = None):
        bundle.require_one_episode()
        graphs = OrtGraphs(bundle, threads, providers)
        super().__init__(bundle, seed)
        self.graphs, self.sessions, self.buffers = graphs, graphs.sessions, graphs.buffers

    # -- Policy hooks ------------------------------------------------------------------------------
    def _reset(self, instruction: str) -> None:
        self.graphs.reset_row(0, instruction)

    def step_block(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, step: int) -> None:
        """Append block ``step`` to the cache; fills the ``action_cond`` / ``frame_hidden`` buffers."""
        self.stage_block(self.buffers, rgb, state, prev_chunk, first, step)  # step < max_blocks: Policy.act
        self.graphs.step((0,))

    def sample(self, noise: np.ndarray) -> np.ndarray:
        """Sample a normalised chunk ``[L, A]`` from the current ``action_cond``; noise ``[K+1, L, A]``."""
        return self.graphs.sample(noise[:, None])[0]

    @property
    def last_action_cond(self) -> np.ndarray:
        return self.buffers["action_cond"][0].copy()

    @property
    def last_frame_hidden(self) -> np.ndarray:
        return self.buffers["frame_hidden"][0].copy()


class OnnxBatchPolicy(BatchPolicy):
    """``BatchPolicy`` on a bundle exported with ``--batch N``: N episodes per ONNX Runtime call."""

    backend = "onnx"

    def __init__(self, bundle: Bundle, threads: int | None = None, seed: int = 0, providers: list[str] | None = None):
        super().__init__(bundle, seed)  # refuses a bundle it cannot run before any session is created
        self.graphs = OrtGraphs(bundle, threads, providers)
        self.buffers = self.graphs.buffers

    def _reset_row(self, row: int, instruction: str) -> None:
        self.graphs.reset_row(row, instruction)

    def step_rows(self, rgb, state, prev_chunk, first, pos, rows) -> None:
        BundlePolicy.stage_block(self.buffers, rgb, state, prev_chunk, first, pos, row=slice(None))
        self.graphs.step(rows)

    def sample_rows(self, noise: np.ndarray) -> np.ndarray:
        return self.graphs.sample(noise)

    @property
    def last_action_cond(self) -> np.ndarray:
        return self.buffers["action_cond"].copy()

    @property
    def last_frame_hidden(self) -> np.ndarray:
        return self.buffers["frame_hidden"].copy()
