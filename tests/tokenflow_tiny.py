"""Tiny random Stable Diffusion (and ControlNet) folders in diffusers layout, for CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CROSS_DIM = 32


def _byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the others above 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with a character-level vocabulary and no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)


def build_tiny_sd(folder: Path, controlnet: bool = False) -> Path:
    """Write a tiny random SD pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, layers_per_block=1,
    )
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=516, max_position_embeddings=16, projection_dim=CROSS_DIM, bos_token_id=514, eos_token_id=515,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_tiny_tokenizer(folder / "tokenizer")
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if controlnet:
        cnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        with torch.no_grad():  # its zero convolutions start at zero: give them weight so control shows
            for conv in [*cnet.controlnet_down_blocks, cnet.controlnet_mid_block]:
                conv.weight.normal_(0.0, 0.1)
        cnet.save_pretrained(folder / "controlnet")
    return folder
