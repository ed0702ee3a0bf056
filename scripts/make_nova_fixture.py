"""Write the NOVA conformance fixture (tests/fixtures/nova/) by running NOVA's own modules.

NOVA's code is not part of this project: pass the directory that holds NOVA's ``diffnext`` package (a checkout
of github.com/baaivision/NOVA). The script builds NOVA's ``NOVATransformer3DModel`` at a tiny size with random
weights (NOVA's registries get tiny ``arch`` entries pointing at NOVA's own builder functions), runs its
temporal transformer (``video_encoder``), spatial transformer (``image_encoder``) and diffusion MLP
(``image_decoder``) on random inputs, and saves:

- ``transformer/``: NOVA's ``save_pretrained`` output (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  the same layout as a released NOVA pipeline's ``transformer/`` folder;
- ``io.safetensors``: the inputs and NOVA's outputs.

    python scripts/make_nova_fixture.py --nova-src /path/to/NOVA --out tests/fixtures/nova
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# The fixture's sizes (tests/test_nova.py builds the matching PAR config from transformer/config.json).
DIM, HEADS, DEPTH, SPATIAL_DEPTH, MLP_DEPTH, MLP_WIDTH = 32, 2, 2, 4, 2, 48
TEXT_DIM, TEXT_LEN, LATENT_CHANNELS, IMAGE_SIZE, STRIDE = 24, 6, 4, 64, 8
FRAMES, BATCH, KNOWN = 3, 2, 6


def build_nova(nova_src: Path):
    sys.path.insert(0, str(nova_src))
    from diffnext.models.transformers import transformer_nova as tn

    tn.VIDEO_ENCODERS.register(f"vit_d{DEPTH}w{DIM}", tn.video_encoder, depth=DEPTH, embed_dim=DIM, num_heads=HEADS)
    tn.IMAGE_ENCODERS.register(
        f"vit_d{SPATIAL_DEPTH}w{DIM}", tn.image_encoder, depth=SPATIAL_DEPTH, embed_dim=DIM, num_heads=HEADS
    )
    tn.IMAGE_DECODERS.register(f"mlp_d{MLP_DEPTH}w{MLP_WIDTH}", tn.image_decoder, depth=MLP_DEPTH, embed_dim=MLP_WIDTH)
    grid = IMAGE_SIZE // STRIDE  # latent side
    model = tn.NOVATransformer3DModel(
        image_dim=LATENT_CHANNELS,
        image_size=IMAGE_SIZE,
        image_stride=STRIDE,
        text_token_dim=TEXT_DIM,
        text_token_len=TEXT_LEN,
        image_base_size=[grid // 2, grid // 2],
        video_base_size=[FRAMES, grid // 4, grid // 4],
        arch=[f"vit_d{DEPTH}w{DIM}", f"vit_d{SPATIAL_DEPTH}w{DIM}", f"mlp_d{MLP_DEPTH}w{MLP_WIDTH}"],
    )
    return model.eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial norms and biases, so that a moved norm or a changed activation shows in the outputs."""
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight") and p.dim() == 1:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias") or p.dim() < 2:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.mul_(1.5)  # a little above the default init, to make the GELU's non-linearity matter


@torch.no_grad()
def run_temporal(model, g) -> dict[str, torch.Tensor]:
    """NOVA's video encoder over [text; frame 0; frame 1; ...] with NOVA's block mask (train_video's path),
    the frames embedded by the video patch embedding plus NOVA's spatial sin-cos position embedding."""
    text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    video = torch.randn(BATCH, LATENT_CHANNELS, FRAMES, IMAGE_SIZE // STRIDE, IMAGE_SIZE // STRIDE, generator=g)
    c_text = model.text_embed(text)  # [B, K_t, D]
    c = model.video_encoder.patch_embed(video)  # [B, T, hw, D]
    c = c + model.video_pos_embed.get_space_embed(c.device, c.dtype)
    mask = model.mask_embed.get_attn_mask(c, c_text)
    for blk in model.video_encoder.blocks:
        blk.attn.attn_mask = mask
    out = model.video_encoder(c.flatten(1, 2), c_text)  # [B, T*hw, D]
    for blk in model.video_encoder.blocks:
        blk.attn.attn_mask = None
    return {"temporal.text": text, "temporal.video": video, "temporal.text_embed": c_text, "temporal.out": out}


@torch.no_grad()
def run_spatial(model, g, known: int, tag: str) -> dict[str, torch.Tensor]:
    """NOVA's image encoder as in generate_frame: masked tokens, the known set ``prev_ids``, condition c."""
    grid = IMAGE_SIZE // STRIDE
    tokens = (grid // 2) ** 2
    x = torch.randn(BATCH, LATENT_CHANNELS, grid, grid, generator=g)
    cond = torch.randn(BATCH, (grid // 4) ** 2, DIM, generator=g)
    prev_ids = torch.stack([torch.randperm(tokens, generator=g)[:known] for _ in range(BATCH)])[..., None]
    me = model.mask_embed
    me.mask = torch.ones(BATCH, tokens, 1).scatter(1, prev_ids, 0)
    z = me.apply_mask(model.image_encoder.patch_embed(x))
    out = model.image_encoder(z, cond, prev_ids)  # [B, tokens, D]
    me.mask = None
    return {f"{tag}.x": x, f"{tag}.cond": cond, f"{tag}.known_ids": prev_ids[..., 0], f"{tag}.out": out}


@torch.no_grad()
def run_mlp(model, g) -> dict[str, torch.Tensor]:
    grid = IMAGE_SIZE // STRIDE
    tokens = (grid // 2) ** 2
    x = torch.randn(BATCH, LATENT_CHANNELS, grid, grid, generator=g)
    t = torch.randint(0, 1000, (BATCH, tokens), generator=g)
    z = torch.randn(BATCH, tokens, DIM, generator=g)
    out = model.image_decoder(x, t, z)  # [B, tokens, p*p*C] in NOVA's patchify order
    return {"mlp.x": x, "mlp.t": t, "mlp.z": z, "mlp.out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nova-src", type=Path, required=True, help="directory holding NOVA's diffnext package")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = build_nova(args.nova_src)
    randomize(model, g)
    io = {
        **run_temporal(model, g),
        **run_spatial(model, g, 0, "spatial0"),
        **run_spatial(model, g, KNOWN, "spatial"),
        **run_mlp(model, g),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "transformer")
    save_file({k: v.contiguous() for k, v in io.items()}, str(args.out / "io.safetensors"))
    commit = subprocess.run(["git", "-C", str(args.nova_src), "rev-parse", "HEAD"], capture_output=True, text=True)
    print(f"NOVA commit: {commit.stdout.strip() or 'unknown (not a git checkout)'}")
    print(f"wrote {args.out}: {len(model.state_dict())} NOVA tensors, {len(io)} input/output tensors")


if __name__ == "__main__":
    main()
