"""The PyTorch reference policy: the eager model with its KV-cache, the baseline every engine is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from par_deploy.checkpoint import from_pretrained
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.runtime.policy import Policy, PolicySpec


def spec_of(model: PARModel) -> PolicySpec:
    c = model.cfg
    return PolicySpec(c.num_cameras, c.image_size, c.state_dim, c.action_dim, c.chunk_len, c.max_blocks,
                      tuple(c.instructions))


class TorchPolicy(Policy):
    """Eager PyTorch with a static KV-cache. ``sampler``/``steps`` default to the checkpoint's own."""

    def __init__(self, model: PARModel, normalizer: Normalizer, sampler: str | None = None,
                 steps: int | None = None, seed: int = 0, use_cache: bool = True):
        super().__init__(spec_of(model), normalizer, seed)
        self.model = model.eval()
        self.schedule = model.sampler(sampler, steps)
        self.use_cache = use_cache  # False: recompute the whole history each step (the naive baseline)
        self.cache = model.new_cache(1)
        self._text: torch.Tensor | None = None
        self._blocks: list[torch.Tensor] = []

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> TorchPolicy:
        model, normalizer = from_pretrained(path)
        return cls(model, normalizer, **kw)

    @property
    def denoise_steps(self) -> int:
        return self.schedule.steps

    @torch.no_grad()
    def _reset(self, instruction: str) -> None:
        for buf in self.cache:
            buf.zero_()
        self._blocks = []
        self._text = self.model.text([instruction])  # [1, K_t, D]
        if self.use_cache:
            self.model.prefill(self._text, self.cache)

    @torch.no_grad()
    def block_hidden(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool,
                     step: int) -> torch.Tensor:
        """Append one block and return its hidden states ``[1, Bl, D]``."""
        m = self.model
        x = m.embed_block(
            torch.from_numpy(rgb)[None], torch.from_numpy(state)[None], torch.from_numpy(prev_chunk)[None],
            torch.tensor([first]),
        )  # [1, Bl, D]
        if self.use_cache:
            return m.step(x, step, self.cache)
        self._blocks.append(x)
        h = m.hidden(self._text, torch.cat(self._blocks, 1))
        return h[:, -m.cfg.block_len :]

    @torch.no_grad()
    def _act(self, rgb, state, prev_chunk, first, step, noise):
        h = self.block_hidden(rgb, state, prev_chunk, first, step)
        cond = self.model.action_condition(h, self._text)
        actions = self.model.sample_actions(cond, self.schedule, torch.from_numpy(noise)[:, None])  # [1, L, A]
        return actions[0].numpy()
