"""Load a NOVA transformer checkpoint (github.com/baaivision/NOVA, ``NOVATransformer3DModel``) into PAR.

PAR's ``paper`` preset is NOVA's architecture block for block (config.py: ``block_norm "post"``, exact GELU,
video/image patch sizes, ``text_embed "nova"``, ``pos_embed "sincos"``, ``spatial_cond "prepend"``,
``frame_mlp "nova"``, ``text_attention "first_frame"``), so NOVA's weights give NOVA's function; PAR's
additions (state token, action tokenizer, BOA block, Action-DiT, RoPE over time) start from their
initialisation. tests/test_nova.py checks this on a fixture written by NOVA's own code.

Every NOVA key is either loaded (``_RULES``: a renaming plus, for a few keys, a documented reshaping) or
ignored for a stated reason (``IGNORED``); any other key is an error, and so is a NOVA part of the PAR model
that the checkpoint does not fill.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from par_deploy.config import PARConfig
from par_deploy.errors import CheckpointError, ConfigError
from par_deploy.model.par import PARModel

Transform = Callable[[torch.Tensor, PARConfig], torch.Tensor]


def _conv_to_linear(t: torch.Tensor, cfg: PARConfig) -> torch.Tensor:
    """Patch convolution ``[D, C, p, p]`` -> linear ``[D, C*p*p]`` (PAR's tokens are ``(C, p, p)`` patches)."""
    return t.flatten(1) if t.dim() == 4 else t


def _head_rows(t: torch.Tensor, cfg: PARConfig) -> torch.Tensor:
    """NOVA's diffusion head predicts a token in its patchify order ``(p, p, C)``; PAR's tokens are ``(C, p, p)``."""
    p, C = cfg.patch_size, cfg.latent_channels
    if t.shape[0] != p * p * C:
        raise CheckpointError(
            f"NOVA diffusion head has {t.shape[0]} outputs; PAR expects {p}*{p}*{C} (patch_size, latent channels)"
        )
    return t.reshape(p, p, C, *t.shape[1:]).movedim(2, 0).reshape(t.shape)


def _squeeze_token(t: torch.Tensor, cfg: PARConfig) -> torch.Tensor:
    return t.reshape(-1)  # NOVA's mask token is [1, D]


def _first_rows(t: torch.Tensor, cfg: PARConfig) -> torch.Tensor:
    """NOVA's fixed text features ``[512, enc_dim]``: the first K_t rows are the ones NOVA uses."""
    if t.shape[0] < cfg.num_text_tokens:
        raise CheckpointError(f"NOVA text_embed.weight has {t.shape[0]} rows, fewer than num_text_tokens")
    return t[: cfg.num_text_tokens]


_RULES: list[tuple[str, str, Transform | None]] = [
    (r"video_encoder\.blocks\.(\d+)\.(.+)", r"transformer.blocks.\1.\2", None),
    (r"video_encoder\.norm\.(weight|bias)", r"transformer.norm.\1", None),
    (r"video_encoder\.patch_embed\.proj\.(weight|bias)", r"frame_embed.proj.\1", _conv_to_linear),
    (r"image_encoder\.blocks\.(\d+)\.(.+)", r"frame_head.spatial.blocks.\1.\2", None),
    (r"image_encoder\.norm\.(weight|bias)", r"frame_head.spatial.norm.\1", None),
    (r"image_encoder\.patch_embed\.proj\.(weight|bias)", r"frame_head.patch_embed.\1", _conv_to_linear),
    (r"image_decoder\.patch_embed\.proj\.(weight|bias)", r"frame_head.mlp.patch_embed.proj.\1", _conv_to_linear),
    (r"image_decoder\.head\.(weight|bias)", r"frame_head.mlp.head.\1", _head_rows),
    (r"image_decoder\.((?:time_cond_embed|blocks|norm)\..+)", r"frame_head.mlp.\1", None),
    (r"mask_embed\.mask_token", r"frame_head.mask_token", _squeeze_token),
    (r"text_embed\.(proj|norm)\.(weight|bias)", r"text.\1.\2", None),
    (r"text_embed\.weight", r"text.pad", _first_rows),
]

IGNORED: list[tuple[str, str]] = [
    (
        r"mask_embed\.bos_token",
        "NOVA's begin-of-video token stands in for the unseen first frame of text-to-video "
        "generation; PAR's block 0 holds the real first observation O_0",
    ),
    (
        r"video_pos_embed\.(time_proj\.\d|norm)\.(weight|bias)",
        "NOVA's absolute time embedding; PAR encodes time "
        "with RoPE over the block index (paper §5.1), for frame and action tokens",
    ),
    (
        r"motion_embed\..+",
        "NOVA's motion-flow and fps condition tokens of text-to-video sampling; PAR's prefix is the instruction only",
    ),
    (r"label_embed\..+", "class-label conditioning of NOVA's class-to-image models; PAR conditions on text"),
]

NOVA_PARTS = ("transformer.", "frame_embed.", "frame_head.", "text.")  # PAR keys a NOVA checkpoint must fill


@dataclass
class NovaLoadReport:
    loaded: list[tuple[str, str]] = field(default_factory=list)  # (NOVA key, PAR key)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (NOVA key, reason)
    new: list[str] = field(default_factory=list)  # PAR keys left at their initialisation (PAR's additions)


def nova_rule(key: str) -> tuple[str, Transform | None] | None:
    """The PAR key (and reshaping) of a NOVA key, or None."""
    key = key.removeprefix("transformer.")
    for pattern, repl, transform in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key), transform
    return None


