"""NOVA-format weights land in PAR's backbone (a small checkpoint written in NOVA's naming)."""

import pytest
import torch
from safetensors.torch import save_file

from par_deploy.config import preset
from par_deploy.errors import CheckpointError
from par_deploy.model.par import PARModel
from par_deploy.nova import load_nova_weights, nova_to_par_key


def nova_state_dict(cfg, seed=0):
    """What NOVA's Transformer3DModel state dict looks like for a model of this config's sizes."""
    g = torch.Generator().manual_seed(seed)
    D, C, p = cfg.dim, cfg.latent_channels, cfg.patch_size
    sd = {}

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def vit(prefix, depth, patch, channels):
        for i in range(depth):
            b = f"{prefix}.blocks.{i}."
            for name, out_dim, in_dim in (("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("mlp.fc1", 4 * D, D),
                                          ("mlp.fc2", D, 4 * D)):
                sd[b + name + ".weight"], sd[b + name + ".bias"] = r(out_dim, in_dim), r(out_dim)
            for norm in ("norm1", "norm2"):
                sd[b + norm + ".weight"], sd[b + norm + ".bias"] = r(D), r(D)
        sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"] = r(D), r(D)
        sd[f"{prefix}.patch_embed.proj.weight"] = r(D, channels, patch, patch)
        sd[f"{prefix}.patch_embed.proj.bias"] = r(D)

    vit("video_encoder", cfg.depth, p, C)
    vit("image_encoder", cfg.spatial_depth, cfg.target_patch, C)
    W = cfg.frame_head_width
    sd["image_decoder.time_embed.mlp.0.weight"] = torch.randn(W, 256, generator=g)
    sd["image_decoder.cond_embed.weight"] = torch.randn(W, D, generator=g)
    sd["image_decoder.res_blocks.0.adaLN_modulation.1.weight"] = torch.randn(3 * W, W, generator=g)
    sd["mask_embed.mask_token"] = torch.randn(D, generator=g)
    sd["mask_embed.bos_token"] = torch.randn(1, 1, D, generator=g)  # NOVA's BOV token: no place in PAR
    sd["video_encoder.mixer.weight"] = torch.randn(D, generator=g)
    return sd


def test_nova_weights_land_in_the_backbone(tmp_path):
    cfg = preset("tiny")
    model = PARModel(cfg)
    sd = nova_state_dict(cfg)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    report = load_nova_weights(model, tmp_path)
    own = model.state_dict()
    for key, tensor in sd.items():
        target = nova_to_par_key(key)
        if target in own:
            assert torch.equal(own[target], tensor.flatten(1) if tensor.dim() == 4 else tensor), key
    assert "mask_embed.bos_token" in report.ignored and "video_encoder.mixer.weight" in report.ignored
    assert "transformer.blocks.1.attn.qkv.weight" in report.loaded
    assert "action_head.out.weight" in report.not_covered  # PAR's new modules keep their initialisation


def test_nova_of_another_size_is_refused():
    model = PARModel(preset("tiny"))
    with pytest.raises(CheckpointError, match=r"video_encoder.blocks.0.attn.qkv.weight.*\(192, 64\).*\(96, 32\)"):
        load_nova_weights(model, nova_state_dict(preset("tiny", dim=64)))
    with pytest.raises(CheckpointError, match="no tensor"):
        load_nova_weights(model, {"foo": torch.zeros(1)})
