"""TorchScript backend: the bundle's traced ``.pt`` graphs run by the PyTorch JIT (imports torch).

Not part of the torch-free runtime; it exists for hosts that already run libtorch/PyTorch. Same structure
as the ONNX Runtime backend: preallocated tensors, a static cache the host writes each new block's keys and
values into.
"""

from __future__ import annotations

import numpy as np

from par_deploy.runtime.bundle import (
    BackendUnavailable,
    Bundle,
    BundleError,
    TensorSpec,
    layer_cache_names,
)
from par_deploy.runtime.bundle_policy import BundlePolicy


class TorchScriptPolicy(BundlePolicy):
    """Runs a bundle's TorchScript graphs on CPU.

    ``threads``: if given, ``torch.set_num_threads(threads)`` (a process-wide PyTorch setting); None leaves
    PyTorch's setting unchanged.
    """

    backend = "torchscript"

    def __init__(self, bundle: Bundle, threads: int | None = None, seed: int = 0):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"the torchscript backend needs PyTorch: pip install torch ({e})") from None
        if bundle.precision != "fp32":
            raise BackendUnavailable(f"{bundle.path}: the torchscript backend runs fp32 bundles only")
        super().__init__(bundle, seed)
        self._torch = torch
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.modules = {}
        for name in bundle.graphs:
            path = bundle.engine_path("torchscript", name)
            try:
                self.modules[name] = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as e:  # torch.jit.load raises RuntimeError/ValueError variants for foreign files
                raise BundleError(f"{path}: not a loadable TorchScript module ({e})") from None
        self.buffers = {}
        for kind in "kv":  # the host cache; the step's per-layer inputs are views of it
            cache = self.buffers[f"cache_{kind}"] = torch.zeros(bundle.config.cache_shape())
            for i, name in enumerate(layer_cache_names(kind, bundle.config.depth)):
                self.buffers[name] = cache[i]
        for spec in bundle.graphs.values():
            for t in spec.inputs + spec.outputs:
                if t.name not in self.buffers:
                    self.buffers[t.name] = torch.zeros(t.shape, dtype=getattr(torch, t.dtype))
        self._check_outputs()

    def _inputs(self, graph: str) -> list:
        return [self.buffers[t.name] for t in self.bundle.graphs[graph].inputs]

    def _call(self, graph: str):
        out = self.modules[graph](*self._inputs(graph))
        return out if isinstance(out, tuple | list) else (out,)

    def _check_outputs(self) -> None:
        """One run of every graph on zero inputs: the module's outputs must have the manifest's shapes."""
        torch = self._torch
        with torch.inference_mode():
            for name, spec in self.bundle.graphs.items():
                path = self.bundle.engine_path("torchscript", name)
                try:
                    out = self._call(name)
                except Exception as e:  # a module traced for other shapes fails inside the JIT
                    raise BundleError(
                        f"{path}: the module does not run on the manifest's input shapes "
                        f"({type(e).__name__}: {str(e).splitlines()[0]}); the file belongs to another model"
                    ) from None
                got = [
                    TensorSpec(t.name, str(o.dtype).removeprefix("torch."), tuple(o.shape))
                    for t, o in zip(spec.outputs, out, strict=False)
                ]
                if len(out) != len(spec.outputs) or got != list(spec.outputs):
                    raise BundleError(
                        f"{path}: outputs {[(g.dtype, g.shape) for g in got]} differ from the manifest's "
                        f"{[(t.dtype, t.shape) for t in spec.outputs]}; the file belongs to another model"
                    )

    def _reset(self, instruction: str) -> None:
        torch = self._torch
        k, v = self.prefix(instruction)
        Kt = self.text_slots
        for name, pre in (("cache_k", k), ("cache_v", v)):
            cache = self.buffers[name]
            cache.zero_()
            cache[:, :, :, :Kt] = torch.from_numpy(pre)

    def step_block(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, step: int) -> None:
        """Append block ``step`` to the cache; sets the ``action_cond`` / ``frame_hidden`` buffers."""
        torch = self._torch
        b = self.buffers
        with torch.inference_mode():
            rgb, state, prev_chunk = (torch.from_numpy(a) for a in (rgb, state, prev_chunk))
            self.stage_block(b, rgb, state, prev_chunk, first, step)
            cond, frame_hidden, new_k, new_v = self._call("step")
            b["action_cond"], b["frame_hidden"] = cond, frame_hidden
            s = self.slot(step)  # Policy.act guarantees step < max_blocks, so the block fits
            b["cache_k"][:, :, :, s : s + self.block_len] = new_k
            b["cache_v"][:, :, :, s : s + self.block_len] = new_v

    def sample(self, noise: np.ndarray) -> np.ndarray:
        """Sample a normalised chunk ``[L, A]`` from the current ``action_cond``; noise ``[K+1, L, A]``."""
        torch = self._torch
        b = self.buffers
        with torch.inference_mode():
            if self.sampler_graph == "unrolled":
                b["noise"][:, 0] = torch.from_numpy(noise)
                (actions,) = self._call("sampler")
                return actions[0].numpy().copy()
            b["cond_k"], b["cond_v"] = self._call("condition")
            b["x"] = torch.from_numpy(noise[0])[None].clone()
            for k in range(self.denoise_steps):
                b["k"][0] = k
                b["z"][0] = torch.from_numpy(noise[k + 1])
                (b["x"],) = self._call("denoise")
            return b["x"][0].numpy().copy()

    @property
    def last_action_cond(self) -> np.ndarray:
        return self.buffers["action_cond"][0].numpy().copy()

    @property
    def last_frame_hidden(self) -> np.ndarray:
        return self.buffers["frame_hidden"][0].numpy().copy()
