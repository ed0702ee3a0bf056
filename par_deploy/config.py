"""Model configuration: one dataclass, validated on construction, saved as ``config.json``.

Presets:
- ``tiny``: a few thousand parameters; the tests run it in seconds.
- ``cpu-small``: the shipped default, trainable on 2 CPU cores (64x64 RGB, d=256, 6 layers).
- ``paper``: the NOVA d48w1024 family the paper builds on (Table 1). NOVA's ``arch`` is
  ``[vit_d16w1024, vit_d32w1024, mlp_d3w1280]``: a 16-layer temporal (causal) transformer, a 32-layer
  spatial transformer for set-by-set frame prediction and a 3-block, 1280-wide diffusion MLP. We count the
  two transformers as the paper's "Causal-Transformer" (608.7M) and the diffusion MLP as its
  "Frame-DeTokenizer" (32.8M); see ``PARModel.parameter_groups``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from par_deploy.config_formats import FORMAT_1_IMPLIED, IMPLIED_BY_FORMAT  # noqa: F401 (re-exported)
from par_deploy.errors import ConfigError

CONFIG_TYPE = "par"
# Format 2: config.json lists every field; a missing field is an error (defaults are for configs built in code).
# Format 1 (before 2026-11-25) let a missing field take the dataclass default; those files load through
# FORMAT_1_IMPLIED (par_deploy/config_formats.py), the values format 1 implied, frozen so later default changes
# cannot alter them.
CONFIG_FORMAT_VERSION = 3

VARIANTS = ("full", "noar", "discrete")
CODECS = ("patch", "vae")
FRAME_EMBEDS = ("linear", "conv")
SAMPLERS = ("ddim", "ddpm")
# NOVA's architecture as config choices; the first value of each is the default (the CPU presets' blocks)
BLOCK_NORMS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu")
TEXT_ATTENTIONS = ("causal", "first_frame")
TEXT_EMBEDS = ("linear", "nova")
POS_EMBEDS = ("learned", "sincos")
SPATIAL_CONDS = ("add", "prepend")
FRAME_MLPS = ("mar", "nova")
OVERFLOWS = ("error", "slide")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear")


def check_format_version(version: Any, supported: int, where: str, error=ConfigError, hint: str = "") -> int:
    """The one rule for a file's ``format_version`` (configs, bundle manifests): an integer >= 1 and not newer than
    ``supported``; else ``error`` naming ``where`` (``hint``: what else the user can do)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{where}: invalid format_version {version!r} (expected an integer >= 1)")
    if version > supported:
        raise error(
            f"{where}: format_version {version} is newer than this par-deploy supports ({supported}); "
            f"upgrade par-deploy{hint}"
        )
    return version


@dataclass(frozen=True)
class TaskInfo:
    """What a model was trained for: the typed view of the task fields of ``config.extra``.

    ``config.json`` keeps them in ``extra`` (every checkpoint since format 1 has them there, written from the
    dataset's ``meta.json`` by ``train/dataset.py``), so no checkpoint needs re-saving; read them through
    ``PARConfig.task_info``, write them with ``to_extra``. ``None`` / empty: not recorded (a synthetic or
    hand-built config).
    """

    task: str | None = None  # par_deploy.sim.TASKS key, e.g. "PushCube"
    env_id: str | None = None  # the ManiSkill id, e.g. "PushCube-v1"
    control_mode: str | None = None  # the controller of the training actions, e.g. "pd_ee_delta_pos"
    max_episode_steps: int | None = None  # the demonstrations' horizon (env steps)
    state_keys: tuple[tuple[str, int], ...] = ()  # observation keys and widths concatenated into the state

    KEYS = ("task", "env_id", "control_mode", "max_episode_steps", "state_keys")

    @classmethod
    def from_extra(cls, extra: dict[str, Any], source: str = "config") -> TaskInfo:
        """Parse the task fields of an ``extra`` dict (other keys, e.g. provenance, are ignored)."""
        if not isinstance(extra, dict):
            raise ConfigError(f"{source}.extra must be a JSON object, got {type(extra).__name__}")
        for key in ("task", "env_id", "control_mode"):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise ConfigError(f"{source}.extra.{key} must be a string, got {extra[key]!r}")
        steps = extra.get("max_episode_steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
            raise ConfigError(f"{source}.extra.max_episode_steps must be a positive integer, got {steps!r}")
        keys = extra.get("state_keys") or ()
        try:
            state_keys = tuple((str(k), int(n)) for k, n in keys)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}.extra.state_keys must be a list of [key, width] pairs, got {keys!r}") from None
        return cls(extra.get("task"), extra.get("env_id"), extra.get("control_mode"), steps, state_keys)

    def to_extra(self) -> dict[str, Any]:
        """The ``extra`` entries (JSON types) of the recorded fields."""
        d = {k: getattr(self, k) for k in self.KEYS if k != "state_keys" and getattr(self, k) is not None}
        if self.state_keys:
            d["state_keys"] = [[k, n] for k, n in self.state_keys]
        return d


