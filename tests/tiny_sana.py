"""Build tiny random SANA pipelines in diffusers folder layout, offline, for parity and CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a an the of and with on in to above below left right small big large red green blue yellow "
    "purple orange white black cat dog photo star square circle triangle cross painting city night"
).split()


def tiny_tokenizer():
    """A word-level tokenizer with <bos>/<eos>/<pad>/<unk>, padded on the right (Gemma-like specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right")


def randomize_(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Overwrite every parameter with random values (default inits hide bugs, e.g. zero tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_components(sample_size: int = 8, guidance_embeds: bool = False, qk_norm=None, seed: int = 0,
                    vae_stages: int = 3):
    """Tiny diffusers SANA parts: transformer, DC-AE (2**(vae_stages-1) compression), Gemma-2, tokenizer."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, sample_size=sample_size, patch_size=1, guidance_embeds=guidance_embeds, qk_norm=qk_norm,
    )
    randomize_(transformer, seed=seed)
    n_res = vae_stages - 1  # ResBlock stages, then one EfficientViT stage (SANA-1.0 style, scaled down)
    blocks = ("ResBlock",) * n_res + ("EfficientViTBlock",)
    channels = (8,) * n_res + (16,)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=channels, decoder_block_out_channels=channels,
        encoder_qkv_multiscales=((),) * n_res + ((5,),), decoder_qkv_multiscales=((),) * n_res + ((5,),),
        encoder_layers_per_block=(1,) * vae_stages, decoder_layers_per_block=(1,) * vae_stages,
        downsample_block_type="Conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    randomize_(vae, scale=0.1, seed=seed + 1)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       sliding_window=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    text_encoder = Gemma2Model(cfg).eval()
    return transformer, vae, text_encoder, tiny_tokenizer()


def save_tiny_sana(path: Path, flow_shift: float = 3.0, **kw) -> Path:
    """Save a tiny random diffusers SanaPipeline to `path` (the user's folder layout) and return it."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    transformer, vae, text_encoder, tokenizer = tiny_components(**kw)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=flow_shift)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.save_pretrained(path)
    return Path(path)


def save_tiny_sprint(path: Path, **kw) -> Path:
    """Save a tiny random diffusers SanaSprintPipeline (guidance embeds, qk norm, SCM scheduler)."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    transformer, vae, text_encoder, tokenizer = tiny_components(guidance_embeds=True, qk_norm="rms_norm_across_heads", **kw)
    pipe = SanaSprintPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=SCMScheduler())
    pipe.save_pretrained(path)
    return Path(path)
