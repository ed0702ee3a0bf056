"""Demonstration episodes -> teacher-forced physical-token sequences (the batch ``PARModel.losses`` reads).

An episode of T env steps has observations ``rgb/state [T+1]`` and actions ``[T]``. With chunk length L, S env
steps between blocks (``config.stride``: L, or ``exec_len`` when a control step executes only part of its chunk)
and a phase offset ``p`` (0 <= p < S, data augmentation: the policy may start its grid at any step), block n
holds the observation at step ``p + n*S`` and the chunk ``A_n`` = actions ``p + (n-1)*S .. p + (n-1)*S + L - 1``
(n >= 1; block 0's action part is BOA): the target of block n-1, of which the model embeds only the S executed
before block n's observation. Actions past the episode's end are padded with the final action and masked out
of the loss; the last block's target frame is the final observation. A history window of at most ``history``
blocks is cut at a random start (its first block gets BOA only if it is the episode's first block).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from par_deploy.config import PARConfig, TaskInfo
from par_deploy.normalize import Normalizer
from par_deploy.train.demo_format import list_episodes, load_episode, load_meta


@dataclass
class Episode:
    rgb: np.ndarray  # uint8 [T+1, V, H, W, 3]
    state: np.ndarray  # float32 [T+1, S], normalised
    actions: np.ndarray  # float32 [T, A], normalised


class EpisodeDataset:
    def __init__(self, data_dir: str | Path, limit: int | None = None):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        paths = list_episodes(self.data_dir)[:limit]
        if not paths:
            raise FileNotFoundError(f"{self.data_dir}: no episodes (run `par-deploy demos` first)")
        raw = [load_episode(p, self.meta) for p in paths]
        self.normalizer = Normalizer.fit(
            np.concatenate([e["actions"] for e in raw]), np.concatenate([e["state"] for e in raw])
        )
        n = self.normalizer
        self.episodes = [
            Episode(e["rgb"], n.normalize_state(e["state"]), n.normalize_action(e["actions"])) for e in raw
        ]
        self.paths = paths

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def max_steps(self) -> int:
        return max(len(e.actions) for e in self.episodes)

    def model_fields(self) -> dict:
        """The config fields the data decides (embodiment, cameras, instruction)."""
        m = self.meta
        task = TaskInfo.from_extra({k: m[k] for k in TaskInfo.KEYS}, source=str(self.data_dir / "meta.json"))
        return {
            "image_size": m["image_size"],
            "num_cameras": m["num_cameras"],
            "action_dim": m["action_dim"],
            "state_dim": m["state_dim"],
            "instructions": (m["instruction"],),
            "extra": task.to_extra(),
        }


def num_blocks(steps: int, cfg: PARConfig, phase: int) -> int:
    """Control steps (chunks) that cover an episode of ``steps`` actions after the phase offset."""
    return max(1, -(-(steps - phase) // cfg.stride))


def episode_blocks(ep: Episode, cfg: PARConfig, phase: int, start: int, history: int) -> dict[str, np.ndarray]:
    """Blocks ``start .. start + history`` (inclusive: the last one is only a target) of one episode."""
    L, S, T = cfg.chunk_len, cfg.stride, len(ep.actions)
    N = num_blocks(T, cfg, phase)
    start = min(start, N - 1)
    n_idx = np.arange(start, min(N, start + history) + 1)  # blocks used (inputs + final target)
    obs_t = np.minimum(phase + n_idx * S, T)  # env step of each block's observation
    act_t = phase + (n_idx[:, None] - 1) * S + np.arange(L)[None, :]  # [n, L]: chunk A_n's env steps
    valid = (act_t >= phase) & (act_t < T)
    actions = ep.actions[np.clip(act_t, 0, T - 1)]  # [n, L, A]; padded entries masked
    return {
        "rgb": ep.rgb[obs_t],
        "state": ep.state[obs_t],
        "actions": actions.astype(np.float32),
        "action_valid": valid & (n_idx[:, None] > 0),
        "boa": n_idx == 0,
    }


def random_shift(rgb: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every frame of a window by one random offset of up to ``pad`` pixels in each direction (edge pixels
    repeated), DrQ's augmentation. rgb uint8 ``[n, V, H, W, 3]``; the same offset for all frames and cameras."""
    H, W = rgb.shape[2:4]
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    padded = np.pad(rgb, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, :, dy : dy + H, dx : dx + W]


def collate(items: list[dict[str, np.ndarray]], instruction: str) -> dict:
    """Pad to the longest item (in blocks); ``block_valid`` marks real blocks."""
    n = max(len(it["rgb"]) for it in items)
    out = {}
    for key in ("rgb", "state", "actions", "action_valid", "boa"):
        arrs = []
        for it in items:
            a = it[key]
            pad = np.zeros((n - len(a), *a.shape[1:]), a.dtype)
            arrs.append(np.concatenate([a, pad]))
        out[key] = torch.from_numpy(np.stack(arrs))
    out["block_valid"] = torch.tensor([[i < len(it["rgb"]) for i in range(n)] for it in items])
    out["instructions"] = [instruction] * len(items)
    return out


class BatchSampler:
    """Deterministic episode order: epoch e is a permutation drawn from ``seed + e``; resumable by position.

    With ``world_size > 1`` rank r takes items r, r + world, ... of each global batch (DDP).
    """

    def __init__(
        self,
        dataset: EpisodeDataset,
        cfg: PARConfig,
        batch_size: int,
        history: int,
        seed: int,
        phase_augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shift: int = 0,
    ):
        self.ds, self.cfg, self.batch_size, self.history = dataset, cfg, batch_size, history
        self.seed, self.phase_augment, self.rank, self.world = seed, phase_augment, rank, world_size
        self.shift = shift  # pixels of random shift per window (0: none)
        self.position = 0  # global batches drawn so far

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])

    def _item(self, global_index: int) -> dict:
        n = len(self.ds)
        epoch, i = divmod(global_index, n)
        perm = np.random.default_rng(self.seed + epoch).permutation(n)
        ep = self.ds.episodes[perm[i]]
        rng = np.random.default_rng((self.seed, global_index))  # per-item randomness: phase and window start
        phase = int(rng.integers(self.cfg.stride)) if self.phase_augment else 0
        N = num_blocks(len(ep.actions), self.cfg, phase)
        start = int(rng.integers(0, max(1, N - self.history + 1)))
        item = episode_blocks(ep, self.cfg, phase, start, self.history)
        if self.shift:
            item["rgb"] = random_shift(item["rgb"], self.shift, rng)
        return item

    def next_batch(self) -> dict:
        first = self.position * self.batch_size
        idx = range(first + self.rank, first + self.batch_size, self.world)
        self.position += 1
        return collate([self._item(i) for i in idx], self.ds.meta["instruction"])
