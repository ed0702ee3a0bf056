"""The export units: pure functions of tensors wrapping ``PARModel`` (the varying loops stay in the runner).

Each module's ``forward`` takes exactly the inputs of its ``GraphSpec`` (``par_deploy.runtime.bundle``), in
order, and returns its outputs, in order. Nothing is updated in place (exporters silently drop in-place
input updates: docs/design-notes.md §3), positions are tensors (a Python int taken from a position is baked in
by tracing).
"""

from __future__ import annotations

import torch
from torch import nn

from par_deploy.errors import ConfigError
from par_deploy.kernels.sampler import sampler_update
from par_deploy.model.diffusion import SamplerSchedule, sample
from par_deploy.model.par import PARModel
from par_deploy.runtime.bundle import GraphSpec

CLIP = 1.0  # the samplers' x0 clip (par_deploy.model.diffusion.sample's default)


def check_exportable(model: PARModel) -> None:
    c = model.cfg
    if c.variant != "full":
        raise ConfigError(
            f"export supports variant 'full' only; this checkpoint is the {c.variant!r} ablation "
            "(paper §5.3): evaluate it with the PyTorch reference policy (par_deploy.reference.TorchPolicy)"
        )


class StepGraph(nn.Module):
    """rgb, [state], prev_actions, first, pos, cache_k_0.., cache_v_0.. -> action_cond, frame_hidden, new_k, new_v.

    One cache input per layer: the host binds views of its ``[layers, B, H, S, hd]`` buffer, so the graph has no
    Split of a stacked cache (10% of the step's time when it took one tensor, issue #10)."""

    def __init__(self, model: PARModel):
        super().__init__()
        check_exportable(model)
        self.model = model
        self.has_state = model.cfg.state_dim > 0
        self.layers = model.cfg.depth

    def _step(self, rgb, state, prev_actions, first, pos, cache_k, cache_v):
        m = self.model
        # uint8 -> float first: the uint8 input feeds one Cast (TensorRT takes uint8 as network I/O only)
        x = m.embed_block(rgb.float(), state, prev_actions, first)
        h, new_k, new_v = m.step_delta(x, pos, cache_k, cache_v)
        frame_hidden, _ = m.split_block(h)
        return m.action_condition(h), frame_hidden, new_k, new_v

    def forward(self, *args: torch.Tensor):
        n = len(args) - 2 * self.layers
        block, caches = args[:n], args[n:]
        if not self.has_state:
            block = (block[0], None, *block[1:])
        return self._step(*block, caches[: self.layers], caches[self.layers :])


class SamplerGraph(nn.Module):
    """noise ``[K+1,B,L,A]``, action_cond ``[B,L,D]`` -> actions ``[B,L,A]``: K denoiser calls unrolled."""

    def __init__(self, model: PARModel, schedule: SamplerSchedule):
        super().__init__()
        check_exportable(model)
        self.head, self.schedule = model.action_head, schedule

    def forward(self, noise: torch.Tensor, action_cond: torch.Tensor) -> torch.Tensor:
        ck, cv = self.head.condition(action_cond)
        return sample(lambda x, t: self.head(x, t, ck, cv), self.schedule, noise, CLIP)


class ConditionGraph(nn.Module):
    """action_cond ``[B,L,D]`` -> the Action-DiT's cross-attention keys/values ``[dit_depth,B,H,L,hd]``."""

    def __init__(self, model: PARModel):
        super().__init__()
        check_exportable(model)
        self.head = model.action_head

    def forward(self, action_cond: torch.Tensor):
        return self.head.condition(action_cond)


class DenoiseGraph(nn.Module):
    """x, k (step index int64 ``[1]``), z, cond_k, cond_v -> x_next: one sampler step, schedule baked in."""

    def __init__(self, model: PARModel, schedule: SamplerSchedule):
        super().__init__()
        check_exportable(model)
        self.head = model.action_head
        self.register_buffer("timesteps", schedule.timesteps.clone(), persistent=False)  # [K] int64
        self.register_buffer("coeffs", schedule.coeffs.clone(), persistent=False)  # [K, 5]

    def forward(self, x, k, z, cond_k, cond_v):
        t = self.timesteps.index_select(0, k).expand(x.shape[0])  # [B]
        coeffs = self.coeffs.index_select(0, k)[0]  # [5]
        eps = self.head(x, t, cond_k, cond_v)
        return sampler_update(x, eps, coeffs, z, CLIP)


def build_graphs(model: PARModel, schedule: SamplerSchedule, sampler_graph: str) -> dict[str, nn.Module]:
    """The modules of a bundle, keyed like ``graph_specs``: step + sampler, or step + condition + denoise (any
    batch: the example inputs of ``graph_specs(..., batch)`` fix it at export)."""
    graphs: dict[str, nn.Module] = {"step": StepGraph(model)}
    if sampler_graph == "unrolled":
        graphs["sampler"] = SamplerGraph(model, schedule)
    else:
        graphs["condition"] = ConditionGraph(model)
        graphs["denoise"] = DenoiseGraph(model, schedule)
    return {k: g.eval() for k, g in graphs.items()}


_DTYPES = {"float32": torch.float32, "uint8": torch.uint8, "int64": torch.int64, "bool": torch.bool}


def example_inputs(spec: GraphSpec, seed: int = 0, position: int = 0, step: int = 0) -> tuple[torch.Tensor, ...]:
    """Random example inputs for tracing/exporting a graph: block index ``position`` (< max_blocks) in every
    row, sampler step index ``step`` (< K), BOA flag off."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        dtype = _DTYPES[t.dtype]
        if t.name == "pos":
            out.append(torch.full(t.shape, position, dtype=dtype))
        elif t.name == "k":
            out.append(torch.full(t.shape, step, dtype=dtype))
        elif dtype == torch.uint8:
            out.append(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
        elif dtype == torch.bool:
            out.append(torch.zeros(t.shape, dtype=torch.bool))
        else:
            out.append(torch.randn(t.shape, generator=g, dtype=dtype))
    return tuple(out)
