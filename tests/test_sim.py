"""ManiSkill3 environments and demonstrations.

Tests marked ``sim`` need the simulator (``bash scripts/setup_sim.sh``) and take about a minute on one core;
the others check the episode format and image downsampling without it.
"""

import json
import os

import numpy as np
import pytest

from par_deploy.sim.env import TASKS, downsample_rgb
from par_deploy.train.demo_format import list_episodes, load_episode, load_meta
from par_deploy.train.demos import generate_demos

sim = pytest.mark.sim


@pytest.fixture(scope="module")
def push_demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "PushCube"
    summary = generate_demos("PushCube", 2, out, progress=False)
    return out, summary


@sim
def test_check_simulator():
    from par_deploy.sim import check_simulator

    check_simulator()


@sim
def test_push_cube_env_shapes():
    from par_deploy.sim import make_env

    with make_env("PushCube") as env:
        assert (env.action_dim, env.state_dim, env.num_cameras) == (4, 16, 1)
        assert env.spec is TASKS["PushCube"] and env.max_episode_steps == 100
        obs = env.reset(seed=0)
        assert set(obs) == {"rgb", "state"}
        assert obs["rgb"].shape == (1, 64, 64, 3) and obs["rgb"].dtype == np.uint8
        assert obs["state"].shape == (16,) and obs["state"].dtype == np.float32
        assert obs["rgb"].std() > 1.0  # a rendered scene, not a blank frame
        obs2, reward, terminated, truncated, info = env.step(np.array([0.5, 0.0, 0.0, -1.0], np.float32))
        assert obs2["rgb"].shape == (1, 64, 64, 3) and obs2["state"].shape == (16,)
        assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
        assert isinstance(info["success"], bool) and info["success"] is False
        assert not np.array_equal(obs["state"], obs2["state"])  # the arm moved
        with pytest.raises(ValueError, match="shape"):
            env.step(np.zeros(3, np.float32))


@sim
def test_robot_option_keeps_the_tasks_initial_states():
    """``TaskSpec.robot`` / ``make_maniskill_env(robot=...)``: ManiSkill's panda_wristcam (the panda with a hand
    camera) in PickCube-v1 renders a hand camera, and ``reset(seed)`` places the cube and the goal exactly as with
    the task's default robot, so the evaluation protocol's initial states stay the same."""
    from par_deploy.sim.env import make_maniskill_env

    states = {}
    for robot in (None, "panda_wristcam"):
        env = make_maniskill_env(
            "PickCube-v1", obs_mode="rgb", control_mode="pd_ee_delta_pos", max_episode_steps=100, robot=robot
        )
        try:
            obs, _ = env.reset(seed=500000)
            states[robot] = env.unwrapped.get_state_dict()["actors"]
            assert ("hand_camera" in obs["sensor_data"]) == (robot is not None)
        finally:
            env.close()
    for name in ("cube", "goal_site"):
        np.testing.assert_array_equal(states[None][name].numpy(), states["panda_wristcam"][name].numpy())


@sim
def test_generate_demos_writes_valid_episodes(push_demos):
    out, summary = push_demos
    assert (summary.kept, summary.existing, summary.missing) == (2, 0, [])
    meta = load_meta(out)
    assert meta["task"] == "PushCube" and meta["env_id"] == "PushCube-v1"
    assert meta["control_mode"] == "pd_ee_delta_pos" and meta["image_size"] == 64
    assert (meta["num_cameras"], meta["state_dim"], meta["action_dim"]) == (1, 16, 4)
    assert meta["camera_names"] == ["base_camera"]
    assert meta["state_keys"] == [["agent/qpos", 9], ["extra/tcp_pose", 7]]
    paths = list_episodes(out)
    assert [p.name for p in paths] == ["ep_000000.npz", "ep_000001.npz"]
    for i, path in enumerate(paths):
        ep = load_episode(path, meta)
        t = len(ep["actions"])
        assert ep["rgb"].shape == (t + 1, 1, 64, 64, 3) and ep["state"].shape == (t + 1, 16)
        assert bool(ep["success"]) and int(ep["seed"]) == i
        assert np.abs(ep["actions"]).max() <= 1.0


@sim
def test_demo_observations_equal_par_env(push_demos):
    """Training observations are what ParEnv returns when the stored actions are replayed from the seed."""
    from par_deploy.sim import make_env

    out, _ = push_demos
    ep = load_episode(list_episodes(out)[0])
    with make_env("PushCube") as env:
        obs = env.reset(int(ep["seed"]))
        for t, action in enumerate(ep["actions"]):
            assert np.array_equal(obs["rgb"], ep["rgb"][t]) and np.array_equal(obs["state"], ep["state"][t]), t
            obs, _, _, _, info = env.step(action)
        assert np.array_equal(obs["rgb"], ep["rgb"][-1]) and info["success"]


@sim
def test_generate_demos_resumes(push_demos):
    out, _ = push_demos
    before = {p.name: p.stat().st_mtime_ns for p in list_episodes(out)}
    summary = generate_demos("PushCube", 2, out, progress=False)
    assert (summary.kept, summary.existing, summary.failed_attempts) == (0, 2, 0)
    assert {p.name: p.stat().st_mtime_ns for p in list_episodes(out)} == before
    with pytest.raises(ValueError, match="image_size"):
        generate_demos("PushCube", 2, out, image_size=32, progress=False)


# --- no simulator needed ----------------------------------------------------------------------------------


def _write_episode(path, **override):
    ep = {
        "rgb": np.zeros((4, 1, 8, 8, 3), np.uint8),
        "state": np.zeros((4, 16), np.float32),
        "actions": np.zeros((3, 4), np.float32),
        "success": np.asarray(True),
        "seed": np.asarray(7, np.int64),
    }
    ep.update(override)
    np.savez_compressed(path, **{k: v for k, v in ep.items() if v is not None})
    return path


def test_load_episode_validates(tmp_path):
    good = load_episode(_write_episode(tmp_path / "ok.npz"))
    assert good["rgb"].shape == (4, 1, 8, 8, 3) and int(good["seed"]) == 7
    cases = {
        "missing arrays": dict(seed=None),
        "dtype": dict(state=np.zeros((4, 16), np.float64)),
        "lengths disagree": dict(actions=np.zeros((4, 4), np.float32)),
        "non-finite": dict(actions=np.full((3, 4), np.nan, np.float32)),
    }
    for i, (message, override) in enumerate(cases.items()):
        path = _write_episode(tmp_path / f"bad{i}.npz", **override)
        with pytest.raises(ValueError, match=message) as err:
            load_episode(path)
        assert str(path) in str(err.value)
    meta = {"image_size": 8, "num_cameras": 2, "state_dim": 16, "action_dim": 4}
    with pytest.raises(ValueError, match="meta.json"):
        load_episode(tmp_path / "ok.npz", meta)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_episode(tmp_path / "junk.npz")


def test_load_meta_rejects_other_formats(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format"):
        load_meta(tmp_path)
    assert list_episodes(tmp_path) == [] and not os.path.exists(tmp_path / "episodes")


def test_downsample_rgb_is_rounded_block_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    small = downsample_rgb(img, 2)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    exact = img.reshape(64, 2, 64, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.all(small == np.floor(exact + 0.5))


def test_task_specs():
    assert TASKS["PushCube"].state_dim == 16 and TASKS["PickCube"].state_dim == 20
    assert TASKS["StackCube"].cameras == ("base_camera", "hand_camera") and TASKS["StackCube"].max_episode_steps == 200
    assert dict(TASKS["PickCube"].state_keys)["extra/goal_pos"] == 3
