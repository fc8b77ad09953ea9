"""SanaTransformer: the SANA linear diffusion transformer, weight-compatible with diffusers.

Constructor arguments, ``config.json`` keys and ``state_dict()`` keys are those of diffusers'
``SanaTransformer2DModel``, so an official checkpoint folder loads strictly with
``SanaTransformer.from_pretrained(folder)``.

Architecture (one block): adaLN-single modulation from the timestep; ReLU linear self-attention
(O(N), no mask); softmax cross-attention to the projected + RMS-normalised caption with the caption
mask; Mix-FFN (GLUMBConv: 1x1 conv, SiLU, depthwise 3x3, gated SiLU, 1x1 conv) on the token grid.

Attention processors
--------------------
Every self-attention (``transformer_blocks.{i}.attn1``, a `SanaSelfAttention`) and cross-attention
(``transformer_blocks.{i}.attn2``, a `SanaCrossAttention`) module delegates its math to a
*processor* object, so that guidance (PAG) and video editing (TokenFlow) change attention without
touching this file. ``model.attn_processors`` maps names to processors and
``model.set_attn_processor(...)`` swaps them (one processor for every module of its kind, or a
dict ``{name: processor}`` for some modules).

To write a processor, subclass `SelfAttnProcessor` or `CrossAttnProcessor` and implement
``__call__``:

- self-attention: ``processor(attn, hidden_states, height, width) -> (B, N, D)``.
  ``hidden_states`` (B, N, D) is the block input after LayerNorm and adaLN modulation; the N = height
  * width tokens are the latent grid in row-major order (``x.unflatten(1, (height, width))`` gives
  the grid). Use ``attn.project_qkv(hidden_states)`` for q, k, v as (B, heads, N, head_dim) (qk-norm
  applied, ReLU not yet applied), `sanaflow.ops.linear_attention.linear_attention` for the ReLU
  linear attention, and finish with ``attn.project_out(out)`` on (B, N, heads * head_dim), which
  applies ``to_out`` (and the fp16 clip). The result must be (B, N, D).
- cross-attention: ``processor(attn, hidden_states, encoder_hidden_states, attention_bias) -> (B, N, D)``
  with ``hidden_states`` (B, N, D) the block's running tokens, ``encoder_hidden_states`` (B, L, D) the
  normalised caption tokens, and ``attention_bias`` None or an additive (B, 1, 1, L) bias (0 keep,
  -10000 masked). Use ``attn.project_q``, ``attn.project_kv`` and ``attn.project_out``.

Processors keep any state they need themselves (e.g. a per-step state object that an editor sets
before each call); the defaults are stateless and one instance may serve many modules.

In an fp8 model (`sanaflow.quant`) the block may hand the *default* processors their
``hidden_states`` as quantized rows (`sanaflow.quant.layers.Fp8Rows`) written by the norm or residual
kernel, which ``project_qkv`` / ``project_q`` accept. A processor of any other class, and any module
with hooks, always gets the tensor (`SanaSelfAttention.reads_fp8_rows`).

In CUDA inference `SanaTransformer.forward` leaves each block's last step, its gated residual add,
to the next block's first norm kernel (`SanaTransformerBlock.forward`'s ``residual`` /
``defer_residual``), unless something could see a block's input or output: a hook on a block or on
every module, or ControlNet samples. Hooks and processors inside the blocks see what they always do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError, suggest
from ..hub import ModelMixin, register_to_config, wrap_output
from ..ops import norm as norm_ops
from ..ops.cross_attention import attend_tokens
from ..ops.linear_attention import linear_attention
from ..ops.mixffn import fused_mixffn_fn
from ..ops.norm import norm_modulate
from ..quant.layers import (
    Fp8Rows,
    accepts_fp8_rows,
    fp8_rows_wanted,
    gated_residual_fp8,
    norm_modulate_fp8,
    prequantize,
)
from ..utils import is_real

QK_NORMS = (None, "rms_norm_across_heads")
TIMESTEP_CHANNELS = 256  # sinusoidal timestep features before the MLP
MASK_BIAS = -10000.0  # additive bias of a masked caption token (finite, so an all-masked row stays finite)
FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension (statistics in float32), with a learned scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = (x * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return x * self.weight


def timestep_sinusoid(
    t: torch.Tensor, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features (cos half first) of a (B,) tensor of timesteps -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def sincos_pos_embed_2d(
    dim: int,
    height: int,
    width: int,
    base_size: int,
    interpolation_scale: float,
    device: torch.device | None = None,
) -> torch.Tensor:
    """2-D sin-cos position table (height * width, dim) float32, positions rescaled to a base grid.

    Both axes are mapped onto ``[0, base_size)`` and divided by `interpolation_scale`, so a model
    trained at one grid size sees familiar positions at another. Channels: first half encodes the
    column (x), second half the row (y); each half is [sin, cos] over geometric frequencies.
    """
    ys = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    xs = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    emb_x = _sincos_1d(dim // 2, grid_x.reshape(-1))  # (H*W, dim/2)
    emb_y = _sincos_1d(dim // 2, grid_y.reshape(-1))  # (H*W, dim/2)
    return torch.cat([emb_x, emb_y], dim=1).float()  # (H*W, dim)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    # float64 frequencies (float32 on MPS, which lacks float64): these tables are compared to
    # diffusers' to 1e-6, and large positions need the precision.
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=dtype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(dtype)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


class PatchEmbed(nn.Module):
    """Conv patchify (B, C, H, W) -> tokens (B, H/p * W/p, D), plus the optional sin-cos position table."""

    def __init__(
        self, in_channels: int, dim: int, patch_size: int, base_size: int, interpolation_scale: float | None
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.dim = dim
        self.base_size = base_size
        self.interpolation_scale = interpolation_scale
        self.pos_embed: torch.Tensor | None
        if interpolation_scale is None:
            self.pos_embed = None
        else:
            # Computed, never stored in checkpoints (diffusers does the same): non-persistent.
            self.register_buffer("pos_embed", self._base_table(None), persistent=False)

    def _base_table(self, device: torch.device | None) -> torch.Tensor:
        assert self.interpolation_scale is not None
        table = sincos_pos_embed_2d(
            self.dim, self.base_size, self.base_size, self.base_size, self.interpolation_scale, device
        )
        return table[None]  # (1, base*base, D)

    def reset_pos_embed(self) -> None:
        """Recompute the position table on the device of the weights (after loading on meta)."""
        if self.pos_embed is not None:
            self.pos_embed = self._base_table(self.proj.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2] // self.proj.stride[0]
        w = x.shape[-1] // self.proj.stride[1]
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.pos_embed is None:
            return x
        if h == self.base_size and w == self.base_size:
            pos = self.pos_embed
        else:
            pos = sincos_pos_embed_2d(self.dim, h, w, self.base_size, self.interpolation_scale, x.device)[
                None
            ]
        return (x + pos).to(x.dtype)  # (B, h*w, D)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on sinusoidal timestep features."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class _TimestepEmbedding(nn.Module):
    # Only exists so that weight names read `time_embed.emb.timestep_embedder.*` as in diffusers.
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)


class TimestepModulation(nn.Module):
    """adaLN-single: timestep -> embedded t (B, D) and the shared block modulation (B, 6D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # (B, D)
        return self.linear(F.silu(emb)), emb  # (B, 6D), (B, D)


class TimestepGuidanceModulation(nn.Module):
    """adaLN-single with an embedded guidance scale summed into the timestep embedding (SANA-Sprint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)
        self.guidance_embedder = TimestepMLP(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert guidance is not None  # checked by SanaTransformer.forward
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # (B, D)
        emb = emb + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))  # (B, D)
        return self.linear(F.silu(emb)), emb  # (B, 6D), (B, D)


class CaptionProjection(nn.Module):
    """Caption features (B, L, C) -> (B, L, D): Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(caption), approximate="tanh"))


