"""Tokenizers: text prefix, frame codec + frame embedding, state token, action tokens, BOA block.

Frame codecs turn RGB frames into continuous frame tokens (the de-tokenizer's targets) and back:
- ``PatchCodec`` (default, no weights): pixel patches scaled to [-1, 1].
- ``VAECodec``: a frozen diffusers ``AutoencoderKL`` loaded from a local path (the paper uses Open-Sora's
  VAE); latents are patchified. Its weights are not part of the PAR checkpoint: the config names the path.
"""

from __future__ import annotations

import torch
from torch import nn

from par_deploy.config import PARConfig
from par_deploy.errors import ConfigError, InputError


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """x ``[B, V, C, H, W]`` -> ``[B, V * (H/p) * (W/p), C * p * p]`` (camera-major, row-major patches)."""
    B, V, C, H, W = x.shape
    x = x.reshape(B, V, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)  # [B, V, h, w, C, p, p]
    return x.reshape(B, V * (H // p) * (W // p), C * p * p)


def unpatchify(t: torch.Tensor, V: int, C: int, H: int, W: int, p: int) -> torch.Tensor:
    B = t.shape[0]
    x = t.reshape(B, V, H // p, W // p, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # [B, V, C, h, p, w, p]
    return x.reshape(B, V, C, H, W)


def check_rgb(rgb: torch.Tensor, cfg: PARConfig, name: str = "rgb") -> None:
    expected = (cfg.num_cameras, cfg.image_size, cfg.image_size, 3)
    if rgb.dtype != torch.uint8:
        raise InputError(f"{name}: expected dtype uint8, found {rgb.dtype}")
    if tuple(rgb.shape[-4:]) != expected:
        raise InputError(f"{name}: expected trailing shape {expected} [cameras, H, W, 3], found {tuple(rgb.shape)}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[B, V, 3, H, W]`` in [-1, 1] -> uint8 ``[B, V, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)


class PatchCodec(nn.Module):
    """Input tokens: pixel patches of side p. Targets: the same patches of the frame mean-pooled by
    ``target_pool`` (side p / pool), so token i of the input and of the target cover the same image region."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.cfg = cfg

    def _pixels(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # [B, V, 3, H, W]

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, V, H, W, 3]`` -> float ``[B, K_o, 3 p^2]`` in [-1, 1] (p: the video patch)."""
        return patchify(self._pixels(rgb), self.cfg.video_patch)

    def encode_target(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, V, H, W, 3]`` -> float ``[B, K_o, 3 (p/pool)^2]``: the de-tokenizer's targets."""
        x = self._pixels(rgb)
        k = self.cfg.target_pool
        if k > 1:
            B, V = x.shape[:2]
            x = torch.nn.functional.avg_pool2d(x.flatten(0, 1), k).unflatten(0, (B, V))
        return patchify(x, self.cfg.target_patch)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target tokens -> uint8 ``[B, V, H, W, 3]`` (pooled frames shown at full size)."""
        c = self.cfg
        side = c.image_size // c.target_pool
        x = unpatchify(tokens, c.num_cameras, 3, side, side, c.target_patch)  # [B, V, 3, h, w]
        x = x.repeat_interleave(c.target_pool, dim=3).repeat_interleave(c.target_pool, dim=4)
        return _to_uint8(x)


class VAECodec(nn.Module):
    def __init__(self, cfg: PARConfig, load: bool = True):
        super().__init__()
        self.cfg = cfg
        self.scale = 1.0
        if not load:  # shapes only (parameter counts on the meta device); encode/decode need the weights
            object.__setattr__(self, "vae", None)
            return
        if not cfg.vae_path:
            raise ConfigError("codec 'vae' needs config.vae_path (a local diffusers AutoencoderKL directory)")
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.vae_path).eval().requires_grad_(False)
        if vae.config.latent_channels != cfg.vae_latent_channels:
            raise ConfigError(
                f"{cfg.vae_path}: latent_channels {vae.config.latent_channels} != config {cfg.vae_latent_channels}"
            )
        object.__setattr__(self, "vae", vae)  # frozen, loaded from its own path: not in the PAR state dict
        self.scale = float(vae.config.scaling_factor)

    def _require(self) -> None:
        if self.vae is None:
            raise ConfigError("this model was built with load_frozen=False: the VAE is not loaded")

    @torch.no_grad()
    def latents(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, V, H, W, 3]`` -> scaled latents ``[B, V, c, h, w]``."""
        self._require()
        B, V = rgb.shape[:2]
        x = rgb.permute(0, 1, 4, 2, 3).flatten(0, 1).float() / 127.5 - 1.0  # [B*V, 3, H, W]
        z = self.vae.encode(x).latent_dist.mean * self.scale  # [B*V, c, h, w]
        return z.reshape(B, V, *z.shape[1:])

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """Input tokens on the video patch grid ``[B, K_o, c p_v^2]``."""
        return patchify(self.latents(rgb), self.cfg.video_patch)

    def encode_target(self, rgb: torch.Tensor) -> torch.Tensor:
        """Target tokens on the image patch grid ``[B, K_target, c p^2]``."""
        return patchify(self.latents(rgb), self.cfg.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._require()
        c = self.cfg
        z = unpatchify(tokens, c.num_cameras, c.latent_channels, c.latent_size, c.latent_size, c.patch_size)
        B = z.shape[0]
        x = self.vae.decode(z.flatten(0, 1) / self.scale).sample  # [B*V, 3, H, W]
        return _to_uint8(x.reshape(B, c.num_cameras, *x.shape[1:]))


def make_codec(cfg: PARConfig, load_frozen: bool = True) -> nn.Module:
    return PatchCodec(cfg) if cfg.codec == "patch" else VAECodec(cfg, load_frozen)


def sincos_2d(side: int, dim: int, cameras: int = 1) -> torch.Tensor:
    """NOVA's fixed 2-D position embedding (``PosEmbed.get_space_embed`` at its base size) of a row-major
    ``side x side`` grid: ``[sin(w f), cos(w f), sin(h f), cos(h f)]``, ``f_i = 10000^(-i / (dim/4))``; the same
    rows again for every further camera. Returns ``[cameras * side^2, dim]``."""
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # [dim/4]
    grid = torch.arange(side, dtype=torch.float32)
    h = grid.repeat_interleave(side)[:, None] * freq  # [side^2, dim/4]: row index
    w = grid.repeat(side)[:, None] * freq  # column index
    return torch.cat([w.sin(), w.cos(), h.sin(), h.cos()], dim=-1).repeat(cameras, 1)


def position_table(module: nn.Module, cfg: PARConfig, tokens: int, side: int) -> None:
    """``module.pos`` ``[tokens, D]``: learned (saved in the checkpoint) or NOVA's fixed sin-cos (a buffer that
    is not saved, so the state dict holds exactly NOVA's keys)."""
    if cfg.pos_embed == "sincos":
        module.register_buffer("pos", sincos_2d(side, cfg.dim, cfg.num_cameras), persistent=False)
    else:
        module.pos = nn.Parameter(torch.randn(tokens, cfg.dim) * 0.02)


class FrameEmbed(nn.Module):
    """Frame tokens -> model width (NOVA's video ``patch_embed``, a convolution written as a linear layer over
    the ``(C, p, p)`` patch), plus a (camera, patch) position embedding (``config.pos_embed``)."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.frame_input_dim, cfg.dim)
        position_table(self, cfg, cfg.frame_tokens, cfg.latent_size // cfg.video_patch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens) + self.pos  # [..., K_o, D]


class ConvFrameEmbed(nn.Module):
    """Frame tokens -> model width through a small conv stem: the tokens are put back into the frame and
    log2(p) stride-2 convolutions bring it down to the same token grid (one output vector per patch).
    A learned, non-linear alternative to the linear patch embedding for small objects in low-resolution frames."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.patch_size.bit_length() - 1  # stride-2 stages
        widths = [cfg.latent_channels] + [min(32 * 2**i, cfg.dim) for i in range(n - 1)] + [cfg.dim]
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.GELU())
        self.stem = nn.Sequential(*layers)
        position_table(self, cfg, cfg.frame_tokens, cfg.latent_size // cfg.patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        lead = tokens.shape[:-2]
        S = c.latent_size
        x = unpatchify(tokens.reshape(-1, *tokens.shape[-2:]), c.num_cameras, c.latent_channels, S, S, c.patch_size)
        B = x.shape[0]
        y = self.stem(x.flatten(0, 1))  # [B*V, D, S/p, S/p]
        y = y.flatten(2).transpose(1, 2).reshape(B, c.frame_tokens, c.dim)  # camera-major, row-major patches
        return (y + self.pos).reshape(*lead, c.frame_tokens, c.dim)


def make_frame_embed(cfg: PARConfig) -> nn.Module:
    return ConvFrameEmbed(cfg) if cfg.frame_embed == "conv" else FrameEmbed(cfg)


class ActionTokenizer(nn.Module):
    """One token per action of the chunk: MLP ``A -> hidden -> D`` plus a learned index embedding."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        hidden = cfg.action_tokenizer_hidden
        self.mlp = nn.Sequential(nn.Linear(cfg.action_dim, hidden), nn.SiLU(), nn.Linear(hidden, cfg.dim))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        return self.mlp(actions)  # [..., L, A] -> [..., L, D]


class StateTokenizer(nn.Module):
    """Embodiment/task state (proprioception, goal position...) -> one token of the observation part."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.state_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.mlp(state).unsqueeze(-2)  # [..., S] -> [..., 1, D]


class LearnedText(nn.Module):
    """K_t learned tokens per instruction of ``config.instructions`` (the default: no text model needed)."""

    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.instructions = list(cfg.instructions)
        self.tokens = nn.Parameter(torch.randn(len(cfg.instructions), cfg.num_text_tokens, cfg.dim) * 0.02)

    def forward(self, instructions: list[str]) -> torch.Tensor:
        idx = []
        for s in instructions:
            if s not in self.instructions:
                raise InputError(f"unknown instruction {s!r}; this model knows {self.instructions}")
            idx.append(self.instructions.index(s))
        return self.tokens[torch.tensor(idx, device=self.tokens.device)]  # [B, K_t, D]


class EncodedText(nn.Module):
    """A frozen Hugging Face text encoder + a trained projector (NOVA: Phi-2 + ``TextEmbed``).

    The encoder is loaded from ``config.text_encoder_path`` (local files only) and is not saved in the PAR
    checkpoint. Its last hidden states are padded/truncated to K_t tokens. ``config.text_embed``:
    ``"linear"``: a linear projection of all K_t states (padding positions included); ``"nova"``: NOVA's
    ``TextEmbed``, a projection followed by a LayerNorm, where positions past the prompt's end take NOVA's fixed
    features (``pad``, NOVA's ``text_embed.weight`` buffer) instead of the encoder's padding states.
    """

    def __init__(self, cfg: PARConfig, load: bool = True):
        super().__init__()
        self.num_tokens = cfg.num_text_tokens
        self.proj = nn.Linear(cfg.text_encoder_dim, cfg.dim)
        if cfg.text_embed == "nova":
            self.norm = nn.LayerNorm(cfg.dim)
            self.register_buffer("pad", torch.randn(cfg.num_text_tokens, cfg.text_encoder_dim) * 0.02)
        if not load:  # shapes only; forward needs the encoder
            object.__setattr__(self, "encoder", None)
            return
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError("config.text_encoder_path needs the 'text' extra: pip install 'par-deploy[text]'") from e
        enc = AutoModel.from_pretrained(cfg.text_encoder_path, local_files_only=True).eval().requires_grad_(False)
        hidden = getattr(enc.config, "hidden_size", None)
        if hidden != cfg.text_encoder_dim:
            raise ConfigError(f"{cfg.text_encoder_path}: hidden size {hidden} != config.text_encoder_dim")
        object.__setattr__(self, "encoder", enc)
        tokenizer = AutoTokenizer.from_pretrained(cfg.text_encoder_path, local_files_only=True)
        object.__setattr__(self, "tokenizer", tokenizer)

    def forward(self, instructions: list[str]) -> torch.Tensor:
        if self.encoder is None:
            raise ConfigError("this model was built with load_frozen=False: the text encoder is not loaded")
        tok = self.tokenizer(
            list(instructions), padding="max_length", truncation=True, max_length=self.num_tokens, return_tensors="pt"
        )
        with torch.no_grad():
            h = self.encoder(**tok.to(self.proj.weight.device)).last_hidden_state  # [B, K_t, enc_dim]
        if hasattr(self, "pad"):  # NOVA: the encoder's states up to the prompt's length, fixed features after
            h = torch.where(tok["attention_mask"].bool()[..., None], h, self.pad.to(h.dtype))
        return self.project(h)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B, K_t, enc_dim]`` -> prefix tokens ``[B, K_t, D]``."""
        h = self.proj(h)
        return self.norm(h) if hasattr(self, "norm") else h


def make_text(cfg: PARConfig, load_frozen: bool = True) -> nn.Module:
    return EncodedText(cfg, load_frozen) if cfg.text_encoder_path else LearnedText(cfg)
