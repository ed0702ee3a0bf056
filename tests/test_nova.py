"""NOVA conformance: a checkpoint and outputs written by NOVA's own code (tests/fixtures/nova/README.md) load
through the user-facing loader into PAR's NOVA-style modules, which then compute NOVA's outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from par_deploy.config import preset
from par_deploy.errors import CheckpointError
from par_deploy.model.layout import OBS, TEXT, TokenMeta, allowed
from par_deploy.model.par import PARModel
from par_deploy.model.tokenizers import patchify
from par_deploy.nova import load_nova_weights, nova_par_config, read_nova_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
NOVA = FIXTURES / "nova" / "transformer"
TOL = 1e-5
# PAR's own additions at a small size; everything NOVA fixes comes from NOVA's config.json.
SMALL = dict(
    heads=2,
    image_size=64,
    text_encoder_path="phi-2",
    state_dim=3,
    chunk_len=4,
    max_blocks=4,
    dit_dim=32,
    dit_depth=1,
    dit_heads=2,
    action_tokenizer_hidden=32,
)


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURES / "nova" / "io.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    cfg = nova_par_config(NOVA, **SMALL)
    torch.manual_seed(0)
    model = PARModel(cfg, load_frozen=False).eval()
    return model, load_nova_weights(model, NOVA)


def close(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_temporal_transformer_computes_novas_function(loaded, io):
    model, _ = loaded
    cfg = model.cfg
    text = model.text.project(io["temporal.text"])  # [B, K_t, D]
    assert close(text, io["temporal.text_embed"]) < TOL
    video = io["temporal.video"]  # [B, C, T, h, w]
    B, T = video.shape[0], video.shape[2]
    frames = patchify(video.transpose(1, 2), cfg.video_patch).view(B, T, cfg.frame_tokens, -1)  # [B, T, K_o, C p^2]
    x = torch.cat([text, model.frame_embed(frames).flatten(1, 2)], dim=1)
    Kt, n = cfg.num_text_tokens, T * cfg.frame_tokens
    meta = TokenMeta(
        torch.tensor([TEXT] * Kt + [OBS] * n),
        torch.cat([torch.full((Kt,), -1), torch.arange(T).repeat_interleave(cfg.frame_tokens)]),
        torch.cat([torch.arange(Kt), torch.zeros(n, dtype=torch.long)]),
    )
    # NOVA's sequence has no action tokens; RoPE over time is PAR's addition (rope=None: NOVA's function)
    out = model.transformer(x, allowed(meta, meta, cfg.text_attention), rope=None)[:, Kt:]
    assert close(out, io["temporal.out"]) < TOL


@pytest.mark.parametrize("tag", ["spatial0", "spatial"])
@torch.no_grad()
def test_spatial_transformer_computes_novas_function(loaded, io, tag):
    model, _ = loaded
    x = patchify(io[f"{tag}.x"][:, None], model.cfg.patch_size)  # [B, K, C p^2]
    ids = io[f"{tag}.known_ids"]
    known = (
        torch.zeros(x.shape[:2], dtype=torch.bool).scatter(1, ids, True)
        if ids.numel()
        else torch.zeros(x.shape[:2], dtype=torch.bool)
    )
    z = model.frame_head.encode(io[f"{tag}.cond"], x, known)
    assert close(z, io[f"{tag}.out"]) < TOL


@torch.no_grad()
def test_diffusion_mlp_computes_novas_function(loaded, io):
    model, _ = loaded
    p, C = model.cfg.patch_size, model.cfg.latent_channels
    xt = patchify(io["mlp.x"][:, None], p)  # [B, K, C p^2]
    B, K = xt.shape[:2]
    eps = model.frame_head.mlp(xt.flatten(0, 1), io["mlp.t"].flatten(), io["mlp.z"].flatten(0, 1)).view(B, K, -1)
    nova = io["mlp.out"].view(B, K, p, p, C).permute(0, 1, 4, 2, 3).flatten(2)  # NOVA's (p, p, C) -> (C, p, p)
    assert close(eps, nova) < TOL


def test_every_nova_key_is_loaded_or_ignored_for_a_reason(loaded):
    model, report = loaded
    nova = read_nova_state_dict(NOVA)
    loaded_keys = {k for k, _ in report.loaded}
    ignored = dict(report.ignored)
    assert loaded_keys | set(ignored) == set(nova) and not loaded_keys & set(ignored)
    assert {k.split(".")[0] for k in ignored} == {"mask_embed", "video_pos_embed", "motion_embed"}
    assert all(reason for reason in ignored.values())
    for key, target in report.loaded:  # loaded as they are, apart from the documented reshapings
        own = model.state_dict()[target]
        if "patch_embed" not in key and "head" not in key and key not in ("mask_embed.mask_token", "text_embed.weight"):
            assert torch.equal(own, nova[key]), key
    additions = ("state_tok.", "action_tok.", "boa", "action_head.")
    assert report.new and all(k.startswith(additions) for k in report.new)


def test_unknown_renamed_or_missing_keys_are_errors(loaded, tmp_path):
    model, _ = loaded
    nova = read_nova_state_dict(NOVA)
    for new, error in (
        ("video_encoder.block.0.attn.qkv.weight", "neither loads nor knows"),
        ("video_encoder.blocks.0.attn.qkv_.weight", "has no such parameter"),
    ):
        renamed = dict(nova)
        renamed[new] = renamed.pop("video_encoder.blocks.0.attn.qkv.weight")
        with pytest.raises(CheckpointError, match=error):
            load_nova_weights(model, renamed)
    missing = {k: v for k, v in nova.items() if k != "image_encoder.blocks.3.norm2.weight"}
    with pytest.raises(CheckpointError, match=r"does not fill.*frame_head.spatial.blocks.3.norm2.weight"):
        load_nova_weights(model, missing)
    wrong = dict(nova, **{"video_encoder.norm.weight": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=r"video_encoder.norm.weight.*\(64,\).*\(32,\)"):
        load_nova_weights(model, wrong)


def test_novas_other_variants_are_refused(loaded, tmp_path):
    model, _ = loaded
    shutil.copytree(NOVA, tmp_path / "transformer")
    config = json.loads((NOVA / "config.json").read_text())
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({**config, "video_mixer_rank": 64}))
    with pytest.raises(CheckpointError, match="video mixer"):
        load_nova_weights(model, tmp_path)
    rotary = {k: v for k, v in read_nova_state_dict(NOVA).items() if not k.startswith("video_pos_embed.")}
    save_file(rotary, str(tmp_path / "rotary.safetensors"))
    with pytest.raises(CheckpointError, match="rotary"):
        load_nova_weights(model, tmp_path / "rotary.safetensors")


def test_cpu_presets_have_no_place_for_novas_parts():
    with pytest.raises(CheckpointError, match="NOVA's architecture choices"):
        load_nova_weights(PARModel(preset("tiny")), NOVA)


def test_cli_init_from_nova_writes_a_checkpoint_and_reports(tmp_path):
    from typer.testing import CliRunner

    from par_deploy.cli import app
    from par_deploy.config import PARConfig

    args = ["init", "--from-nova", str(NOVA.parent), "--out", str(tmp_path / "par")]
    args += [f"--model={k}={json.dumps(v)}" for k, v in SMALL.items()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "loaded 116 NOVA tensors" in result.output and "video_encoder.blocks: 24" in result.output
    assert "newly initialised (PAR's additions)" in result.output and "action_head:" in result.output
    assert "mask_embed.bos_token: NOVA's begin-of-video token" in result.output
    cfg = PARConfig.load(tmp_path / "par" / "config.json")
    assert (cfg.dim, cfg.depth, cfg.spatial_depth, cfg.video_patch, cfg.block_norm) == (32, 2, 4, 4, "post")
    weights = load_file(str(tmp_path / "par" / "model.safetensors"))
    nova = read_nova_state_dict(NOVA)
    assert torch.equal(weights["transformer.blocks.1.mlp.fc2.weight"], nova["video_encoder.blocks.1.mlp.fc2.weight"])
    bad = CliRunner().invoke(app, ["init", "--from-nova", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "no NOVA weights" in str(bad.exception)


def test_nova_choices_are_validated():
    from par_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="block_norm"):
        preset("tiny", block_norm="middle")
    with pytest.raises(ConfigError, match="spatial_cond 'prepend'"):
        preset("tiny", video_patch_size=16)  # two token grids need the prepended condition
    with pytest.raises(ConfigError, match="text_encoder_path"):
        preset("tiny", text_embed="nova")
    assert preset("paper").video_patch == 2 * preset("paper").patch_size


@torch.no_grad()
def test_full_model_path_gives_novas_first_frame(io):
    """PARModel.hidden (sequence mask, RoPE, action tokens in the sequence) on [text; O_0; BOA]: the first
    frame's tokens see only the text and themselves, at RoPE position 0, so they match NOVA's frame 0 outputs."""
    cfg = nova_par_config(NOVA, **{**SMALL, "state_dim": 0})
    model = PARModel(cfg, load_frozen=False).eval()
    load_nova_weights(model, NOVA)
    video = io["temporal.video"]  # [B, C, T, h, w]
    B = video.shape[0]
    frame0 = patchify(video[:, :, :1].transpose(1, 2), cfg.video_patch)  # [B, K_o, C p^2]
    block = torch.cat([model.frame_embed(frame0), model.boa.expand(B, -1, -1)], dim=1)  # [B, Bl, D]
    h = model.hidden(model.text.project(io["temporal.text"]), block)
    frames = h[:, cfg.num_text_tokens : cfg.num_text_tokens + cfg.frame_tokens]
    assert close(frames, io["temporal.out"][:, : cfg.frame_tokens]) < TOL
