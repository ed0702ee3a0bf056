"""The pretrained-part loaders (paper: Open-Sora VAE, Phi text encoder) on small models the tests write in the
same formats: a diffusers AutoencoderKL directory and a Hugging Face text-model directory."""

import json

import numpy as np
import pytest
import torch

from par_deploy.config import preset
from par_deploy.errors import ConfigError
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy
from par_deploy.synthetic import randomize_, synthetic_batch


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def vae_config(vae_dir, **kw):
    # two down blocks: 2x downsampling; 16x16 frames -> 8x8 latents, 2x2 latent patches -> 16 tokens of 16
    return preset("tiny", codec="vae", vae_path=str(vae_dir), vae_downsample=2, patch_size=2, target_pool=1, **kw)


def test_vae_codec_trains_and_acts(vae_dir):
    cfg = vae_config(vae_dir)
    assert cfg.frame_tokens == 16 and cfg.frame_token_dim == 16
    model = PARModel(cfg)
    assert not any("vae" in k for k in model.state_dict())  # the frozen VAE is not part of the checkpoint
    out = model.losses(synthetic_batch(cfg, 1, 2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    policy = TorchPolicy(model.eval(), Normalizer.identity(cfg.action_dim, cfg.state_dim))
    policy.reset()
    chunk = policy.act({"rgb": np.zeros((1, 16, 16, 3), np.uint8), "state": np.zeros(3, np.float32)})
    assert chunk.shape == (cfg.chunk_len, cfg.action_dim)
    frame = policy.predict_frame(steps=2)
    assert frame.shape == (1, 16, 16, 3) and frame.dtype == np.uint8


def test_vae_mismatch_is_refused(vae_dir, tmp_path):
    with pytest.raises(ConfigError, match="latent_channels"):
        PARModel(vae_config(vae_dir, vae_latent_channels=8))
    with pytest.raises(ConfigError, match="vae_path"):
        PARModel(preset("tiny", codec="vae", vae_downsample=2, patch_size=2, target_pool=1))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "push", "the", "cube", "to", "goal", "region", "pick"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def test_text_encoder_prefix(text_dir):
    cfg = preset(
        "tiny",
        text_encoder_path=str(text_dir),
        text_encoder_dim=24,
        num_text_tokens=5,
        instructions=("push the cube to the goal region", "pick the cube"),
    )
    model = PARModel(cfg)
    assert set(k for k in model.state_dict() if k.startswith("text.")) == {"text.proj.weight", "text.proj.bias"}
    a, b = model.text(["push the cube to the goal region"]), model.text(["pick the cube"])
    assert a.shape == (1, 5, cfg.dim) and not torch.allclose(a, b)
    randomize_(model)  # zero-initialised output layers pass no gradient upstream at step 0
    out = model.losses(synthetic_batch(cfg, 1, 2))
    out["loss"].backward()
    assert model.text.proj.weight.grad is not None and model.text.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="hidden size"):
        PARModel(cfg.replace(text_encoder_dim=32))


# --- the NOVA checkpoint's frozen parts, through the real classes at the shapes NOVA expects -----------------


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    """transformers' Phi (NOVA's text encoder family) at a tiny random config, with the fixture's text width."""
    transformers = pytest.importorskip("transformers")
    from tests.test_nova import NOVA

    width = json.loads((NOVA / "config.json").read_text())["text_token_dim"]
    path = tmp_path_factory.mktemp("phi")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "push", "the", "cube", "to", "goal", "region", "pick"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    cfg = transformers.PhiConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.PhiForCausalLM(cfg).save_pretrained(path)  # saved with its LM head, as NOVA ships Phi
    return path


@pytest.fixture(scope="module")
def nova_vae_dir(tmp_path_factory):
    """A diffusers AutoencoderKL with NOVA's latent shape: 4 channels at stride 8 (three downsamplings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    path = tmp_path_factory.mktemp("nova_vae")
    vae.save_pretrained(path)
    return path


def test_nova_checkpoint_with_phi_and_vae_trains(phi_dir, nova_vae_dir):
    from par_deploy.nova import load_nova_weights, nova_par_config
    from tests.test_nova import NOVA, SMALL

    cfg = nova_par_config(
        NOVA,
        **{**SMALL, "text_encoder_path": str(phi_dir), "vae_path": str(nova_vae_dir)},
        instructions=("push the cube to the goal region",),
    )
    model = PARModel(cfg)
    load_nova_weights(model, NOVA)
    rgb = torch.zeros(1, 1, 64, 64, 3, dtype=torch.uint8)
    assert model.codec.encode(rgb).shape == (1, 4, 4 * 4 * 4)  # video patch 4 on the 8x8 latent
    assert model.codec.encode_target(rgb).shape == (1, 16, 4 * 2 * 2)  # image patch 2
    text = model.text(["push the cube"])  # [CLS] push the cube [SEP]: 5 of 6 tokens
    assert text.shape == (1, cfg.num_text_tokens, cfg.dim)
    fixed = model.text.project(model.text.pad[None])  # NOVA's fixed features past the prompt's end
    assert torch.allclose(text[0, 5], fixed[0, 5]) and not torch.allclose(text[0, 4], fixed[0, 4])
    out = model.losses(synthetic_batch(cfg, 1, 2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.transformer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