def ignore_reason(key: str) -> str | None:
    key = key.removeprefix("transformer.")
    return next((reason for pattern, reason in IGNORED if re.fullmatch(pattern, key)), None)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    name = "diffusion_pytorch_model.safetensors"
    candidates = [path / "transformer" / name, path / name]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise CheckpointError(f"{path}: no NOVA weights (looked for {[str(c) for c in candidates]})")
    return found[0]


def read_nova_config(path: str | Path) -> dict | None:
    """NOVA's transformer ``config.json`` beside the weights, if there is one."""
    path = Path(path)
    folder = _weights_file(path).parent
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def read_nova_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a NOVA pipeline/transformer directory holding one."""
    file = _weights_file(Path(path))
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: cannot read NOVA weights ({e})") from None


def check_nova_config(nova: dict) -> None:
    """Refuse the NOVA variants PAR does not replicate, instead of loading them into different computations."""
    if nova.get("video_mixer_rank"):
        raise CheckpointError(
            "this NOVA model has a video mixer (video_mixer_rank set): PAR's paper preset does not "
            "implement it; its weights would be dropped and the function change"
        )
    if nova.get("rotary_pos_embed"):
        raise CheckpointError(
            "this NOVA model uses 3-D rotary positions (rotary_pos_embed): PAR's paper preset "
            "replicates NOVA's sin-cos position variant"
        )


def _convert(key: str, tensor: torch.Tensor, own: dict[str, torch.Tensor], cfg: PARConfig) -> tuple[str, torch.Tensor]:
    target, transform = nova_rule(key)
    if target not in own:
        raise CheckpointError(
            f"NOVA tensor {key!r} -> {target!r}: this PAR model has no such parameter; build it with NOVA's "
            "architecture choices (the paper preset: frame_mlp 'nova', text_embed 'nova', a text encoder, ...)"
        )
    tensor = transform(tensor, cfg) if transform else tensor
    if tensor.shape != own[target].shape:
        raise CheckpointError(
            f"NOVA tensor {key!r} -> {target!r}: shape {tuple(tensor.shape)} does not fit PAR's "
            f"{tuple(own[target].shape)}; the PAR config (dim, depth, patch sizes, widths) must match the NOVA model"
        )
    return target, tensor.to(own[target].dtype)


def load_nova_weights(model: PARModel, nova: dict[str, torch.Tensor] | str | Path) -> NovaLoadReport:
    """Copy a NOVA checkpoint into ``model`` (in place). Every NOVA key is loaded or ignored for a listed reason;
    an unknown key, a shape mismatch or a NOVA part of ``model`` left unfilled is a ``CheckpointError``."""
    if not isinstance(nova, dict):
        config = read_nova_config(nova)
        if config is not None:
            check_nova_config(config)
        nova = read_nova_state_dict(nova)
    if "video_pos_embed.time_proj.0.weight" not in {k.removeprefix("transformer.") for k in nova}:
        check_nova_config({"rotary_pos_embed": True})  # only the rotary variant has no video_pos_embed weights
    own = model.state_dict()
    report, updates = NovaLoadReport(), {}
    unknown = []
    for key, tensor in sorted(nova.items()):
        reason = ignore_reason(key)
        if reason is not None:
            report.ignored.append((key, reason))
        elif nova_rule(key) is None:
            unknown.append(key)
        else:
            target, updates[target] = _convert(key, tensor, own, model.cfg)
            report.loaded.append((key, target))
    if unknown:
        raise CheckpointError(
            f"NOVA keys PAR neither loads nor knows a reason to ignore: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}; is this a NOVA transformer checkpoint?"
        )
    unfilled = sorted(k for k in own if k.startswith(NOVA_PARTS) and k not in updates)
    if unfilled:
        raise CheckpointError(
            f"the NOVA checkpoint does not fill these NOVA parts of the PAR model: {unfilled[:8]}"
            f"{' ...' if len(unfilled) > 8 else ''}"
        )
    model.load_state_dict(updates, strict=False)
    report.new = sorted(set(own) - set(updates))
    return report


# --------------------------------------------------------------------------------------------------------
# A PAR config for a NOVA checkpoint

NOVA_HEADS = {768: 12, 1024: 16, 1536: 16}  # transformer_nova.py's registered widths


def _arch(name: str, kind: str) -> tuple[int, int]:
    m = re.fullmatch(rf"{kind}_d(\d+)w(\d+)", name or "")
    if not m:
        raise ConfigError(f"NOVA arch entry {name!r} is not of the form {kind}_d<depth>w<width>")
    return int(m.group(1)), int(m.group(2))


def nova_config_overrides(nova: dict) -> dict:
    """PAR config fields that NOVA's transformer ``config.json`` fixes (sizes only; the NOVA architecture
    choices come from the paper preset). Heads follow NOVA's registry; other widths need a ``heads`` override."""
    check_nova_config(nova)
    (depth, dim), (spatial_depth, spatial_dim) = _arch(nova["arch"][0], "vit"), _arch(nova["arch"][1], "vit")
    mlp_depth, mlp_width = _arch(nova["arch"][2], "mlp")
    if dim != spatial_dim:
        raise ConfigError(f"NOVA video encoder width {dim} != image encoder width {spatial_dim}; PAR shares one width")
    patch = 15 // nova["image_stride"] + 1  # NOVATransformer3DModel's image patch size
    out = dict(
        dim=dim,
        depth=depth,
        spatial_depth=spatial_depth,
        frame_head_depth=mlp_depth,
        frame_head_width=mlp_width,
        vae_latent_channels=nova["image_dim"],
        vae_downsample=nova["image_stride"],
        patch_size=patch,
        video_patch_size=2 * patch,
    )
    if dim in NOVA_HEADS:
        out["heads"] = NOVA_HEADS[dim]
    if nova.get("text_token_dim"):
        out.update(text_encoder_dim=nova["text_token_dim"], num_text_tokens=nova["text_token_len"])
    return out


