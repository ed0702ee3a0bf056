"""Load a NOVA-format transformer state dict into PAR's backbone (paper §4.2: PAR is built on NOVA).

NOVA's ``Transformer3DModel`` has ``video_encoder`` (the temporal, causal transformer), ``image_encoder``
(the spatial set-by-set transformer), ``image_decoder`` (the per-token diffusion MLP), ``mask_embed`` and
``text_embed``. Block internals follow the timm ViT naming (``blocks.i.norm1 / attn.qkv / attn.proj / norm2 /
mlp.fc1 / mlp.fc2``), the diffusion MLP MAR's ``SimpleMLPAdaLN`` naming. PAR uses the same block layout, so
the mapping is a renaming plus reshaping the patch-embedding convolutions into linear layers.

The weights cannot be downloaded on the build machine; tests/test_nova.py writes a small checkpoint in
this naming and checks that every tensor lands where it should.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from par_deploy.errors import CheckpointError
from par_deploy.model.par import PARModel

_RULES: list[tuple[str, str]] = [
    (r"video_encoder\.blocks\.(\d+)\.(.+)", r"transformer.blocks.\1.\2"),
    (r"video_encoder\.norm\.(weight|bias)", r"transformer.norm.\1"),
    (r"video_encoder\.patch_embed\.proj\.(weight|bias)", r"frame_embed.proj.\1"),
    (r"image_encoder\.blocks\.(\d+)\.(.+)", r"frame_head.spatial.blocks.\1.\2"),
    (r"image_encoder\.norm\.(weight|bias)", r"frame_head.spatial.norm.\1"),
    (r"image_encoder\.patch_embed\.proj\.(weight|bias)", r"frame_head.patch_embed.\1"),
    (r"mask_embed\.mask_token", r"frame_head.mask_token"),
    (r"text_embed\.proj\.(weight|bias)", r"text.proj.\1"),
    (r"image_decoder\.time_embed\.mlp\.(\d)\.(weight|bias)", r"frame_head.mlp.time.mlp.\1.\2"),
    (r"image_decoder\.cond_embed\.(weight|bias)", r"frame_head.mlp.cond.\1"),
    (r"image_decoder\.input_proj\.(weight|bias)", r"frame_head.mlp.inp.\1"),
    (r"image_decoder\.res_blocks\.(\d+)\.in_ln\.(weight|bias)", r"frame_head.mlp.blocks.\1.in_ln.\2"),
    (r"image_decoder\.res_blocks\.(\d+)\.mlp\.(\d)\.(weight|bias)", r"frame_head.mlp.blocks.\1.mlp.\2.\3"),
    (r"image_decoder\.res_blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"frame_head.mlp.blocks.\1.ada.1.\2"),
    (r"image_decoder\.final_layer\.adaLN_modulation\.1\.(weight|bias)", r"frame_head.mlp.ada.1.\1"),
    (r"image_decoder\.final_layer\.linear\.(weight|bias)", r"frame_head.mlp.out.\1"),
]


@dataclass
class NovaLoadReport:
    loaded: list[str] = field(default_factory=list)  # PAR keys taken from the NOVA checkpoint
    ignored: list[str] = field(default_factory=list)  # NOVA keys PAR has no place for
    not_covered: list[str] = field(default_factory=list)  # PAR keys left at their initialisation


def nova_to_par_key(key: str) -> str | None:
    key = key.removeprefix("transformer.")
    for pattern, repl in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def read_nova_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a NOVA pipeline/transformer directory holding one."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "transformer" / "diffusion_pytorch_model.safetensors",
                      path / "diffusion_pytorch_model.safetensors"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"{path}: no NOVA weights (looked for {[str(c) for c in candidates]})")
        path = found[0]
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: cannot read NOVA weights ({e})") from None


def load_nova_weights(model: PARModel, nova: dict[str, torch.Tensor] | str | Path) -> NovaLoadReport:
    """Copy every NOVA tensor PAR has a place for into ``model`` (in place); shapes must match exactly."""
    sd = read_nova_state_dict(nova) if not isinstance(nova, dict) else nova
    own = model.state_dict()
    report = NovaLoadReport()
    updates = {}
    for key, tensor in sd.items():
        target = nova_to_par_key(key)
        if target is None or target not in own:
            report.ignored.append(key)
            continue
        if tensor.dim() == 4 and own[target].dim() == 2:  # patch-embedding conv [D, C, p, p] -> linear [D, C*p*p]
            tensor = tensor.flatten(1)
        if tensor.shape != own[target].shape:
            raise CheckpointError(
                f"NOVA tensor {key!r} -> {target!r}: shape {tuple(tensor.shape)} does not fit PAR's "
                f"{tuple(own[target].shape)}; the PAR config (dim, depth, patch size) must match the NOVA model"
            )
        updates[target] = tensor.to(own[target].dtype)
    if not updates:
        raise CheckpointError("no tensor of the NOVA checkpoint matched PAR's backbone; is this a NOVA transformer?")
    model.load_state_dict(updates, strict=False)
    report.loaded = sorted(updates)
    report.not_covered = sorted(set(own) - set(updates))
    return report
