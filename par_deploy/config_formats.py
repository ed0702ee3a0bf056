"""What older ``config.json`` formats implied for the fields they did not list (read by ``PARConfig.from_dict``).

Format 1 (before 2026-11-25) let a missing field take the dataclass default. These are the values format-1
files were written against, frozen here so that a later change of a default cannot change an old checkpoint;
format 2 listed every field but ``exec_len``.
A data table: it changes only if a format-1 checkpoint turns out to have meant something else.
"""

from __future__ import annotations

from typing import Any

FORMAT_1_IMPLIED: dict[str, Any] = {
    "image_size": 64,
    "num_cameras": 1,
    "action_dim": 4,
    "state_dim": 0,
    "chunk_len": 8,
    "max_blocks": 32,
    "instructions": ["push the cube to the goal region"],
    "num_text_tokens": 4,
    "text_encoder_path": None,
    "text_encoder_dim": 0,
    "codec": "patch",
    "patch_size": 16,
    "target_pool": 2,
    "frame_embed": "linear",
    "vae_path": None,
    "vae_latent_channels": 4,
    "vae_downsample": 8,
    "dim": 256,
    "depth": 6,
    "heads": 4,
    "mlp_ratio": 4.0,
    "rope_theta_frame": 100.0,
    "rope_theta_action": 10000.0,
    "spatial_depth": 2,
    "frame_head_width": 384,
    "frame_head_depth": 2,
    "frame_mask_min": 0.7,
    "frame_decode_sets": 4,
    "frame_head": True,
    "dit_dim": 256,
    "dit_depth": 3,
    "dit_heads": 4,
    "action_tokenizer_hidden": 256,
    "train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2",
    "diffusion_batch_mul": 4,
    "sampler": "ddim",
    "sample_steps": 10,
    "frame_loss_weight": 1.0,
    "action_loss_weight": 1.0,
    "variant": "full",
    "extra": {},
    # fields added with format 2: the behaviour every format-1 checkpoint was trained with
    "overflow": "error",
    "block_norm": "pre",
    "activation": "gelu_tanh",
    "text_attention": "causal",
    "text_embed": "linear",
    "video_patch_size": 0,
    "pos_embed": "learned",
    "spatial_cond": "add",
    "frame_mlp": "mar",
}
# Format 2 (2026-11-25 .. 2026-12-08) listed every field but ``exec_len`` (added with format 3).
FORMAT_2_IMPLIED: dict[str, Any] = {"exec_len": 0}
FORMAT_1_IMPLIED.update(FORMAT_2_IMPLIED)
# older format -> values it implied
IMPLIED_BY_FORMAT: dict[int, dict[str, Any]] = {1: FORMAT_1_IMPLIED, 2: FORMAT_2_IMPLIED}