class GLUMBConv(nn.Module):
    """Mix-FFN on the token grid (B, D, H, W): 1x1 up, SiLU, depthwise 3x3, x * SiLU(gate), 1x1 down."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(
        self, x: torch.Tensor | Fp8Rows, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Tokens (B, N, D) of a `height` x `width` grid -> (B, N, D) (`forward_tokens`), or a grid (B, D, H, W) -> (B, D, H, W).

        The block calls the module with its tokens, so forward hooks on the Mix-FFN (TokenFlow's PnP
        feature injection, feature probes) see its real input and output. Tokens may come as
        `Fp8Rows` (with the grid size) where `reads_fp8_rows()`: the block does that only then.
        """
        if height is not None and width is not None:
            return self.forward_tokens(x, height, width)  # (B, N, D)
        height, width = x.shape[-2:]
        out = self.forward_tokens(x.flatten(2).transpose(1, 2), height, width)  # (B, N, D)
        return out.transpose(1, 2).unflatten(2, (height, width))  # (B, D, H, W)

    def forward_tokens(self, x: torch.Tensor | Fp8Rows, height: int, width: int) -> torch.Tensor:
        """Tokens (B, N, D) of a row-major (height, width) grid -> (B, N, D), with no layout copies.

        The 1x1 convs run as matmuls on the tokens (F.linear with the stored conv weights: cuBLAS
        adds the bias in the GEMM epilogue, where cuDNN convs add it in a separate pass), and the
        depthwise 3x3 conv sees the tokens as a channels-last (B, C, H, W) view, so no
        (B, N, D) <-> (B, D, H, W) transpose is ever materialised. `Fp8Rows` tokens (fp8
        conv_inverted) go straight into its matmul.
        """
        h = _pointwise(self.conv_inverted, x, height, width)  # (B, N, 2h), before the SiLU
        conv = self.conv_depth
        fused = fused_mixffn_fn(h, conv.weight) if isinstance(conv, nn.Conv2d) else None  # opt-in, see ops.mixffn
        if fused is not None:
            h = fused(h, conv.weight, conv.bias, height, width)  # (B, N, h)
        else:
            h = self.dwconv_glu(h, height, width)  # (B, N, h)
        return _pointwise(self.conv_point, h, height, width)  # (B, N, D)

    def reads_fp8_rows(self) -> bool:
        """True when the input may come as `Fp8Rows`: no hooks on this module and an unhooked fp8 conv_inverted."""
        return not _hooked(self) and accepts_fp8_rows(self.conv_inverted)

    def dwconv_glu(self, h: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The torch path of the middle: (B, N, 2h) -> SiLU, depthwise 3x3, x * SiLU(gate) -> (B, N, h)."""
        h = F.silu(h)  # (B, N, 2h)
        grid = h.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # (B, 2h, H, W) channels-last view
        h = self.conv_depth(grid).permute(0, 2, 3, 1)  # (B, H, W, 2h), contiguous when channels-last
        h, gate = h.chunk(2, dim=-1)  # (B, H, W, h) each
        return (h * F.silu(gate)).flatten(1, 2)  # (B, N, h)


def _pointwise(conv: nn.Module, x: torch.Tensor | Fp8Rows, height: int, width: int) -> torch.Tensor:
    # A 1x1 Conv2d applied to tokens (B, N, C_in) -> (B, N, C_out). A plain Conv2d is a Linear over
    # its (C_out, C_in, 1, 1) weight; any other module (a quantized replacement, see
    # sanaflow.quant) takes the grid, so it gets a channels-last view and its output is viewed back.
    # Fp8Rows (only for an fp8 layer, see GLUMBConv.reads_fp8_rows) are token rows its matmul reads as they are.
    if isinstance(x, Fp8Rows):
        return conv(x)  # (B, N, C_out)
    if isinstance(conv, nn.Conv2d):
        return F.linear(x, conv.weight.flatten(1), conv.bias)  # (B, N, C_out)
    grid = x.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # (B, C_in, H, W) view
    return conv(grid).flatten(2).transpose(1, 2)  # (B, N, C_out)


# --------------------------------------------------------------------------------------------
# Attention modules and processors
# --------------------------------------------------------------------------------------------


class SelfAttnProcessor:
    """Base of self-attention processors: ``__call__(attn, hidden_states, height, width) -> (B, N, D)``."""

    def __call__(
        self, attn: SanaSelfAttention, hidden_states: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        raise NotImplementedError


class CrossAttnProcessor:
    """Base of cross-attention processors: ``__call__(attn, x, encoder_hidden_states, attention_bias) -> (B, N, D)``."""

    def __call__(
        self,
        attn: SanaCrossAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError


class LinearSelfAttnProcessor(SelfAttnProcessor):
    """The default self-attention: ReLU linear attention over all N tokens (hidden_states may be `Fp8Rows`)."""

    def __call__(
        self, attn: SanaSelfAttention, hidden_states: torch.Tensor | Fp8Rows, height: int, width: int
    ) -> torch.Tensor:
        q, k, v = attn.project_qkv(hidden_states)  # (B, h, N, d) each
        out = linear_attention(q, k, v)  # (B, h, N, d)
        return attn.project_out(out.transpose(1, 2).flatten(2))  # (B, N, D)


class IdentitySelfAttnProcessor(SelfAttnProcessor):
    """Self-attention with the identity attention map (each token attends only to itself): the PAG perturbation."""

    def __call__(
        self, attn: SanaSelfAttention, hidden_states: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        return attn.project_out(attn.to_v(hidden_states))  # (B, N, D)


class SoftmaxCrossAttnProcessor(CrossAttnProcessor):
    """The default cross-attention: softmax attention to the caption tokens with an additive mask.

    hidden_states may be `Fp8Rows` (fp8 models: the block's residual kernel quantizes the queries' input).
    """

    def __call__(
        self,
        attn: SanaCrossAttention,
        hidden_states: torch.Tensor | Fp8Rows,
        encoder_hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        q = attn.project_q(hidden_states)  # (B, h, N, d)
        k, v = attn.project_kv(encoder_hidden_states)  # (B, h, L, d) each
        return attn.project_out(attend_tokens(q, k, v, attention_bias))  # (B, N, D)


class _AttentionProjections(nn.Module):
    """The modules both attentions share: optional qk RMSNorm, to_q/k/v and to_out (Linear, Dropout)."""

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        heads: int,
        head_dim: int,
        qkv_bias: bool,
        out_bias: bool,
        qk_norm: str | None,
        dropout: float,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        # qk_norm normalises over all heads at once (the full width), as in SANA-1.5 / Sprint.
        # (Norms are created first so that state_dict() lists keys in diffusers' order.)
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else nn.Identity()
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(dropout)])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * d) -> (B, heads, N, d)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class SanaSelfAttention(_AttentionProjections):
    """Self-attention projections (to_q/k/v, optional qk RMSNorm, to_out); the math lives in ``processor``."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_norm: str | None, dropout: float):
        super().__init__(dim, dim, heads, head_dim, qkv_bias=bias, out_bias=True, qk_norm=qk_norm, dropout=dropout)
        self.processor: SelfAttnProcessor = LinearSelfAttnProcessor()

    def project_qkv(self, x: torch.Tensor | Fp8Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of tokens (B, N, D) (or their `Fp8Rows`), each (B, heads, N, d), with qk-norm applied (no ReLU yet)."""
        x = prequantize(x, self.to_q, self.to_k, self.to_v)  # fp8 layers: one quantisation of x for all three
        q = self.split_heads(_call(self.norm_q, _call(self.to_q, x)))
        k = self.split_heads(_call(self.norm_k, _call(self.to_k, x)))
        v = self.split_heads(_call(self.to_v, x))
        return q, k, v

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection of merged heads (B, N, heads * d) -> (B, N, D); clipped to the fp16 range in fp16."""
        x = _call(self.to_out[1], _call(self.to_out[0], x))
        if x.dtype == torch.float16:
            # Linear attention can overflow fp16 in rare tokens; clip as the reference does.
            x = x.clip(-FP16_MAX, FP16_MAX)
        return x

    def reads_fp8_rows(self) -> bool:
        """True when hidden_states may come as `Fp8Rows`: the default processor, no hooks, unhooked fp8 to_q/k/v."""
        return (type(self.processor) is LinearSelfAttnProcessor and not _hooked(self)
                and accepts_fp8_rows(self.to_q, self.to_k, self.to_v))

    def forward(self, hidden_states: torch.Tensor | Fp8Rows, height: int, width: int) -> torch.Tensor:
        return self.processor(self, hidden_states, height, width)


class SanaCrossAttention(_AttentionProjections):
    """Cross-attention projections (to_q/k/v with biases, optional qk RMSNorm, to_out); math in ``processor``."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        qk_norm: str | None,
        out_bias: bool,
        dropout: float,
    ):
        super().__init__(
            dim, context_dim, heads, head_dim, qkv_bias=True, out_bias=out_bias, qk_norm=qk_norm, dropout=dropout
        )
        self.processor: CrossAttnProcessor = SoftmaxCrossAttnProcessor()

    def project_q(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """Queries of image tokens (B, N, D) (or their `Fp8Rows`, for an fp8 to_q) -> (B, heads, N, d), qk-norm applied."""
        return self.split_heads(_call(self.norm_q, _call(self.to_q, x)))

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of caption tokens (B, L, D) -> (B, heads, L, d) each, qk-norm applied to keys."""
        context = prequantize(context, self.to_k, self.to_v)  # fp8 layers: one quantisation for both
        return (self.split_heads(_call(self.norm_k, _call(self.to_k, context))),
                self.split_heads(_call(self.to_v, context)))

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection of merged heads (B, N, heads * d) -> (B, N, D)."""
        return _call(self.to_out[1], _call(self.to_out[0], x))

    def reads_fp8_rows(self) -> bool:
        """True when hidden_states may come as `Fp8Rows`: the default processor, no hooks, an unhooked fp8 to_q."""
        return type(self.processor) is SoftmaxCrossAttnProcessor and not _hooked(self) and accepts_fp8_rows(self.to_q)

    def forward(
        self,
        hidden_states: torch.Tensor | Fp8Rows,
        encoder_hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_bias)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args)``, entering ``module.forward`` directly where ``nn.Module.__call__`` would do just that.

    That is when no hook of any kind (the module's or global, forward or backward) is registered,
    the module is not ``module.compile()``-d, and no ``torch.jit.trace`` runs: then ``__call__``
    only adds its dispatch, ~10 us of host time per call on a GPU machine's CPU, paid by each of a
    block's ~17 submodule calls (projections, qk-norms, dropouts, attentions, Mix-FFN) and by the
    blocks themselves in eager inference, where a 1024 px step is bound by the host. Under
    torch.compile the plain call is kept (dynamo inlines it; the host cost is gone there anyway).
    """
    if (torch.compiler.is_compiling() or _hooked(module) or module._backward_hooks or module._backward_pre_hooks
            or module._compiled_call_impl is not None or _global_module_hooks()
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks
            or torch._C._get_tracing_state()):
        return module(*args, **kwargs)
    return module.forward(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------


# A block's last step left to the next block: (gate (B, 1, D), y (B, N, D)), the output being x + gate * y.
DeferredResidual = tuple[torch.Tensor, torch.Tensor]


class SanaTransformerBlock(nn.Module):
    """Linear self-attention, caption cross-attention and Mix-FFN, modulated by adaLN-single."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        cross_heads: int | None,
        cross_head_dim: int | None,
        cross_attention_dim: int | None,
        attention_bias: bool,
        norm_elementwise_affine: bool,
        norm_eps: float,
        mlp_ratio: float,
        qk_norm: str | None,
        dropout: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn1 = SanaSelfAttention(dim, heads, head_dim, attention_bias, qk_norm, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.attn2: SanaCrossAttention | None = None
        if cross_attention_dim is not None:
            assert cross_heads is not None and cross_head_dim is not None
            self.attn2 = SanaCrossAttention(
                dim, cross_attention_dim, cross_heads, cross_head_dim, qk_norm, True, dropout
            )
        self.ff = GLUMBConv(dim, mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_bias: torch.Tensor | None,
        modulation: torch.Tensor,
        height: int,
        width: int,
        residual: DeferredResidual | None = None,
        defer_residual: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DeferredResidual]:
        """x (B, N, D), context (B, L, D), context_bias (B, 1, 1, L) or None, modulation (B, 6D) -> (B, N, D).

        `residual` and `defer_residual` serve `SanaTransformer.forward`'s inference loop, which leaves
        each block's last step, the gated residual x + gate_mlp * ff_out, to the next block's norm1
        pass (one pass over the residual stream less per block): with `residual` (gate, y) this
        block's input is ``torch.addcmul(x, gate, y)``; with `defer_residual` it returns (x', (gate_mlp,
        ff_out)) instead of its output ``torch.addcmul(x', gate_mlp, ff_out)``.
        """
        mod = self.scale_shift_table[None] + modulation.unflatten(1, (6, -1))  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (B, 1, D) each

        # Each (B, N, D) elementwise step is a full read+write of the activations (at 4096 px that
        # is memory-bound work beside the GEMMs), so modulation and gated residuals are single
        # addcmul passes: norm * (1 + scale) + shift and x + gate * out. Out of place on purpose:
        # the same traffic as addcmul_, autograd-safe, and the block input (which hooks or callers
        # may hold) is never mutated.
        # The norms with their modulation (and the cross-attention's residual add) run as one fused
        # kernel in CUDA inference (sanaflow.ops.norm).
        # fp8 models: an activation whose only readers are fp8 layers (attn1's q/k/v, attn2's q,
        # ff's first 1x1 conv) leaves its row kernel as fp8 rows (Fp8Rows), not as a bf16 tensor the
        # layers would read back just to quantize it. Only where the reader `reads_fp8_rows()` (default
        # processor, no hooks): TokenFlow's processors and feature hooks, PAG, probes get the tensor.
        # A deferred residual (the previous block's gate_mlp, ff_out) is added in norm1's pass.
        gate, y = residual if residual is not None else (None, None)  # (B, 1, D), (B, N, D)
        rows = fp8_rows_wanted(x)
        if rows and self.attn1.reads_fp8_rows():
            x, h = norm_modulate_fp8(self.norm1, x, shift_msa, scale_msa, y, residual_gate=gate)  # (B, N, D), Fp8Rows
        else:
            x, h = norm_modulate(self.norm1, x, shift_msa, scale_msa, y, residual_gate=gate)  # (B, N, D) each
        out = _call(self.attn1, h, height, width)  # (B, N, D)

        if self.attn2 is None:
            x, cross = torch.addcmul(x, gate_msa, out), None  # (B, N, D)
        elif rows and self.attn2.reads_fp8_rows():
            x, q_rows = gated_residual_fp8(x, gate_msa, out)  # (B, N, D), its Fp8Rows
            cross = _call(self.attn2, q_rows, context, context_bias)  # (B, N, D)
        else:
            x = torch.addcmul(x, gate_msa, out)  # (B, N, D)
            cross = _call(self.attn2, x, context, context_bias)  # (B, N, D)

        if rows and self.ff.reads_fp8_rows():
            x, h = norm_modulate_fp8(self.norm2, x, shift_mlp, scale_mlp, residual=cross)  # (B, N, D), Fp8Rows
        else:
            x, h = norm_modulate(self.norm2, x, shift_mlp, scale_mlp, residual=cross)  # (B, N, D) each
        out = _call(self.ff, h, height, width)  # (B, N, D)
        if defer_residual:
            return x, (gate_mlp, out)
        return torch.addcmul(x, gate_mlp, out)  # (B, N, D)

    def defers_residual(self) -> bool:
        """True when the block may take and hand on deferred residuals (see `forward`): no hooks on it.

        A hook on the block would see the pair instead of its input or output.
        """
        return not _hooked(self)


class SanaTransformer(ModelMixin):
    """The SANA linear DiT (weight- and config-compatible with diffusers' ``SanaTransformer2DModel``).

    ``timestep_scale`` and ``guidance_embeds_scale`` are config values for the *caller* (as in
    diffusers' pipelines): ``forward`` embeds `timestep` and `guidance` exactly as given.
    """

    diffusers_class_name = "SanaTransformer2DModel"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ConfigError(f"unknown qk_norm {qk_norm!r}; choose from: {', '.join(map(repr, QK_NORMS))}")
        dim = num_attention_heads * attention_head_dim
        if cross_attention_dim is not None and (
            num_cross_attention_heads is None or cross_attention_head_dim is None
        ):
            raise ConfigError(
                "cross_attention_dim is set, so num_cross_attention_heads and cross_attention_head_dim must be too"
            )
        if interpolation_scale is not None and dim % 4:
            raise ConfigError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.caption_channels = caption_channels
        self.guidance_embeds = guidance_embeds
        self.gradient_checkpointing = False

        self.patch_embed = PatchEmbed(
            in_channels, dim, patch_size, sample_size // patch_size, interpolation_scale
        )
        self.time_embed: TimestepModulation | TimestepGuidanceModulation = (
            TimestepGuidanceModulation(dim) if guidance_embeds else TimestepModulation(dim)
        )
        self.caption_projection = CaptionProjection(caption_channels, dim)
        self.caption_norm = RMSNorm(dim, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(
            SanaTransformerBlock(
                dim,
                num_attention_heads,
                attention_head_dim,
                num_cross_attention_heads,
                cross_attention_head_dim,
                cross_attention_dim,
                attention_bias,
                norm_elementwise_affine,
                norm_eps,
                mlp_ratio,
                qk_norm,
                dropout,
            )
            for _ in range(num_layers)
        )
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def _init_computed_buffers(self) -> None:
        self.patch_embed.reset_pos_embed()

    # ---------------------------------------------------------------------------- processors

    def _attention_modules(self) -> dict[str, SanaSelfAttention | SanaCrossAttention]:
        return {
            name: m
            for name, m in self.named_modules()
            if isinstance(m, (SanaSelfAttention, SanaCrossAttention))
        }

    @property
    def attn_processors(self) -> dict[str, SelfAttnProcessor | CrossAttnProcessor]:
        """The processor of every attention module, by name (``transformer_blocks.{i}.attn1`` / ``attn2``)."""
        return {name: m.processor for name, m in self._attention_modules().items()}

    def set_attn_processor(
        self,
        processor: SelfAttnProcessor
        | CrossAttnProcessor
        | Mapping[str, SelfAttnProcessor | CrossAttnProcessor],
    ) -> None:
        """Set one processor on every module of its kind (self or cross), or a ``{name: processor}`` dict."""
        modules = self._attention_modules()
        if isinstance(processor, Mapping):
            unknown = [k for k in processor if k not in modules]
            if unknown:
                hints = "; ".join(f"{k!r}{suggest(k, modules)}" for k in unknown)
                raise ConfigError(
                    f"unknown attention module(s): {hints}; names look like 'transformer_blocks.0.attn1' "
                    f"(self) or 'transformer_blocks.0.attn2' (cross), blocks 0..{len(self.transformer_blocks) - 1}"
                )
            assignments = dict(processor)
        elif not isinstance(processor, (SelfAttnProcessor, CrossAttnProcessor)):
            raise ConfigError(
                f"set_attn_processor needs a SelfAttnProcessor, a CrossAttnProcessor or a dict of them, "
                f"got {type(processor).__name__}"
            )
        else:
            kind = SanaSelfAttention if isinstance(processor, SelfAttnProcessor) else SanaCrossAttention
            assignments = {name: processor for name, m in modules.items() if isinstance(m, kind)}
        for name, proc in assignments.items():
            _assign_processor(name, modules[name], proc)

    def set_default_attn_processor(self) -> None:
        """Restore the default processors (linear self-attention, softmax cross-attention)."""
        self.set_attn_processor(LinearSelfAttnProcessor())
        self.set_attn_processor(SoftmaxCrossAttnProcessor())

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
        self.gradient_checkpointing = enabled

    # ---------------------------------------------------------------------------- forward

    def _defers_block_residuals(
        self, x: torch.Tensor, controlnet_block_samples: Sequence[torch.Tensor] | None
    ) -> bool:
        """Whether `forward` leaves each block's last gated residual to the next block's norm1 pass.

        Only where that saves a pass (the fused row kernels: inference, CUDA tokens, SANAFLOW_FUSED_NORM
        on) and nothing sees a block's input or output in between: no ControlNet samples (added to
        block outputs), no hooks on a block (on the module in ``transformer_blocks`` or, through
        `SanaTransformerBlock.defers_residual`, on the block a compiled wrapper holds) nor on every
        module. Hooks inside a block (attention, Mix-FFN, norms) and processors see what they always do.
        """
        if controlnet_block_samples is not None or torch.is_grad_enabled():
            return False
        if not norm_ops.row_kernels_run(x) or _global_module_hooks():
            return False
        return all(not _hooked(block) and block.defers_residual() for block in self.transformer_blocks)

    def _check_inputs(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None,
        guidance: torch.Tensor | float | None,
    ) -> None:
        if x.ndim != 4:
            raise InputError(f"hidden_states must be (B, C, H, W) latents, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputError(
                f"hidden_states has {x.shape[1]} channels but this transformer expects in_channels="
                f"{self.in_channels} (latents of another autoencoder?)"
            )
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise InputError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch_size={p}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.caption_channels:
            raise InputError(
                f"encoder_hidden_states must be (B={x.shape[0]}, L, caption_channels={self.caption_channels}), "
                f"got shape {tuple(context.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
            raise InputError(
                f"encoder_attention_mask must be (B, L) = {tuple(context.shape[:2])} (1 = keep, 0 = padding), "
                f"got shape {tuple(mask.shape)}"
            )
        if self.guidance_embeds and guidance is None:
            raise InputError(
                "this transformer embeds the guidance scale (guidance_embeds=True): pass guidance="
            )
        if not self.guidance_embeds and guidance is not None:
            raise InputError(
                "this transformer has no guidance embedding (guidance_embeds=False): pass guidance=None"
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        controlnet_block_samples: Sequence[torch.Tensor] | None = None,
        return_dict: bool | None = None,
        attention_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | SanaTransformerOutput | tuple[torch.Tensor]:
        """Velocity for latents (B, C, H, W) given caption tokens (B, L, caption_channels) and timesteps.

        `timestep` and `guidance` are (B,) tensors or scalars, embedded as given (callers apply
        ``config.timestep_scale`` / ``config.guidance_embeds_scale``). `encoder_attention_mask` (B, L):
        1 = keep, 0 = padding. `controlnet_block_samples[i - 1]` (B, N, D) is added after block i.
        Returns the (B, out_channels, H, W) tensor. With `return_dict` given, the result is wrapped as
        diffusers' ``SanaTransformer2DModel`` wraps it: True gives a `SanaTransformerOutput` (``.sample``),
        False the tuple ``(sample,)``. Together with `attention_kwargs` (accepted when empty, or a LoRA
        ``scale`` of 1: this model has no LoRA layers to scale), this lets diffusers' ``SanaPipeline`` and
        ``SanaSprintPipeline`` run this model in place of theirs.
        """
        _check_attention_kwargs(attention_kwargs)
        self._check_inputs(hidden_states, encoder_hidden_states, encoder_attention_mask, guidance)
        batch, _, height, width = hidden_states.shape
        p = self.patch_size
        h, w = height // p, width // p

        x = self.patch_embed(hidden_states)  # (B, N, D)
        t = _batch_vector(timestep, batch, x.device, "timestep")  # (B,)
        g = None if guidance is None else _batch_vector(guidance, batch, x.device, "guidance")  # (B,)
        modulation, t_emb = self.time_embed(t, g, x.dtype)  # (B, 6D), (B, D)
        context = self.caption_norm(self.caption_projection(encoder_hidden_states))  # (B, L, D)
        context_bias = None
        if encoder_attention_mask is not None:
            context_bias = (1 - encoder_attention_mask.to(x.dtype)) * MASK_BIAS  # (B, L)
            context_bias = context_bias[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries

        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        if self._defers_block_residuals(x, controlnet_block_samples):
            # Each block's last gated residual is added in the next block's norm1 pass (the last
            # block's here): the same values, one pass over the (B, N, D) residual stream less per block.
            residual = None
            for block in self.transformer_blocks:
                x, residual = _call(block, x, context, context_bias, modulation, h, w,
                                    residual=residual, defer_residual=True)  # (B, N, D), (gate, y)
            if residual is not None:
                x = torch.addcmul(x, *residual)  # (B, N, D)
        else:
            for i, block in enumerate(self.transformer_blocks):
                if use_checkpoint:
                    x = checkpoint(block, x, context, context_bias, modulation, h, w, use_reentrant=False)
                else:
                    x = block(x, context, context_bias, modulation, h, w)  # (B, N, D)
                if controlnet_block_samples is not None and 0 < i <= len(controlnet_block_samples):
                    x = x + controlnet_block_samples[i - 1]

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = torch.addcmul(shift, self.norm_out(x), 1 + scale)  # (B, N, D)
        x = self.proj_out(x)  # (B, N, p*p*C)
        x = x.reshape(batch, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        x = x.reshape(batch, -1, height, width)  # (B, C, H, W)
        return wrap_output(x, return_dict, SanaTransformerOutput)


class SanaTransformerOutput(NamedTuple):
    """`SanaTransformer.forward(..., return_dict=True)`: like diffusers' ``Transformer2DModelOutput``,
    the velocity is ``.sample`` and ``[0]``."""

    sample: torch.Tensor


def _check_attention_kwargs(attention_kwargs: Mapping[str, Any] | None) -> None:
    # diffusers' pipelines pass attention_kwargs (None unless the user sets them); its only use on SANA
    # is the LoRA scale, which is a no-op at 1 and on a model without LoRA layers.
    if attention_kwargs is None:
        return
    if not isinstance(attention_kwargs, Mapping):
        raise InputError(f"attention_kwargs must be a dict or None, got {type(attention_kwargs).__name__}")
    other = sorted(str(k) for k in attention_kwargs if k != "scale")
    scale = attention_kwargs.get("scale", 1.0)
    if other or not (is_real(scale) and float(scale) == 1.0):
        got = ", ".join(other + ([f"scale={scale!r}"] if "scale" in attention_kwargs else []))
        raise InputError(
            f"attention_kwargs: sanaflow's SanaTransformer has no LoRA layers or attention options; "
            f"only an empty dict or scale=1 is accepted, got {got}"
        )


def _global_module_hooks() -> bool:
    # hooks registered for every module (torch.nn.modules.module.register_module_forward_hook and friends)
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def _batch_vector(value: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
    # A scalar (or one-element tensor) applies to the whole batch; otherwise one value per sample.
    t = torch.as_tensor(value, device=device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if tuple(t.shape) != (batch,):
        raise InputError(f"{name} must be a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t


def _assign_processor(
    name: str,
    module: SanaSelfAttention | SanaCrossAttention,
    processor: SelfAttnProcessor | CrossAttnProcessor,
) -> None:
    if isinstance(module, SanaSelfAttention):
        if not isinstance(processor, SelfAttnProcessor):
            raise ConfigError(
                f"{name} is a self-attention module: its processor must be a SelfAttnProcessor, "
                f"got {type(processor).__name__}"
            )
        module.processor = processor
    else:
        if not isinstance(processor, CrossAttnProcessor):
            raise ConfigError(
                f"{name} is a cross-attention module: its processor must be a CrossAttnProcessor, "
                f"got {type(processor).__name__}"
            )
        module.processor = processor
