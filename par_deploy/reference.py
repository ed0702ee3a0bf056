"""The PyTorch reference policy: the eager model with its KV-cache, the baseline every engine is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from par_deploy.checkpoint import from_pretrained
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.runtime.policy import Policy, PolicySpec


class TorchPolicy(Policy):
    """Eager PyTorch with a static KV-cache. ``sampler``/``steps`` default to the checkpoint's own."""

    def __init__(
        self,
        model: PARModel,
        normalizer: Normalizer,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ):
        super().__init__(PolicySpec.from_config(model.cfg), normalizer, seed)
        self.model = model.eval()
        self.schedule = model.sampler(sampler, steps)
        self.use_cache = use_cache  # False: recompute the whole history each step (the naive baseline)
        self.cache = model.new_cache(1)
        self._text: torch.Tensor | None = None
        self._blocks: list[torch.Tensor] = []
        if model.frame_head is None:  # a deployment checkpoint: no frame prediction to offer
            self.predict_frame = None

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
    def step_block(self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, step: int) -> None:
        """Append block ``step`` (normalised inputs) and keep its Action-DiT condition for ``sample``.

        Without the cache, the history is recomputed from scratch; calling again at an earlier ``step`` drops
        the blocks from there on (so a benchmark can repeat one step at a fixed history length).
        """
        m = self.model
        x = m.embed_block(
            torch.from_numpy(rgb)[None],
            torch.from_numpy(state)[None],
            torch.from_numpy(prev_chunk)[None],
            torch.tensor([first]),
        )  # [1, Bl, D]
        if self.use_cache:
            h = m.step(x, step, self.cache)
        else:
            del self._blocks[step:]
            self._blocks.append(x)
            h = m.hidden(self._text, torch.cat(self._blocks, 1))[:, -m.cfg.block_len :]
        self._hidden = h
        self._cond = m.action_condition(h, self._text)

    @torch.no_grad()
    def sample(self, noise: np.ndarray) -> np.ndarray:
        """Sample a normalised chunk ``[L, A]`` from the last block's condition; noise ``[K+1, L, A]``."""
        actions = self.model.sample_actions(self._cond, self.schedule, torch.from_numpy(noise)[:, None])
        return actions[0].numpy()

    @property
    def last_hidden(self) -> torch.Tensor:
        """Hidden states ``[1, Bl, D]`` of the last appended block."""
        return self._hidden

    @property
    def last_action_cond(self) -> np.ndarray:
        return self._cond[0].numpy().copy()

    @property
    def last_frame_hidden(self) -> np.ndarray:
        return self.model.split_block(self._hidden)[0][0].numpy().copy()

    @torch.no_grad()
    def predict_frame(self, steps: int = 4) -> np.ndarray:
        """The frame de-tokenizer's prediction of the next frame from the last block, uint8 ``[V, H, W, 3]``
        (noise from the policy's RNG; used by ``par-deploy eval --video``)."""
        c = self.model.cfg
        noise = torch.from_numpy(self._rng.standard_normal((steps + 1, 1, c.frame_tokens, c.frame_token_dim)))
        h_frames = self.model.split_block(self._hidden)[0]
        return self.model.predict_frame(h_frames, self.model.sampler("ddim", steps), noise.float())[0].numpy()

    def block_hidden(
        self, rgb: np.ndarray, state: np.ndarray, prev_chunk: np.ndarray, first: bool, pos: int
    ) -> torch.Tensor:
        """``step_block`` returning the block's hidden states ``[1, Bl, D]``."""
        self.step_block(rgb, state, prev_chunk, first, pos)
        return self._hidden