def nova_par_config(path: str | Path, preset_name: str = "paper", **overrides) -> PARConfig:
    """The PAR config for the NOVA checkpoint at ``path``: ``preset_name`` with NOVA's sizes, then ``overrides``."""
    from par_deploy.config import preset

    nova = read_nova_config(path)
    if nova is None:
        raise CheckpointError(f"{path}: no NOVA config.json beside the weights; pass a NOVA transformer directory")
    return preset(preset_name, **{**nova_config_overrides(nova), **overrides})


def init_from_nova(
    path: str | Path, out: str | Path, preset_name: str = "paper", seed: int = 0, **overrides
) -> NovaLoadReport:
    """Write a PAR checkpoint at ``out`` whose NOVA parts come from the NOVA checkpoint at ``path`` and whose
    additions (state/action tokenizers, BOA, Action-DiT) are freshly initialised (seed ``seed``). The frozen
    VAE and text encoder are not part of a PAR checkpoint (the config names their paths)."""
    from par_deploy.checkpoint import save_pretrained
    from par_deploy.normalize import Normalizer

    cfg = nova_par_config(path, preset_name, **overrides)
    torch.manual_seed(seed)
    model = PARModel(cfg, load_frozen=False)
    report = load_nova_weights(model, path)
    save_pretrained(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), out)
    return report


def _groups(keys: list[str], depth: int = 2) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k in keys:
        name = ".".join(p for p in k.split(".")[:depth] if not p.isdigit())
        counts[name] = counts.get(name, 0) + 1
    return counts


def format_report(report: NovaLoadReport) -> str:
    """Loaded / new / ignored, by module, for ``par-deploy init --from-nova``."""
    lines = [f"loaded {len(report.loaded)} NOVA tensors:"]
    lines += [f"  {k}: {n}" for k, n in _groups([k for k, _ in report.loaded]).items()]
    lines.append(f"newly initialised (PAR's additions), {len(report.new)} tensors:")
    lines += [f"  {k}: {n}" for k, n in _groups(report.new, 1).items()]
    lines.append(f"ignored {len(report.ignored)} NOVA tensors:")
    by_reason: dict[str, list[str]] = {}
    for key, reason in report.ignored:
        by_reason.setdefault(reason, []).append(key)
    lines += [f"  {', '.join(keys)}: {reason}" for reason, keys in by_reason.items()]
    return "\n".join(lines)
