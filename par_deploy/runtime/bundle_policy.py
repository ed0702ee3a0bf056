"""What every bundle-backed policy shares: the verified bundle, the text prefix, the cache slots (``PARConfig``'s)."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from par_deploy.runtime.bundle import Bundle
from par_deploy.runtime.policy import Policy


class BundlePolicy(Policy):
    """A ``Policy`` running the graphs of a verified bundle.

    The static KV-cache ``[layers, 1, H, S, hd]`` is allocated once; ``reset`` zeroes it and copies the
    instruction's precomputed text prefix into slots ``0 .. K_t-1``; block ``n`` goes to slots from
    ``PARConfig.block_slot(n)`` = ``K_t + n*Bl`` (the bundle's config, checked against the manifest's cache sizes).
    Episodes longer than ``max_blocks`` raise ``CacheFullError`` (the manifest's overflow policy ``"error"``,
    enforced by ``Policy.act``).
    """

    backend: str = ""

    def __init__(self, bundle: Bundle, seed: int = 0):
        super().__init__(bundle.spec, bundle.normalizer, seed)
        self.bundle = bundle
        self.text_slots, self.block_len = bundle.config.num_text_tokens, bundle.config.block_len
        self._prefix_k, self._prefix_v = bundle.text_prefix()
        self._instructions = list(bundle.config.instructions)

    @property
    def denoise_steps(self) -> int:
        return self.bundle.steps

    @property
    def sampler_graph(self) -> str:
        return self.bundle.sampler_graph

    def slot(self, step: int) -> int:
        """First cache slot of block ``step`` (``PARConfig.block_slot``)."""
        return self.bundle.config.block_slot(step)

    @staticmethod
    def stage_block(buffers: dict[str, np.ndarray], rgb, state, prev_chunk, first: bool, step: int) -> list[str]:
        """Write one block's step-graph inputs into host ``buffers`` (batch row 0); returns the names written
        (``state`` only when the graph has that input)."""
        names = ["rgb", "prev_actions", "first", "pos"] + (["state"] if "state" in buffers else [])
        for name, value in zip(names, (rgb, prev_chunk, first, step, state), strict=False):
            buffers[name][0] = value
        return names

    def prefix(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """Text-prefix keys/values ``[layers, 1, H, K_t, hd]`` of one instruction."""
        i = self._instructions.index(instruction)
        return self._prefix_k[i], self._prefix_v[i]

    @property
    @abstractmethod
    def last_action_cond(self) -> np.ndarray:
        """The Action-DiT condition ``[L, D]`` of the last ``act`` call (a copy)."""

    @property
    @abstractmethod
    def last_frame_hidden(self) -> np.ndarray:
        """The frame-part hidden states ``[K_o, D]`` of the last ``act`` call (a copy)."""
