import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from par_deploy.checkpoint import from_pretrained
from par_deploy.config import preset
from par_deploy.synthetic import write_synthetic_demos
from par_deploy.train.dataset import BatchSampler, EpisodeDataset, episode_blocks, random_shift
from par_deploy.train.trainer import TrainConfig, train


@pytest.fixture
def demos(tmp_path):
    return write_synthetic_demos(tmp_path / "demos", episodes=5)


def small(**kw):
    return TrainConfig(**{"steps": 6, "batch_size": 2, "warmup": 2, "save_every": 3, "log_every": 1, **kw})


def test_blocks_follow_the_chunk_grid(demos):
    ds = EpisodeDataset(demos)
    cfg = preset("tiny", **{k: v for k, v in ds.model_fields().items() if k != "extra"})
    ep = ds.episodes[0]
    T, L = len(ep.actions), cfg.chunk_len
    b = episode_blocks(ep, cfg, phase=1, start=0, history=cfg.max_blocks)
    n = len(b["rgb"])
    assert n == -(-(T - 1) // L) + 1
    assert np.array_equal(b["rgb"][1], ep.rgb[1 + L]) and np.array_equal(b["rgb"][-1], ep.rgb[T])
    assert np.array_equal(b["actions"][1], ep.actions[1 : 1 + L])  # A_1 leads from O_0 to O_1
    assert b["boa"][0] and not b["boa"][1:].any() and not b["action_valid"][0].any()
    assert b["action_valid"][1:].sum() == T - 1  # every action after the phase offset, once


def test_sampler_is_deterministic_and_resumable(demos):
    ds = EpisodeDataset(demos)
    cfg = preset("tiny", **{k: v for k, v in ds.model_fields().items() if k != "extra"})
    a, b = BatchSampler(ds, cfg, 2, 8, seed=3), BatchSampler(ds, cfg, 2, 8, seed=3)
    first = [a.next_batch() for _ in range(4)]
    b.load_state_dict({"position": 2})
    assert torch.equal(b.next_batch()["rgb"], first[2]["rgb"])


def test_random_shift_moves_every_frame_of_a_window_by_one_offset():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)  # [n, V, H, W, 3]
    assert np.array_equal(random_shift(rgb, 0, np.random.default_rng(1)), rgb)
    offsets = set()
    for seed in range(40):
        out = random_shift(rgb, 2, np.random.default_rng(seed))
        assert out.shape == rgb.shape and out.dtype == np.uint8
        dy, dx = np.random.default_rng(seed).integers(0, 5, size=2)  # the draw random_shift makes
        # interior pixels come from (y + dy - 2, x + dx - 2) of every frame and camera alike
        assert np.array_equal(out[:, :, 2:14, 2:14], rgb[:, :, dy : dy + 12, dx : dx + 12])
        offsets.add((int(dy), int(dx)))
    assert len(offsets) > 10


def test_shifted_batches_are_deterministic_and_differ_from_unshifted(demos):
    ds = EpisodeDataset(demos)
    cfg = preset("tiny", **{k: v for k, v in ds.model_fields().items() if k != "extra"})
    a, b = (BatchSampler(ds, cfg, 2, 8, seed=3, shift=2) for _ in range(2))
    plain = BatchSampler(ds, cfg, 2, 8, seed=3)
    x, y, z = a.next_batch(), b.next_batch(), plain.next_batch()
    assert torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["actions"], z["actions"])
    assert not torch.equal(x["rgb"], z["rgb"])


def test_train_writes_a_loadable_checkpoint_and_metrics(demos, tmp_path):
    final = train(demos, tmp_path / "run", "tiny", small(), progress=False)
    model, norm = from_pretrained(final)
    assert model.cfg.instructions == ("move the square",) and model.cfg.task_info.task == "Synthetic"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(np.isfinite(float(x.split('"loss": ')[1].split(",")[0])) for x in lines)
    assert (tmp_path / "run" / "checkpoints" / "step_0000003" / "model.safetensors").exists()


def test_resume_is_exact(demos, tmp_path):
    straight = train(demos, tmp_path / "a", "tiny", small(), progress=False)
    assert train(demos, tmp_path / "b", "tiny", small(), progress=False, stop_at=4) is None
    saved = tmp_path / "b" / "train_config.json"  # a run started before shift_augment existed resumes too
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "shift_augment"}))
    resumed = train(demos, tmp_path / "b", "tiny", small(), progress=False)
    m1, _ = from_pretrained(straight)
    m2, _ = from_pretrained(resumed)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(demos, tmp_path / "b", "tiny", small(lr=0.5), progress=False)


def test_ddp_on_gloo_with_two_processes(demos, tmp_path):
    """The same entry point as single-process training, launched by torchrun (DDP over gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        "-m",
        "par_deploy",
        "train",
        str(demos),
        "--out",
        str(tmp_path / "ddp"),
        "--preset",
        "tiny",
        "--optimizer-steps",
        "3",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--save-every",
        "3",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _ = from_pretrained(tmp_path / "ddp" / "final")
    assert model.cfg.task_info.task == "Synthetic"
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1  # log_every=10: the last step


def test_render_predicted_frames(demos, tmp_path):
    from par_deploy.render import render_predictions

    final = train(demos, tmp_path / "run", "tiny", small(steps=2), progress=False)
    out = render_predictions(final, demos, 0, tmp_path / "pred.png", steps=2)
    import matplotlib.pyplot as plt

    img = plt.imread(out)
    cfg = from_pretrained(final)[0].cfg
    scale = 256 // cfg.image_size
    assert img.shape[0] == 2 * cfg.image_size * scale  # a real row over a predicted row
    assert img.shape[1] % (cfg.image_size * scale) == 0 and img.shape[1] > cfg.image_size * scale