def executed_per_step(chunk_len: int, exec_len: int) -> int:
    """Actions of a chunk executed per control step: ``exec_len``, or (0) all ``chunk_len`` of them. The one rule
    ``PARConfig.stride`` and the runtime's ``PolicySpec.stride`` share."""
    return exec_len or chunk_len


@dataclass
class PARConfig:
    # --- embodiment and data -------------------------------------------------------------------
    image_size: int = 64  # square RGB frames, per camera
    num_cameras: int = 1
    action_dim: int = 4  # pd_ee_delta_pos: xyz delta + gripper
    state_dim: int = 0  # embodiment/task state per step (0: no state token)
    chunk_len: int = 8  # L: actions per chunk = action tokens per block
    # actions of each chunk executed before the next control step re-plans (0: all L). With exec_len < L a block's
    # action part holds the exec_len executed actions (the rest zeroed) and blocks are exec_len env steps apart.
    exec_len: int = 0
    max_blocks: int = 32  # static cache length in control steps (blocks), the longest episode or the window
    # What happens when an episode outgrows the cache: "error" (CacheFullError; the model saw whole episodes from
    # their first block), or "slide": keep the newest max_blocks // 2 blocks and re-encode them at positions from 0,
    # for a model trained on windows of max_blocks blocks cut anywhere in the episode (`par-deploy train --window`).
    overflow: str = "error"

    # --- text prefix ---------------------------------------------------------------------------
    instructions: tuple[str, ...] = ("push the cube to the goal region",)
    num_text_tokens: int = 4  # K_t
    text_encoder_path: str | None = None  # local Hugging Face model: frozen encoder + linear projector
    text_encoder_dim: int = 0  # hidden size of that encoder (checked when it is loaded)

    # --- frame codec ---------------------------------------------------------------------------
    codec: str = "patch"  # "patch": pixel patches, no weights; "vae": diffusers AutoencoderKL
    patch_size: int = 16  # pixels per patch side (codec "patch") or latent cells (codec "vae")
    target_pool: int = 2  # codec "patch": the predicted frame is the input frame mean-pooled by this factor
    frame_embed: str = "linear"  # frame tokens -> width: "linear" (NOVA's patch embedding) or "conv" (a conv stem)
    vae_path: str | None = None
    vae_latent_channels: int = 4
    vae_downsample: int = 8

    # --- NOVA's architecture (every default keeps the CPU presets' blocks; the paper preset picks NOVA's) ---
    block_norm: str = "pre"  # "pre": x + f(norm(x)); "post": x + norm(f(x)), NOVA's vision_transformer.Block
    activation: str = "gelu_tanh"  # transformer MLPs: "gelu_tanh" or "gelu" (exact, NOVA's nn.GELU())
    text_attention: str = "causal"  # "first_frame": text bidirectional, grouped with block 0's observation (NOVA)
    text_embed: str = "linear"  # "nova": projection + LayerNorm, NOVA's fixed features past the prompt's end
    video_patch_size: int = 0  # patch side of the causal transformer's frame tokens; 0: patch_size (NOVA: 2x)
    pos_embed: str = "learned"  # "sincos": NOVA's fixed 2-D sin-cos embedding of frame and spatial tokens
    spatial_cond: str = "add"  # "prepend": NOVA's image encoder (condition prepended, MAE-style encoder half)
    frame_mlp: str = "mar"  # diffusion MLP: "mar" (MAR's SimpleMLPAdaLN) or "nova" (NOVA's DiffusionMLP)

    # --- causal transformer (NOVA's temporal "video encoder") ------------------------------------
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    rope_theta_frame: float = 100.0  # frame/state tokens: position = block index n
    rope_theta_action: float = 10000.0  # action tokens: position = n * L + j (action rate)

    # --- frame de-tokenizer (NOVA's spatial "image encoder" + diffusion MLP) ---------------------
    spatial_depth: int = 2
    frame_head_width: int = 384
    frame_head_depth: int = 2
    frame_mask_min: float = 0.7  # training mask ratio ~ U[frame_mask_min, 1]
    frame_decode_sets: int = 4  # set-by-set prediction at inference
    frame_head: bool = True  # False: a deployment checkpoint without the frame de-tokenizer (actions only)

    # --- Action-DiT ----------------------------------------------------------------------------
    dit_dim: int = 256
    dit_depth: int = 3
    dit_heads: int = 4
    action_tokenizer_hidden: int = 256

    # --- diffusion -----------------------------------------------------------------------------
    train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    diffusion_batch_mul: int = 4  # t sampled this many times per token (MAR/NOVA)
    sampler: str = "ddim"  # default inference sampler of the PyTorch reference
    sample_steps: int = 10  # default inference steps of the PyTorch reference
    frame_loss_weight: float = 1.0
    action_loss_weight: float = 1.0

    # --- ablations (paper §5.3) ------------------------------------------------------------------
    variant: str = "full"  # "noar": no transformer; "discrete": MLP regression de-tokenizers

    # the training task (typed: ``task_info``, ``TaskInfo``) and free-form provenance (``made_from``, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.instructions = tuple(self.instructions)
        positive = [
            "image_size",
            "num_cameras",
            "action_dim",
            "chunk_len",
            "max_blocks",
            "num_text_tokens",
            "patch_size",
            "target_pool",
            "dim",
            "depth",
            "heads",
            "spatial_depth",
            "frame_head_width",
            "frame_head_depth",
            "frame_decode_sets",
            "dit_dim",
            "dit_depth",
            "dit_heads",
            "action_tokenizer_hidden",
            "train_timesteps",
            "diffusion_batch_mul",
            "sample_steps",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
        if self.state_dim < 0:
            raise ConfigError(f"config.state_dim must be >= 0, got {self.state_dim}")
        if not isinstance(self.exec_len, int) or not 0 <= self.exec_len <= self.chunk_len:
            raise ConfigError(f"config.exec_len must be 0 (all) .. chunk_len={self.chunk_len}, got {self.exec_len!r}")
        if not self.instructions or not all(isinstance(s, str) and s for s in self.instructions):
            raise ConfigError("config.instructions must be a non-empty list of non-empty strings")
        for name, allowed in (
            ("variant", VARIANTS),
            ("codec", CODECS),
            ("sampler", SAMPLERS),
            ("frame_embed", FRAME_EMBEDS),
            ("beta_schedule", BETA_SCHEDULES),
            ("block_norm", BLOCK_NORMS),
            ("activation", ACTIVATIONS),
            ("text_attention", TEXT_ATTENTIONS),
            ("text_embed", TEXT_EMBEDS),
            ("pos_embed", POS_EMBEDS),
            ("spatial_cond", SPATIAL_CONDS),
            ("frame_mlp", FRAME_MLPS),
            ("overflow", OVERFLOWS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(f"config.dim={self.dim} must split into {self.heads} heads of even size")
        if self.dit_dim % self.dit_heads:
            raise ConfigError(f"config.dit_dim={self.dit_dim} must be divisible by dit_heads={self.dit_heads}")
        self._check_nova_choices()
        TaskInfo.from_extra(self.extra)  # a ConfigError names a mistyped task field
        if self.latent_size % self.patch_size:
            raise ConfigError(
                f"config.patch_size={self.patch_size} must divide the {self.codec} codec's spatial size "
                f"{self.latent_size} (image_size={self.image_size})"
            )
        if self.frame_embed == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"config.frame_embed 'conv' needs a power-of-two patch_size, got {self.patch_size}")
        if self.patch_size % self.target_pool:
            raise ConfigError(f"config.target_pool={self.target_pool} must divide patch_size={self.patch_size}")
        if self.codec == "vae" and self.target_pool != 1:
            raise ConfigError("config.target_pool must be 1 with the 'vae' codec (latents are predicted as they are)")
        if self.codec == "vae" and self.image_size % self.vae_downsample:
            raise ConfigError(f"image_size={self.image_size} must be divisible by vae_downsample")
        if not 0.0 < self.frame_mask_min <= 1.0:
            raise ConfigError(f"config.frame_mask_min must be in (0, 1], got {self.frame_mask_min}")
        if self.sample_steps > self.train_timesteps:
            raise ConfigError("config.sample_steps cannot exceed train_timesteps")
        if self.text_encoder_path is not None and self.text_encoder_dim <= 0:
            raise ConfigError("config.text_encoder_dim must be set when text_encoder_path is set")

    def _check_nova_choices(self) -> None:
        if not isinstance(self.video_patch_size, int) or self.video_patch_size < 0:
            raise ConfigError(f"config.video_patch_size must be >= 0, got {self.video_patch_size!r}")
        if self.latent_size % self.video_patch:
            raise ConfigError(
                f"config.video_patch_size={self.video_patch} must divide the {self.codec} codec's "
                f"spatial size {self.latent_size}"
            )
        if self.video_patch != self.patch_size and (self.spatial_cond != "prepend" or self.target_pool != 1):
            raise ConfigError(
                "a video_patch_size other than patch_size needs spatial_cond 'prepend' and "
                "target_pool 1 (the condition and the predicted tokens are then different grids)"
            )
        if self.video_patch != self.patch_size and self.frame_embed != "linear":
            raise ConfigError("config.frame_embed 'conv' works on the patch_size grid: leave video_patch_size 0")
        if self.text_embed == "nova" and not self.text_encoder_path:
            raise ConfigError("config.text_embed 'nova' projects a text encoder's features: set text_encoder_path")

    @property
    def task_info(self) -> TaskInfo:
        """The task this model was trained for (``extra``'s task fields, typed)."""
        return TaskInfo.from_extra(self.extra)

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        """Spatial side of the codec's output grid (pixels or VAE latent cells)."""
        return self.image_size if self.codec == "patch" else self.image_size // self.vae_downsample

    @property
    def latent_channels(self) -> int:
        return 3 if self.codec == "patch" else self.vae_latent_channels

    @property
    def video_patch(self) -> int:
        """Patch side of the causal transformer's frame tokens (NOVA's video patch embedding)."""
        return self.video_patch_size or self.patch_size

    @property
    def frame_tokens(self) -> int:
        """K_o: frame tokens per block (all cameras), on the video patch grid."""
        return self.num_cameras * (self.latent_size // self.video_patch) ** 2

    @property
    def target_tokens(self) -> int:
        """Tokens the frame de-tokenizer predicts per frame (the patch_size grid; K_o unless video_patch_size)."""
        return self.num_cameras * (self.latent_size // self.patch_size) ** 2

    @property
    def frame_input_dim(self) -> int:
        """Width of an input frame token (one video patch of the codec's output)."""
        return self.latent_channels * self.video_patch**2

    @property
    def target_patch(self) -> int:
        return self.patch_size // self.target_pool

    @property
    def frame_token_dim(self) -> int:
        """Width of a predicted frame token: the same patch of the ``target_pool``-pooled frame. Pooling keeps
        the de-tokenizer's targets small enough for a CPU-sized diffusion MLP (tests/test_model.py overfit)."""
        return self.latent_channels * self.target_patch**2

    @property
    def state_tokens(self) -> int:
        return 1 if self.state_dim > 0 else 0

    @property
    def obs_tokens(self) -> int:
        """Observation part of a block: frame tokens then the state token."""
        return self.frame_tokens + self.state_tokens

    @property
    def block_len(self) -> int:
        return self.obs_tokens + self.chunk_len

    @property
    def stride(self) -> int:
        """Env steps between blocks: the actions executed per control step (``exec_len``, or the whole chunk)."""
        return executed_per_step(self.chunk_len, self.exec_len)

    @property
    def max_seq_len(self) -> int:
        return self.num_text_tokens + self.max_blocks * self.block_len

    # --- cache geometry: the one implementation the model, the exporter and every runtime backend use ---
    def block_slot(self, block):
        """First KV-cache slot of block ``block`` (an int, or an int64 tensor inside a traced graph): the text
        prefix fills slots ``0 .. K_t - 1``, block n slots ``K_t + n*Bl .. K_t + (n+1)*Bl - 1``."""
        return self.num_text_tokens + block * self.block_len

    def cache_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        """``[layers, batch, heads, max_seq_len, head_dim]``: one static cache (keys or values)."""
        return (self.depth, batch, self.heads, self.max_seq_len, self.dim // self.heads)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["instructions"] = list(self.instructions)
        return {"type": CONFIG_TYPE, "format_version": CONFIG_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PARConfig:
        """Parse a config dict of any supported format: format 2 must list every field; format 1 is migrated
        with ``FORMAT_1_IMPLIED``. ``source`` names the file in error messages."""
        d = dict(d)
        kind = d.pop("type", None)
        version = d.pop("format_version", None)
        if kind != CONFIG_TYPE:
            raise ConfigError(f"{source}: expected type {CONFIG_TYPE!r}, found {kind!r}")
        if version is None:
            raise ConfigError(
                f"{source}: no format_version; a config written by par-deploy has one "
                f"(current: {CONFIG_FORMAT_VERSION}): restore it, or re-save the config"
            )
        check_format_version(version, CONFIG_FORMAT_VERSION, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config fields {unknown}")
        if version < CONFIG_FORMAT_VERSION:
            d = {**IMPLIED_BY_FORMAT[version], **d}
        missing = sorted(known - set(d))
        if missing:
            raise ConfigError(
                f"{source}: format {version} config lacks the fields {missing}; it must list every field "
                "(restore them from the file this one was copied from, or re-save it with PARConfig.save)"
            )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PARConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def replace(self, **changes: Any) -> PARConfig:
        return dataclasses.replace(self, **changes)


def _tiny() -> PARConfig:
    return PARConfig(
        image_size=16,
        patch_size=8,
        target_pool=2,
        action_dim=4,
        state_dim=3,
        chunk_len=4,
        max_blocks=8,
        num_text_tokens=2,
        dim=32,
        depth=2,
        heads=2,
        spatial_depth=1,
        frame_head_width=64,
        frame_head_depth=1,
        dit_dim=32,
        dit_depth=1,
        dit_heads=2,
        action_tokenizer_hidden=32,
        train_timesteps=50,
        sample_steps=4,
        frame_decode_sets=2,
    )


def _cpu_small() -> PARConfig:
    return PARConfig()


def _paper() -> PARConfig:
    # NOVA d48w1024 on Open-Sora VAE latents (4 channels, 8x down, image patch 2, video patch 4) and Phi-2 text
    # features (2560-d), with NOVA's blocks (par_deploy/nova.py loads NOVA's weights into it).
    # Point vae_path / text_encoder_path at local copies of those weights to build it for real.
    return PARConfig(
        block_norm="post",
        activation="gelu",
        text_attention="first_frame",
        text_embed="nova",
        video_patch_size=4,
        pos_embed="sincos",
        spatial_cond="prepend",
        frame_mlp="nova",
        vae_path=None,
        text_encoder_path="phi-2",
        text_encoder_dim=2560,
        image_size=256,
        codec="vae",
        vae_latent_channels=4,
        vae_downsample=8,
        patch_size=2,
        target_pool=1,
        action_dim=7,
        state_dim=9,
        chunk_len=16,
        max_blocks=16,
        num_text_tokens=256,
        dim=1024,
        depth=16,
        heads=16,
        spatial_depth=32,
        frame_head_width=1280,
        frame_head_depth=3,
        dit_dim=512,
        dit_depth=3,
        dit_heads=8,
        action_tokenizer_hidden=576,
        train_timesteps=1000,
        sample_steps=100,
    )


PRESETS = {"tiny": _tiny, "cpu-small": _cpu_small, "paper": _paper}


def preset(name: str, **overrides: Any) -> PARConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
