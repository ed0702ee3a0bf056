"""ManiSkill3 environments and the project's observation format.

This module is the one place that creates ManiSkill environments (``make_maniskill_env``) and turns ManiSkill
observations into the project's format (``convert_obs``). ``ParEnv`` joins the two; evaluation steps a
``ParEnv`` and the demonstration converter (``par_deploy.train.demos``) records from a ``ParEnv``, so training
observations are produced by exactly the code that produces them at evaluation.

Observation (a dict of numpy arrays)::

    rgb    uint8   [V, H, W, 3]  V cameras in ``TaskSpec.cameras`` order, H = W = image_size
    state  float32 [S]           ``TaskSpec.state_keys`` entries concatenated in order (bools as 0/1)

Images: ManiSkill renders the cube tasks' cameras at 128x128 (``TaskSpec.camera_size``). When ``image_size``
divides that, the sensor renders at 128 and each k x k block is averaged (rounded half up), e.g. the 2x2 mean
for 64 (docs/design-notes.md §5); otherwise the sensor renders at ``image_size`` directly.

Simulation: ``physx_cpu`` with one environment and ``obs_mode="rgb"``. SAPIEN needs Vulkan even on CPU; with
``render_backend="cpu"`` it renders with Mesa's lavapipe, which must be Mesa >= 25 (``scripts/setup_sim.sh``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from par_deploy.errors import ParError

SETUP_COMMAND = "bash scripts/setup_sim.sh"

_QPOS = ("agent/qpos", 9)
_TCP_POSE = ("extra/tcp_pose", 7)  # position xyz + quaternion wxyz, world frame


class SimulatorUnavailable(ParError, RuntimeError):
    """ManiSkill3 cannot run here: not installed, or no Vulkan device SAPIEN accepts."""


@dataclass(frozen=True)
class TaskSpec:
    """A ManiSkill task as the project uses it.

    ``state_keys`` are ``(path, dim)`` pairs; a path is ``group/name`` in ManiSkill's observation dict.
    ``max_episode_steps`` is the evaluation horizon (ManiSkill's default of 50 is shorter than its demos).
    """

    name: str
    env_id: str
    max_episode_steps: int
    instruction: str
    state_keys: tuple[tuple[str, int], ...]
    cameras: tuple[str, ...] = ("base_camera",)
    robot: str | None = None  # ManiSkill's robot_uids; None: the task's default robot
    camera_size: int = 128  # ManiSkill's default sensor resolution for the task's cameras

    @property
    def state_dim(self) -> int:
        return sum(dim for _, dim in self.state_keys)


TASKS: dict[str, TaskSpec] = {
    "PushCube": TaskSpec(
        name="PushCube",
        env_id="PushCube-v1",
        max_episode_steps=100,
        instruction="push the cube to the goal region",
        state_keys=(_QPOS, _TCP_POSE),
    ),
    # The goal marker is hidden from the cameras, so the goal position must come in as state (docs/design-notes.md §5).
    "PickCube": TaskSpec(
        name="PickCube",
        env_id="PickCube-v1",
        max_episode_steps=100,
        instruction="pick up the cube and move it to the goal position",
        state_keys=(_QPOS, _TCP_POSE, ("extra/goal_pos", 3), ("extra/is_grasped", 1)),
    ),
    "StackCube": TaskSpec(
        name="StackCube",
        env_id="StackCube-v1",
        max_episode_steps=200,
        instruction="stack the red cube on top of the green cube",
        state_keys=(_QPOS, _TCP_POSE),
        cameras=("base_camera", "hand_camera"),
    ),
}

_checked_backends: set[str] = set()


def check_simulator(render_backend: str = "cpu") -> None:
    """Raise ``SimulatorUnavailable`` with the fix when ManiSkill3 cannot create environments here.

    Checks that ``mani_skill`` and ``sapien`` import, that numpy is < 2 (mani-skill's pinned mplib 0.1.1
    segfaults under numpy 2) and that SAPIEN can create a render device for ``render_backend``. A success
    is remembered for the process.

    ``VK_ICD_FILENAMES`` is deliberately not set: ``setup_sim.sh`` installs lavapipe where the Vulkan loader
    looks by default, and forcing one driver would hide a real GPU. Only a lavapipe unpacked elsewhere needs
    it, and then it must be exported before Python starts (the loader reads it once per process).
    """
    if render_backend in _checked_backends:
        return
    try:
        import mani_skill.envs  # noqa: F401  (registers the environments)
        import sapien
    except Exception as e:  # noqa: BLE001 - any import failure means the same fix
        raise SimulatorUnavailable(
            f"ManiSkill3 cannot be imported ({type(e).__name__}: {e}). Install it with: {SETUP_COMMAND}"
        ) from e
    if int(np.__version__.split(".")[0]) >= 2:
        raise SimulatorUnavailable(
            f"numpy {np.__version__} is installed, but mani-skill's mplib 0.1.1 segfaults under numpy 2. "
            f"Fix: {SETUP_COMMAND} (installs numpy<2)"
        )
    device = "cpu" if render_backend in ("cpu", "sapien_cpu") else "cuda"
    try:
        sapien.render.RenderSystem(sapien.Device(device))
    except Exception as e:  # noqa: BLE001 - SAPIEN raises plain RuntimeError
        if device == "cpu":
            fix = (
                "On a CPU machine it needs Mesa >= 25 lavapipe (mesa-vulkan-drivers and libvulkan1; "
                f"on Debian 12 from bookworm-backports). Fix: {SETUP_COMMAND}"
            )
        else:
            fix = "A CUDA render backend needs an NVIDIA GPU and Vulkan driver; use render_backend='cpu'."
        icd = os.environ.get("VK_ICD_FILENAMES")
        if icd:
            fix += f" VK_ICD_FILENAMES is set to {icd!r}; unset it if that file is not lavapipe's."
        msg = f"SAPIEN cannot create a Vulkan '{device}' render device ({e}). {fix}"
        raise SimulatorUnavailable(msg) from e
    _checked_backends.add(render_backend)


def make_maniskill_env(
    env_id: str,
    *,
    obs_mode: str,
    control_mode: str,
    max_episode_steps: int,
    render_backend: str = "cpu",
    sensor_configs: dict[str, Any] | None = None,
    robot: str | None = None,
):
    """Create one ManiSkill environment on ``physx_cpu`` (``num_envs=1``) after ``check_simulator``; ``robot``:
    ManiSkill's ``robot_uids`` (None: the task's default robot)."""
    check_simulator(render_backend)
    import gymnasium as gym

    return gym.make(
        env_id,
        obs_mode=obs_mode,
        control_mode=control_mode,
        render_backend=render_backend,
        sim_backend="physx_cpu",
        num_envs=1,
        max_episode_steps=max_episode_steps,
        sensor_configs=sensor_configs or {},
        **({"robot_uids": robot} if robot else {}),
    )


def downsample_rgb(img: np.ndarray, factor: int) -> np.ndarray:
    """Average each ``factor x factor`` block of a uint8 ``[H, W, C]`` image, rounding half up."""
    if factor == 1:
        return img
    h, w, c = img.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by the downsampling factor {factor}")
    blocks = img.reshape(h // factor, factor, w // factor, factor, c).sum(axis=(1, 3), dtype=np.uint32)
    n = factor * factor
    return ((blocks + n // 2) // n).astype(np.uint8)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _lookup(obs: dict, path: str) -> Any:
    node: Any = obs
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"ManiSkill observation has no entry {path!r} (at {part!r})")
        node = node[part]
    return node


def convert_obs(raw: dict, spec: TaskSpec, image_size: int) -> dict[str, np.ndarray]:
    """Turn one ManiSkill ``obs_mode="rgb"`` observation (batch of 1) into ``{"rgb", "state"}``."""
    frames = []
    for cam in spec.cameras:
        img = _numpy(_lookup(raw, f"sensor_data/{cam}/rgb"))[0]
        if img.shape[0] != image_size:
            img = downsample_rgb(img, img.shape[0] // image_size)
        if img.shape != (image_size, image_size, 3) or img.dtype != np.uint8:
            raise ValueError(
                f"camera {cam}: got {img.dtype} {img.shape}, expected uint8 ({image_size}, {image_size}, 3)"
            )
        frames.append(img)
    parts = []
    for key, dim in spec.state_keys:
        value = _numpy(_lookup(raw, key)).reshape(-1).astype(np.float32)
        if value.shape != (dim,):
            raise ValueError(f"state entry {key}: got {value.size} values, expected {dim}")
        parts.append(value)
    return {"rgb": np.stack(frames), "state": np.concatenate(parts)}


def _scalar(x: Any) -> Any:
    """A batch-of-one tensor/array as a python scalar; anything else unchanged."""
    if hasattr(x, "detach") or isinstance(x, np.ndarray):
        a = _numpy(x)
        if a.size == 1:
            return a.reshape(()).item()
    return x


class ParEnv:
    """One ManiSkill task with the project's observation format (see the module docstring).

    ``reset(seed)`` returns an observation; ``step(action)`` returns ``(obs, reward, terminated, truncated,
    info)`` with python scalars and ``info["success"]`` a bool. ``truncated`` becomes True at
    ``max_episode_steps``; stepping on is still allowed. ``unwrapped`` is the ManiSkill ``BaseEnv``.
    """

    def __init__(
        self,
        spec: TaskSpec,
        *,
        control_mode: str = "pd_ee_delta_pos",
        image_size: int = 64,
        max_episode_steps: int | None = None,
        render_backend: str = "cpu",
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.spec = spec
        self.control_mode = control_mode
        self.image_size = image_size
        self.max_episode_steps = max_episode_steps or spec.max_episode_steps
        sensor_size = spec.camera_size if spec.camera_size % image_size == 0 else image_size
        self._env = make_maniskill_env(
            spec.env_id,
            obs_mode="rgb",
            control_mode=control_mode,
            max_episode_steps=self.max_episode_steps,
            render_backend=render_backend,
            sensor_configs={"width": sensor_size, "height": sensor_size},
            robot=spec.robot,
        )
        space = self._env.unwrapped.single_action_space
        self.action_low = np.asarray(space.low, dtype=np.float32)
        self.action_high = np.asarray(space.high, dtype=np.float32)

    @property
    def action_dim(self) -> int:
        return int(self.action_low.shape[0])

    @property
    def state_dim(self) -> int:
        return self.spec.state_dim

    @property
    def num_cameras(self) -> int:
        return len(self.spec.cameras)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return self.spec.cameras

    @property
    def unwrapped(self):
        return self._env.unwrapped

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        raw, _ = self._env.reset(seed=int(seed))
        return convert_obs(raw, self.spec, self.image_size)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action has shape {action.shape}, expected ({self.action_dim},) for {self.control_mode}")
        raw, reward, terminated, truncated, info = self._env.step(action)
        info = {k: _scalar(v) for k, v in info.items()}
        info["success"] = bool(info.get("success", False))
        obs = convert_obs(raw, self.spec, self.image_size)
        return obs, float(_scalar(reward)), bool(_scalar(terminated)), bool(_scalar(truncated)), info

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> ParEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_env(
    task: str,
    *,
    control_mode: str = "pd_ee_delta_pos",
    image_size: int = 64,
    max_episode_steps: int | None = None,
    render_backend: str = "cpu",
) -> ParEnv:
    """Create the ``ParEnv`` for a task name of ``TASKS`` (``max_episode_steps`` defaults to the task's)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return ParEnv(
        TASKS[task],
        control_mode=control_mode,
        image_size=image_size,
        max_episode_steps=max_episode_steps,
        render_backend=render_backend,
    )
