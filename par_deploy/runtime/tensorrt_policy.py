"""TensorRT backend: serialized engines (``tensorrt/*.plan``, built from the bundle's ONNX by
``par_deploy.export.tensorrt.build_engines``) run with the TensorRT >= 10 named-tensor API; device memory and
copies use the CUDA runtime from ``cuda-python`` (no torch).

All device buffers are allocated once. The cache stays on the device: each step the engine's
``new_k``/``new_v`` are copied device-to-device into the block's slots with one ``cudaMemcpy2DAsync`` per
cache (rows = layers x heads). The K+1 noise draws are uploaded once per chunk; in the loop form the denoise
engine's ``z``/``k`` inputs point into them and ``x``/``x_next`` ping-pong between two buffers, so the loop
issues no copies.
"""

from __future__ import annotations

import numpy as np

from par_deploy.runtime.bundle import BackendUnavailable, Bundle, BundleError, TensorSpec, check_io
from par_deploy.runtime.bundle_policy import BundlePolicy

_HOST_IO = ("rgb", "state", "prev_actions", "first", "pos", "action_cond", "frame_hidden", "actions")


def import_tensorrt():
    """``(tensorrt, cudart)``, or ``BackendUnavailable`` saying what is missing (package, version, GPU)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(
            "the tensorrt backend needs NVIDIA TensorRT >= 10 and a CUDA GPU: on an NVIDIA machine, "
            f"pip install 'par-deploy[tensorrt]' cuda-python (import tensorrt failed: {e})"
        ) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(
            f"the tensorrt backend needs TensorRT >= 10 (named-tensor API), found {trt.__version__}"
        )
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendUnavailable(f"the tensorrt backend needs cuda-python: pip install cuda-python ({e})") from None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise BackendUnavailable(
            f"the tensorrt backend needs a CUDA device; cudaGetDeviceCount: {err}, {count} devices"
        )
    return trt, cudart


class _Cuda:
    """Checked wrappers of the few CUDA runtime calls used here (cuda-python returns ``(err, *values)``)."""

    def __init__(self, cudart):
        self.rt = cudart

    def __call__(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {what} failed: {err}")
        return values[0] if len(values) == 1 else None


class TensorRTPolicy(BundlePolicy):
    """Runs a bundle's TensorRT engines on CUDA device ``device``."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, seed: int = 0, device: int = 0):
        trt, cudart = import_tensorrt()
        super().__init__(bundle, seed)
        self._trt, self._rt = trt, cudart
        cuda = self._cuda = _Cuda(cudart)
        self._ptrs: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}
        cuda(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = {}, {}
        for name, spec in bundle.graphs.items():
            path = bundle.engine_path("tensorrt", name)
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(
                    f"{path}: TensorRT {trt.__version__} cannot deserialize this engine (built by another "
                    "TensorRT version or for another GPU); rebuild it here with "
                    "python -m par_deploy.export.tensorrt BUNDLE"
                )
            ins, outs = [], []
            for i in range(engine.num_io_tensors):
                n = engine.get_tensor_name(i)
                t = TensorSpec(
                    n,
                    np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name,
                    tuple(int(d) for d in engine.get_tensor_shape(n)),
                )
                (ins if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else outs).append(t)
            check_io(path, spec, ins, outs)
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()

        # host staging buffers for what crosses the PCIe bus; device buffers for every tensor
        self.host = {}
        for spec in bundle.graphs.values():
            for t in spec.inputs + spec.outputs:
                key = t.name
                if key in self._ptrs or key in ("x", "x_next", "z", "k", "noise"):  # set per call, see sample
                    continue
                buf = np.zeros(t.shape, np.dtype(t.dtype))
                if key in _HOST_IO:
                    self.host[key] = buf
                self._alloc(key, buf.nbytes)
        L, A, K = self.spec.chunk_len, self.spec.action_dim, self.denoise_steps
        self._noise_host = np.zeros((K + 1, L, A), np.float32)
        self._alloc("noise", self._noise_host.nbytes)
        if bundle.sampler_graph == "loop":
            self._alloc("x_a", L * A * 4)
            self._alloc("x_b", L * A * 4)
            self._alloc("k_all", K * 8)
            ks = np.arange(K, dtype=np.int64)
            self._copy(self._ptrs["k_all"], ks.ctypes.data, ks.nbytes, "HostToDevice")
        for name, spec in bundle.graphs.items():
            ctx = self.contexts[name]
            for t in spec.inputs + spec.outputs:
                if t.name in self._ptrs:
                    ctx.set_tensor_address(t.name, self._ptrs[t.name])
        c = bundle.manifest["cache"]
        self._row_slots, self._head_dim, self._rows = (
            int(c["max_slots"]),
            int(c["head_dim"]),
            c["layers"] * c["heads"],
        )
        self._sync()

    # -- CUDA helpers ------------------------------------------------------------------------------
    def _alloc(self, key: str, nbytes: int) -> None:
        self._ptrs[key] = int(self._cuda(self._rt.cudaMalloc(nbytes), f"cudaMalloc({key})"))
        self._nbytes[key] = nbytes

    def _kind(self, kind: str):
        return getattr(self._rt.cudaMemcpyKind, f"cudaMemcpy{kind}")

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        self._cuda(self._rt.cudaMemcpyAsync(dst, src, nbytes, self._kind(kind), self._stream), "cudaMemcpyAsync")

    def _upload(self, key: str) -> None:
        h = self.host[key]
        self._copy(self._ptrs[key], h.ctypes.data, h.nbytes, "HostToDevice")

    def _download(self, key: str) -> np.ndarray:
        h = self.host[key]
        self._copy(h.ctypes.data, self._ptrs[key], h.nbytes, "DeviceToHost")
        self._sync()
        return h

    def _sync(self) -> None:
        self._cuda(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _slots_copy(self, cache: str, src: int, slot: int, slots: int, kind: str) -> None:
        """Copy ``[layers*H, slots, hd]`` rows into cache slots ``slot .. slot+slots-1`` (a 2-D copy)."""
        item = self._head_dim * 4
        self._cuda(
            self._rt.cudaMemcpy2DAsync(
                self._ptrs[cache] + slot * item,
                self._row_slots * item,
                src,
                slots * item,
                slots * item,
                self._rows,
                self._kind(kind),
                self._stream,
            ),
            "cudaMemcpy2DAsync",
        )

    def _execute(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(int(self._stream)):
            raise RuntimeError(f"TensorRT execution of graph {graph!r} failed (see the TensorRT log above)")

    # -- Policy hooks ------------------------------------------------------------------------------
    def _reset(self, instruction: str) -> None:
        k, v = self.prefix(instruction)
        for cache, pre in (("cache_k", np.ascontiguousarray(k)), ("cache_v", np.ascontiguousarray(v))):
            self._cuda(
                self._rt.cudaMemsetAsync(self._ptrs[cache], 0, self._nbytes[cache], self._stream),
                "cudaMemset",
            )
            self._slots_copy(cache, pre.ctypes.data, 0, self.text_slots, "HostToDevice")
        self._sync()  # the prefix arrays are pageable host memory: finish before they can change

    def step_block(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, step: int) -> None:
        """Append block ``step`` to the device cache (asynchronously, on the policy's stream)."""
        for key in self.stage_block(self.host, rgb, state, prev_chunk, first, step):
            self._upload(key)
        self._execute("step")
        s = self.slot(step)
        self._slots_copy("cache_k", self._ptrs["new_k"], s, self.block_len, "DeviceToDevice")
        self._slots_copy("cache_v", self._ptrs["new_v"], s, self.block_len, "DeviceToDevice")

    def sample(self, noise: np.ndarray) -> np.ndarray:
        """Sample a normalised chunk ``[L, A]`` from the current ``action_cond``; noise ``[K+1, L, A]``."""
        self._noise_host[:] = noise
        self._copy(self._ptrs["noise"], self._noise_host.ctypes.data, self._noise_host.nbytes, "HostToDevice")
        if self.sampler_graph == "unrolled":
            self._execute("sampler")
            return self._download("actions")[0].copy()
        self._execute("condition")
        ctx, row = self.contexts["denoise"], self._noise_host[0].nbytes
        x, out = self._ptrs["noise"], self._ptrs["x_a"]
        for k in range(self.denoise_steps):
            ctx.set_tensor_address("x", x)
            ctx.set_tensor_address("x_next", out)
            ctx.set_tensor_address("z", self._ptrs["noise"] + (k + 1) * row)
            ctx.set_tensor_address("k", self._ptrs["k_all"] + k * 8)
            self._execute("denoise")
            x, out = out, (self._ptrs["x_b"] if out == self._ptrs["x_a"] else self._ptrs["x_a"])
        result = np.empty((self.spec.chunk_len, self.spec.action_dim), np.float32)
        self._copy(result.ctypes.data, x, result.nbytes, "DeviceToHost")
        self._sync()
        return result

    @property
    def last_action_cond(self) -> np.ndarray:
        return self._download("action_cond")[0].copy()

    @property
    def last_frame_hidden(self) -> np.ndarray:
        return self._download("frame_hidden")[0].copy()

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the policy is garbage-collected)."""
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        for ptr in getattr(self, "_ptrs", {}).values():
            rt.cudaFree(ptr)
        self._ptrs = {}
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        self.close()
