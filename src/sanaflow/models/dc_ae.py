"""DCAE: the deep-compression autoencoder of SANA, weight-compatible with diffusers' ``AutoencoderDC``.

Constructor arguments, ``config.json`` keys and ``state_dict()`` keys are those of diffusers'
``AutoencoderDC``, so its checkpoints (e.g. ``mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers``) load
strictly. The network is a stack of stages; each stage holds ResBlocks or EfficientViT blocks
(multi-scale ReLU linear attention + GLU MBConv) and a down/up-sampling block with a
channel-averaging / channel-repeating shortcut.

Latents are *unscaled*: the diffusion model works on ``latents * config.scaling_factor``.

Tiling (for large images; memory stays bounded, the result stays equal to the untiled one).
The attention layers are global, so the network is split in two: the part with attention, which
works on the deep, 2^k-times smaller maps, runs on the whole map, layer by layer, each layer in
row strips of about ``chunk`` positions (the linear attention in two passes: sum k^T v and k over
all strips, then apply them), which is exact. The conv-only part (the shallow, full-resolution
stages that hold nearly all pixels, FLOPs and memory) runs in equal, overlapping square tiles,
``tile_batch`` tiles per network call, each written into one output buffer with separable weights
computed once per axis. The default overlap is twice the conv part's receptive field, so every
kept pixel saw all its inputs and the tiles meet in a hard cut with no seam: tiled == untiled up
to float rounding. A smaller ``overlap`` trades exactness for speed; the tiles then cross-fade over
the overlap with a raised cosine, so a tile's distorted border gets almost no weight.

Tiling policy (``decode(..., tiling="auto")``, also ``encode``): tile when the image (output of
decode, input of encode) has more than ``AUTO_TILE_PIXELS`` pixels (2048 x 2048). Below that the
untiled network is as fast and fits in a few GiB; above it the untiled SANA-1.0 decoder needs
about 20 GiB at 4096 px. ``tiling=True`` / ``False`` force either path. Default tiles are
``DEFAULT_TILE_CORE`` (1024) pixels plus the overlap, shrunk to the smallest equal size that
covers the image with that many tiles.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError, unknown_choice
from ..hub import ModelMixin, register_to_config, wrap_output
from ..utils import is_int

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACT_FNS = ("silu", "swish", "relu", "gelu", "mish")  # diffusers' get_activation names
# compared case-insensitively: the conversion script writes "conv", older configs "Conv"
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
TILING_CHOICES = ("auto", True, False)

NORM_EPS = 1e-5  # every norm of the reference (RMS and batch norm)
ATTN_EPS = 1e-15  # linear-attention normaliser guard, as in the reference

AUTO_TILE_PIXELS = 2048 * 2048  # tiling="auto" tiles images with more pixels than this
DEFAULT_TILE_CORE = 1024  # default tile side, image pixels, before adding the overlap
TILE_BATCH_PIXELS = 1024 * 1024  # default tile_batch: as many tiles per call as fit this many output pixels
DEFAULT_CHUNK = 8192  # positions per strip when the attention stages run on the whole map
# Inference decodes on CUDA run channels-last (NHWC) unless this is "0": cuDNN's 3x3 convolutions then
# need no NCHW <-> NHWC transposes, which otherwise cost up to two activation-sized workspaces per call.
CHANNELS_LAST_ENV = "SANAFLOW_DCAE_CHANNELS_LAST"


def use_channels_last(x: torch.Tensor) -> bool:
    """Whether a decode of `x` runs channels-last: on CUDA without autograd (training keeps its parameters'
    layout, which DDP / FSDP have already bucketed), unless SANAFLOW_DCAE_CHANNELS_LAST=0."""
    return x.is_cuda and not torch.is_grad_enabled() and os.environ.get(CHANNELS_LAST_ENV, "1") != "0"


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm2d(nn.Module):
    """RMS norm over the channel axis of a (B, C, H, W) map, with weight and bias."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 even for bf16 weights, as the reference does; vector_norm upcasts
        # inside the reduction, so no fp32 copy of the whole map is made
        sq = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True, dtype=torch.float32).square()  # (B, 1, H, W)
        # the (B, 1, H, W) scale is cast, not the map: no fp32 copy of a half-precision map
        y = (x * torch.rsqrt(sq / x.shape[1] + self.eps).to(x.dtype)).to(self.weight.dtype)  # (B, C, H, W)
        if torch.is_grad_enabled():
            return torch.addcmul(self.bias[:, None, None], y, self.weight[:, None, None])
        return y.mul_(self.weight[:, None, None]).add_(self.bias[:, None, None])  # inference: in place


def make_norm(norm_type: str, channels: int) -> nn.Module:
    """A channel norm for (B, C, H, W) maps: 'rms_norm' or 'batch_norm'."""
    if norm_type == "rms_norm":
        return RMSNorm2d(channels)
    if norm_type == "batch_norm":
        return nn.BatchNorm2d(channels, eps=NORM_EPS)
    raise unknown_choice("norm type", str(norm_type), NORM_TYPES)


class Activation(nn.Module):
    """An activation by diffusers' name (case-insensitive); applied in place when no gradient is recorded."""

    _FNS: dict[str, Callable[..., torch.Tensor]] = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "mish": F.mish}

    def __init__(self, name: str):
        super().__init__()
        key = name.lower()
        if key not in ACT_FNS:
            raise unknown_choice("activation", name, ACT_FNS)
        self.name = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "gelu":
            return F.gelu(x)
        # in place saves one full-size map per call in inference; autograd needs the input kept
        return self._FNS[self.name](x, inplace=not torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return self.name


def make_act(name: str | None) -> nn.Module:
    """An activation by diffusers' name; None is the identity."""
    return nn.Identity() if name is None else Activation(name)


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a Linear weight (out, in) across the channels of a (B, in, H, W) map."""
    return F.conv2d(x, weight[:, :, None, None])  # (B, out, H, W)


class ResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input."""

    def __init__(self, channels: int, norm_type: str, act_fn: str | None):
        super().__init__()
        self.nonlinearity = make_act(act_fn)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = make_norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.nonlinearity(self.conv1(x)))  # (B, C, H, W)
        return self.norm(h).add_(x)  # the norm's output is fresh: add the residual in place


class MultiscaleProjection(nn.Module):
    """Depthwise kxk conv then grouped 1x1 conv: the qkv of one extra attention scale."""

    def __init__(self, inner: int, num_heads: int, kernel_size: int):
        super().__init__()
        channels = 3 * inner  # q, k and v together
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * num_heads, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(qkv))  # (B, 3I, H, W)


def _relu_heads(qkv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, heads * 3 * head_dim, H, W), q/k/v contiguous per head -> ReLU q, ReLU k, v, each (B, heads, d, N)."""
    b, _, h, w = qkv.shape
    q, k, v = qkv.reshape(b, -1, 3 * head_dim, h * w).chunk(3, dim=2)
    return F.relu(q), F.relu(k), v


def multiscale_relu_attention(qkv: torch.Tensor, head_dim: int, eps: float = ATTN_EPS) -> torch.Tensor:
    """ReLU attention of DC-AE over (B, heads * 3 * head_dim, H, W), q/k/v contiguous per head.

    Linear (O(N d^2), fp32) when the map has more positions than head_dim, otherwise the small
    quadratic form; both normalise by the summed ReLU scores, as the reference does.
    """
    b, _, h, w = qkv.shape
    dtype = qkv.dtype
    if h * w > head_dim:
        # fp32: the k^T v sums over all positions overflow / lose precision in half precision
        q, k, v = _relu_heads(qkv.float(), head_dim)  # each (B, heads, d, N)
        kv = v @ k.transpose(-1, -2)  # (B, heads, d, d)
        num = kv @ q  # (B, heads, d, N)
        den = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q  # (B, heads, 1, N)
        out = (num / (den + eps)).to(dtype)
    else:
        q, k, v = _relu_heads(qkv, head_dim)
        scores = (k.transpose(-1, -2) @ q).float()  # (B, heads, N_k, N_q)
        scores = scores / (scores.sum(dim=2, keepdim=True) + eps)
        out = v @ scores.to(v.dtype)  # (B, heads, d, N)
    return out.reshape(b, -1, h, w)  # (B, heads * d, H, W)


class MultiscaleLinearAttention(nn.Module):
    """Multi-scale ReLU linear attention with output norm and residual (EfficientViT)."""

    def __init__(self, channels: int, head_dim: int, norm_type: str, kernel_sizes: Sequence[int]):
        super().__init__()
        self.head_dim = head_dim
        num_heads = int(channels // head_dim * 1.0)
        inner = num_heads * head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(inner, num_heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm_type, channels)
        self.halo = max((k // 2 for k in kernel_sizes), default=0)  # rows the multi-scale convs reach

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> multi-scale q/k/v (B, 3I(1+S), H, W)."""
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3I, C): one GEMM
        qkv = _pointwise(x, w_qkv)  # (B, 3I, H, W)
        return torch.cat([qkv, *(proj(qkv) for proj in self.to_qkv_multiscale)], dim=1)  # (B, 3I(1+S), H, W)

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention output (B, I(1+S), H, W) -> projected, normed, plus the residual x."""
        return self.norm_out(_pointwise(out, self.to_out.weight)).add_(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multiscale_relu_attention(self.qkv(x), self.head_dim)  # (B, I(1+S), H, W)
        return self.finish(out, x)

    def forward_strips(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Same as forward, `rows` rows at a time: pass 1 sums k^T v and k over all strips, pass 2 applies them.

        Peak memory is one strip's q/k/v instead of the whole map's (fp32, 6x the channels).
        """
        b, _, h, w = x.shape
        if h <= rows or h * w <= self.head_dim:
            return self(x)

        def strip_qkv(a: int, e: int) -> torch.Tensor:
            lo, hi = max(0, a - self.halo), min(h, e + self.halo)  # the multi-scale convs need halo rows
            return self.qkv(x[:, :, lo:hi])[:, :, a - lo: e - lo].float()  # (B, 3I(1+S), e - a, W)

        kv = ksum = None
        for a in range(0, h, rows):
            _, k, v = _relu_heads(strip_qkv(a, min(h, a + rows)), self.head_dim)  # (B, heads, d, n)
            part_kv, part_k = v @ k.transpose(-1, -2), k.sum(dim=-1, keepdim=True)  # (B, heads, d, d), (B, heads, d, 1)
            kv, ksum = (part_kv, part_k) if kv is None else (kv + part_kv, ksum + part_k)
        out = torch.empty_like(x)
        for a in range(0, h, rows):
            e = min(h, a + rows)
            q, _, _ = _relu_heads(strip_qkv(a, e), self.head_dim)
            o = (kv @ q) / (ksum.transpose(-1, -2) @ q + ATTN_EPS)  # (B, heads, d, n)
            out[:, :, a:e] = self.finish(o.to(x.dtype).reshape(b, -1, e - a, w), x[:, :, a:e])
        return out


class GLUMBConv(nn.Module):
    """1x1 expand -> SiLU -> depthwise 3x3 -> GLU gate -> 1x1 project -> RMS norm, plus the input."""

    def __init__(self, channels: int, expand_ratio: float = 4.0):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 2h, H, W)
        h, gate = h.chunk(2, dim=1)  # (B, h, H, W) each
        h = self.conv_point(h * F.silu(gate))  # (B, C, H, W)
        return self.norm(h).add_(x)


class EfficientViTBlock(nn.Module):
    """Global context (multi-scale linear attention) then local mixing (GLU MBConv)."""

    def __init__(self, channels: int, head_dim: int, norm_type: str, qkv_multiscales: Sequence[int]):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, norm_type, qkv_multiscales)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def make_block(block_type: str, channels: int, head_dim: int, norm_type: str, act_fn: str | None,
               qkv_multiscales: Sequence[int]) -> nn.Module:
    """One stage layer by name ('ResBlock' or 'EfficientViTBlock')."""
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim, norm_type, qkv_multiscales)
    raise unknown_choice("block type", str(block_type), BLOCK_TYPES)


class DownBlock(nn.Module):
    """Halve H and W: strided conv ('Conv') or conv + pixel-unshuffle, plus a channel-mean shortcut."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group_size = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if pixel_unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, 3, stride=1 if pixel_unshuffle else 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.pixel_unshuffle:
            y = F.pixel_unshuffle(y, 2)  # (B, out, H/2, W/2)
        if self.shortcut:
            s = F.pixel_unshuffle(x, 2)  # (B, 4 in, H/2, W/2)
            y = y + s.unflatten(1, (-1, self.group_size)).mean(dim=2)  # (B, out, H/2, W/2)
        return y


def _nearest_phase_map() -> torch.Tensor:
    """M[a, o, d] = 1 where fine offset d (-1..1) from output phase a (0, 1) of a 2x nearest upsample reads coarse offset o (-1..1)."""
    m = torch.zeros(2, 3, 3)
    for a in range(2):
        for d in range(-1, 2):
            m[a, (a + d) // 2 + 1, d + 1] = 1.0
    return m


_PHASES = _nearest_phase_map()


def polyphase_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight (O, I, 3, 3) after a 2x nearest upsample -> the equal conv (4 O, I, 3, 3) on the coarse grid.

    Output channel o * 4 + a * 2 + b is output phase (a, b), the order `pixel_shuffle` expects,
    so conv3x3(upsample(x)) == pixel_shuffle(conv3x3(x, polyphase_weight(w))) without ever
    holding the 4x larger upsampled input.
    """
    m = _PHASES.to(device=weight.device, dtype=torch.float32)
    w = torch.einsum("ayd,bxe,oide->oabiyx", m, m, weight.float())  # (O, 2, 2, I, 3, 3)
    return w.flatten(0, 2).to(weight.dtype)  # (4 O, I, 3, 3)


class UpBlock(nn.Module):
    """Double H and W: nearest upsample + conv ('interpolate') or conv + pixel-shuffle, plus a repeat shortcut."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = out_channels * 4 // in_channels
        conv_out = out_channels if interpolate else out_channels * 4
        self.conv = nn.Conv2d(in_channels, conv_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both variants become one coarse-grid conv to 4x channels, then a pixel shuffle: the
        # interpolate variant through its polyphase weights (no 4x upsampled copy of x).
        if self.interpolate:
            bias = self.conv.bias.repeat_interleave(4)
            y = F.conv2d(x, polyphase_weight(self.conv.weight), bias, padding=1)  # (B, 4 out, H, W)
        else:
            y = self.conv(x)  # (B, 4 out, H, W)
        if self.shortcut:
            # pixel_shuffle(repeat_interleave(x)) added before the shuffle, in place, from a broadcast view
            y.unflatten(1, (x.shape[1], self.repeats)).add_(x.unsqueeze(2))
        return F.pixel_shuffle(y, 2)  # (B, out, 2H, 2W)


@dataclass(frozen=True)
class Step:
    """One layer of a network as the tiler sees it."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: float  # receptive-field radius in input positions; inf for global (attention) layers
    scale: float  # output resolution / input resolution


def layer_step(layer: nn.Module) -> Step:
    """The tiling geometry of a DC-AE layer (conservative radii)."""
    if isinstance(layer, ResBlock):
        return Step(layer, 2, 1)  # two 3x3 convs
    if isinstance(layer, EfficientViTBlock):
        return Step(layer, math.inf, 1)  # linear attention sees the whole map
    if isinstance(layer, UpBlock):
        return Step(layer, 1, 2)
    if isinstance(layer, DownBlock):
        return Step(layer, 2, 0.5)  # 3x3 conv + the 2x2 block it folds
    if isinstance(layer, nn.Conv2d):
        return Step(layer, layer.kernel_size[0] // 2 * layer.dilation[0], 1 / layer.stride[0])
    raise TypeError(f"no tiling geometry for {type(layer).__name__}")


class _Stages(nn.Module):
    """Encoder / decoder base: layers run in order, optionally under gradient checkpointing."""

    gradient_checkpointing: bool = False

    def steps(self) -> list[Step]:
        """The network as an ordered list of steps (stem, stage layers, head)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for step in self.steps():
            # stems and heads are cheap; checkpoint the real layers only
            x = checkpoint(step.fn, x, use_reentrant=False) if ckpt and isinstance(step.fn, nn.Module) else step.fn(x)
        return x


class Encoder(_Stages):
    """Image (B, 3, H, W) -> latent (B, C, H/f, W/f)."""

    def __init__(self, in_channels: int, latent_channels: int, head_dim: int, block_types: Sequence[str],
                 channels: Sequence[int], layers: Sequence[int], qkv_multiscales: Sequence[Sequence[int]],
                 downsample_block_type: str, out_shortcut: bool):
        super().__init__()
        pixel_unshuffle = downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(in_channels, channels[0], 3, 1, 1)
        else:  # an empty first stage: the input conv does its downsampling
            self.conv_in = DownBlock(in_channels, channels[1], pixel_unshuffle, shortcut=False)
        stages = []
        for i, (ch, n) in enumerate(zip(channels, layers)):
            stage = [make_block(block_types[i], ch, head_dim, "rms_norm", "silu", qkv_multiscales[i]) for _ in range(n)]
            if i < len(channels) - 1 and n > 0:
                stage.append(DownBlock(ch, channels[i + 1], pixel_unshuffle, shortcut=True))
            stages.append(nn.Sequential(*stage))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(channels[-1], latent_channels, 3, 1, 1)
        self.out_shortcut = out_shortcut
        self.out_group = channels[-1] // latent_channels

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Deepest features (B, C_last, h, w) -> latent (B, latent, h, w), with the channel-mean shortcut."""
        z = self.conv_out(x)
        if self.out_shortcut:
            z = z + x.unflatten(1, (-1, self.out_group)).mean(dim=2)
        return z

    def steps(self) -> list[Step]:
        """conv_in, every stage layer, then the head."""
        layers = [layer_step(self.conv_in)] + [layer_step(m) for stage in self.down_blocks for m in stage]
        return layers + [Step(self.head, 1, 1)]


class Decoder(_Stages):
    """Latent (B, C, h, w) -> image (B, 3, h f, w f)."""

    def __init__(self, in_channels: int, latent_channels: int, head_dim: int, block_types: Sequence[str],
                 channels: Sequence[int], layers: Sequence[int], qkv_multiscales: Sequence[Sequence[int]],
                 norm_types: Sequence[str], act_fns: Sequence[str | None], upsample_block_type: str,
                 in_shortcut: bool, conv_act_fn: str):
        super().__init__()
        interpolate = upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(latent_channels, channels[-1], 3, 1, 1)
        self.in_shortcut = in_shortcut
        self.in_repeats = channels[-1] // latent_channels
        stages = []
        for i, (ch, n) in enumerate(zip(channels, layers)):
            stage = []
            if i < len(channels) - 1 and n > 0:
                stage.append(UpBlock(channels[i + 1], ch, interpolate, shortcut=True))
            stage += [make_block(block_types[i], ch, head_dim, norm_types[i], act_fns[i], qkv_multiscales[i])
                      for _ in range(n)]
            stages.append(nn.Sequential(*stage))
        self.up_blocks = nn.ModuleList(stages)  # indexed by stage; run from the deepest one up
        out_ch = channels[0] if layers[0] > 0 else channels[1]
        self.norm_out = RMSNorm2d(out_ch)
        self.conv_act = make_act(conv_act_fn)
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(out_ch, in_channels, 3, 1, 1)
        else:  # an empty first stage: the output conv does its upsampling
            self.conv_out = UpBlock(out_ch, in_channels, interpolate, shortcut=False)

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> deepest features (B, C_last, h, w), with the channel-repeat shortcut."""
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + z.repeat_interleave(self.in_repeats, dim=1, output_size=z.shape[1] * self.in_repeats)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Shallowest features -> image: RMS norm, activation, output conv."""
        return self.conv_out(self.conv_act(self.norm_out(x)))

    def steps(self) -> list[Step]:
        """The stem, every stage layer from the deepest stage up, then the head."""
        out = layer_step(self.conv_out)
        layers = [layer_step(m) for stage in reversed(self.up_blocks) for m in stage]
        return [Step(self.stem, 1, 1), *layers, Step(self.head, out.radius, out.scale)]


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    """Raised cosine from 0 to 1 on t in [0, 1]; s(t) + s(1 - t) = 1."""
    return 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0.0, 1.0))


def _share(positions: torch.Tensor, mid: float, width: float) -> torch.Tensor:
    """The later tile's share at absolute `positions` of a cross-fade of `width` centred on `mid`."""
    if width <= 0:  # a hard cut
        return (positions > mid).double()
    return _smoothstep((positions - (mid - width / 2)) / width)


def tile_starts(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Equal tiles covering [0, size): (starts, tile length).

    As few tiles of at most `tile` as overlap by >= `overlap`, each then shrunk to the smallest
    length that still covers, and spread evenly (least wasted work, one shape for batching).
    """
    if size <= tile:
        return [0], size
    n = math.ceil((size - overlap) / (tile - overlap))
    tile = min(tile, math.ceil((size - overlap) / n) + overlap)
    return [round(i * (size - tile) / (n - 1)) for i in range(n)], tile


def tile_weights(starts: Sequence[int], tile: int, scale: int, halo: int = 0) -> torch.Tensor:
    """Per-tile 1-D blending weights (n, tile * scale) on the output grid; they sum to 1 at every position.

    The boundary between tiles k and k+1 sits in the middle of their overlap. Where the overlap
    leaves room beyond the `halo` each tile needs for exact values, the tiles cross-fade (raised
    cosine) inside that exact zone, else they are cut hard there (halo == overlap / 2: exact, no
    seam). Where the overlap is smaller than 2 * halo (approximate tiling), they cross-fade over
    the whole overlap, so a tile's inexact border gets almost no weight. Fades never intersect.
    """
    n = len(starts)
    pos = torch.arange(tile * scale, dtype=torch.float64) + 0.5  # pixel centres within a tile
    weights = torch.ones(n, tile * scale, dtype=torch.float64)
    for k in range(n - 1):
        overlap = starts[k] + tile - starts[k + 1]
        stride = starts[k + 1] - starts[k]
        exact_zone = overlap - 2 * halo
        width = min(exact_zone if exact_zone >= 0 else overlap, stride) * scale
        mid = (starts[k + 1] + starts[k] + tile) * scale / 2  # absolute position of the boundary
        weights[k + 1] *= _share(starts[k + 1] * scale + pos, mid, width)  # tile k+1 takes over ...
        weights[k] *= 1.0 - _share(starts[k] * scale + pos, mid, width)  # ... from tile k
    return weights.float()


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, halo: int,
              in_scale: int, out_scale: int, tile_batch: int) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results into one buffer.

    Tiles live on a grid whose unit is `in_scale` input positions and `out_scale` output
    positions; `x` is (B, C, gh * in_scale, gw * in_scale) and `fn` maps a (b, C, t * in_scale, ...)
    batch of tiles to (b, C_out, t * out_scale, ...). `tile` (the largest tile), `overlap` and `halo` (the receptive
    field of `fn` in grid units; overlap >= 2 * halo makes the result exact) are grid units.
    Tiles run `tile_batch` at a time. Returns fn's dtype.
    """
    b = x.shape[0]
    gh, gw = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    ys, th = tile_starts(gh, tile, overlap)
    xs, tw = tile_starts(gw, tile, overlap)
    wy = tile_weights(ys, th, out_scale, halo).to(x.device)  # (ny, th * out_scale), computed once
    wx = tile_weights(xs, tw, out_scale, halo).to(x.device)  # (nx, tw * out_scale)
    out: torch.Tensor | None = None
    jobs = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    for c in range(0, len(jobs), tile_batch):
        chunk = jobs[c: c + tile_batch]
        tiles = torch.cat([x[:, :, ys[i] * in_scale: (ys[i] + th) * in_scale, xs[j] * in_scale: (xs[j] + tw) * in_scale]
                           for i, j in chunk])  # (len(chunk) * B, C, th * in_scale, tw * in_scale)
        res = fn(tiles)  # (len(chunk) * B, C_out, th * out_scale, tw * out_scale)
        if out is None:
            # in fn's dtype: a pixel sums at most 4 weighted tiles (mostly 1 with the exact default overlap)
            out = res.new_zeros(b, res.shape[1], gh * out_scale, gw * out_scale)
        for n, (i, j) in enumerate(chunk):
            w = (wy[i][:, None] * wx[j][None, :]).to(res.dtype)  # (th * out_scale, tw * out_scale)
            y0, x0 = ys[i] * out_scale, xs[j] * out_scale
            out[:, :, y0: y0 + th * out_scale, x0: x0 + tw * out_scale].addcmul_(res[n * b: (n + 1) * b], w)
        del res, tiles
    return out


def _chain(steps: Sequence[Step]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One function running `steps` in order."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step.fn(x)
        return x
    return run


def run_strips(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: int, scale: float,
               rows: int) -> torch.Tensor:
    """Apply a local layer (receptive-field `radius` rows, resolution `scale`) to `x` `rows` input rows at a time.

    Each strip is computed with `radius` extra rows on either side and cropped, so the result
    equals fn(x) while only one strip's intermediates are alive at a time.
    """
    h = x.shape[-2]
    if h <= rows:
        return fn(x)
    if scale < 1:  # downsampling by 1/scale: strips and halos start on its grid
        q = round(1 / scale)
        rows, radius = -(-rows // q) * q, -(-radius // q) * q
    out = None
    for a in range(0, h, rows):
        e = min(h, a + rows)
        lo, hi = max(0, a - radius), min(h, e + radius)
        y = fn(x[:, :, lo:hi])  # (B, C_out, (hi - lo) * scale, W * scale)
        if out is None:
            out = y.new_empty(*y.shape[:2], round(h * scale), y.shape[-1])
        out[:, :, round(a * scale): round(e * scale)] = y[:, :, round((a - lo) * scale): round((e - lo) * scale)]
        del y
    return out


def run_whole_map(steps: Sequence[Step], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run steps on the whole map, each in strips of about `chunk` positions (exact; bounded memory)."""
    for step in steps:
        rows = max(2, chunk // x.shape[-1])
        if isinstance(step.fn, EfficientViTBlock):
            x = step.fn.attn.forward_strips(x, rows)
            x = run_strips(step.fn.conv_out, x, 1, 1, rows)
        elif math.isinf(step.radius):
            x = step.fn(x)
        else:
            x = run_strips(step.fn, x, math.ceil(step.radius), step.scale, rows)
    return x


def local_geometry(steps: Sequence[Step], in_per_grid: float) -> tuple[float, float]:
    """Receptive-field radius (grid units) and total scale of a run of local steps.

    `in_per_grid` is how many input positions of the first step make one grid unit.
    """
    radius, per_grid = 0.0, in_per_grid
    for step in steps:
        radius += step.radius / per_grid
        per_grid *= step.scale
    return radius, per_grid / in_per_grid


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _tile_batch(tile_batch: int | None, tile_px: int) -> int:
    """Tiles per network call: as given (checked by `_check_tile_options`), or as many as fit TILE_BATCH_PIXELS."""
    if tile_batch is None:
        return max(1, TILE_BATCH_PIXELS // (tile_px * tile_px))  # big tiles already fill a GPU
    return tile_batch


def _check_tile_options(f: int, tile: object = None, overlap: object = None, tile_batch: object = None,
                        chunk: object = None) -> None:
    """Refuse ill-typed or out-of-range tiling options (None: the default); `f` is the compression ratio.

    Run whenever the options are given, whether or not the call ends up tiling, so a typo never waits
    for the first large image to surface.
    """
    for name, value in (("tile", tile), ("overlap", overlap), ("tile_batch", tile_batch), ("chunk", chunk)):
        if value is not None and not is_int(value):
            raise InputError(f"{name} must be an int (or None for the default); got {type(value).__name__} {value!r}")
    if (tile is not None and (tile <= 0 or tile % f)) or (overlap is not None and (overlap < 0 or overlap % f)):
        raise InputError(f"tile ({tile}) must be positive and overlap ({overlap}) non-negative multiples of {f} pixels")
    for name, value in (("tile_batch", tile_batch), ("chunk", chunk)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be an int >= 1 (or None for the default); got {value}")


def _per_stage(value, n: int, name: str) -> tuple:
    """A config value given once (str) or per stage (list/tuple of length n), as a tuple of n."""
    if value is None or isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ConfigError(f"{name} has {len(value)} entries; expected one per stage ({n}) or a single value")
    return value


def _check_choice(kind: str, values: Sequence, choices: Sequence) -> None:
    for v in values:
        if v not in choices:
            raise unknown_choice(kind, str(v), [str(c) for c in choices])


def _block_type_name(kind: str, value: Any, choices: Sequence[str]) -> str:
    """A down/upsample block type as its lower-case name (configs spell "Conv" and "conv")."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise unknown_choice(kind, str(value), list(choices))
    return value.lower()


class DCAEEncoderOutput(NamedTuple):
    """`DCAE.encode(..., return_dict=True)`, like diffusers' ``EncoderOutput``: ``.latent`` and ``[0]``."""

    latent: torch.Tensor


class DCAEDecoderOutput(NamedTuple):
    """`DCAE.decode(..., return_dict=True)`, like diffusers' ``DecoderOutput``: ``.sample`` and ``[0]``."""

    sample: torch.Tensor


class DCAE(ModelMixin):
    """Deep-compression autoencoder (diffusers ``AutoencoderDC`` layout): images <-> unscaled latents."""

    diffusers_class_name = "AutoencoderDC"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 32,
        attention_head_dim: int = 32,
        encoder_block_types: str | tuple[str, ...] = "ResBlock",
        decoder_block_types: str | tuple[str, ...] = "ResBlock",
        encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3),
        decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,)),
        upsample_block_type: str = "pixel_shuffle",
        downsample_block_type: str = "pixel_unshuffle",
        decoder_norm_types: str | tuple[str, ...] = "rms_norm",
        decoder_act_fns: str | tuple[str, ...] = "silu",
        encoder_out_shortcut: bool = True,
        decoder_in_shortcut: bool = True,
        decoder_conv_act_fn: str = "relu",
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        enc_ch, dec_ch = tuple(encoder_block_out_channels), tuple(decoder_block_out_channels)
        ne, nd = len(enc_ch), len(dec_ch)
        if ne < 2 or ne != nd:
            raise ConfigError(
                f"encoder_block_out_channels ({ne} stages) and decoder_block_out_channels ({nd} stages) "
                "must have the same number of stages, at least 2"
            )
        enc_layers = _per_stage(encoder_layers_per_block, ne, "encoder_layers_per_block")
        dec_layers = _per_stage(decoder_layers_per_block, nd, "decoder_layers_per_block")
        enc_types = _per_stage(encoder_block_types, ne, "encoder_block_types")
        dec_types = _per_stage(decoder_block_types, nd, "decoder_block_types")
        enc_scales = _per_stage(encoder_qkv_multiscales, ne, "encoder_qkv_multiscales")
        dec_scales = _per_stage(decoder_qkv_multiscales, nd, "decoder_qkv_multiscales")
        norms = _per_stage(decoder_norm_types, nd, "decoder_norm_types")
        acts = _per_stage(decoder_act_fns, nd, "decoder_act_fns")
        _check_choice("block type", enc_types + dec_types, BLOCK_TYPES)
        _check_choice("decoder norm type", norms, NORM_TYPES)
        _check_choice("decoder activation", [a.lower() for a in acts if a is not None], ACT_FNS)
        _check_choice("decoder_conv_act_fn", [decoder_conv_act_fn.lower()], ACT_FNS)
        for side, types, chans, layers in (("encoder", enc_types, enc_ch, enc_layers),
                                           ("decoder", dec_types, dec_ch, dec_layers)):
            for i, (kind, c, n) in enumerate(zip(types, chans, layers)):
                if kind == "EfficientViTBlock" and n and c < attention_head_dim:
                    raise ConfigError(
                        f"{side} stage {i}: an EfficientViTBlock with {c} channels has no attention head of "
                        f"attention_head_dim={attention_head_dim}; give it >= {attention_head_dim} channels"
                    )
        downsample_block_type = _block_type_name("downsample_block_type", downsample_block_type, DOWNSAMPLE_TYPES)
        upsample_block_type = _block_type_name("upsample_block_type", upsample_block_type, UPSAMPLE_TYPES)
        if (encoder_out_shortcut and enc_ch[-1] % latent_channels) or (decoder_in_shortcut and dec_ch[-1] % latent_channels):
            raise ConfigError(
                f"the deepest stage's channels ({enc_ch[-1]}, {dec_ch[-1]}) must be a multiple of "
                f"latent_channels ({latent_channels}) for the latent shortcuts"
            )
        self.encoder = Encoder(in_channels, latent_channels, attention_head_dim, enc_types, enc_ch, enc_layers,
                               enc_scales, downsample_block_type, encoder_out_shortcut)
        self.decoder = Decoder(in_channels, latent_channels, attention_head_dim, dec_types, dec_ch, dec_layers,
                               dec_scales, norms, acts, upsample_block_type, decoder_in_shortcut, decoder_conv_act_fn)

    def _decode_format(self, x: torch.Tensor) -> torch.memory_format:
        """The memory format a decode of `x` runs in; puts the decoder's conv weights in it (a no-op when they are)."""
        fmt = torch.channels_last if use_channels_last(x) else torch.contiguous_format
        w = self.decoder.conv_in.weight
        if not w.is_contiguous(memory_format=fmt):  # converted once, kept until the format changes
            self.decoder.to(memory_format=fmt)
        return fmt

    # ---- properties -----------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        """Image pixels per latent position along each axis (32 for SANA's f32c32)."""
        return 2 ** (len(self.config.encoder_block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """Multiply latents by this before the diffusion model, divide before `decode`."""
        return float(self.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.decoder.conv_in.weight.dtype

    # ---- training -------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward instead of storing them (training)."""
        self.encoder.gradient_checkpointing = True
        self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Store activations again (the default)."""
        self.encoder.gradient_checkpointing = False
        self.decoder.gradient_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images (B, 3, H, W) in [-1, 1] through encode and decode, untiled (for training)."""
        return self.decode(self.encode(images, tiling=False), tiling=False)

    # ---- input checks ---------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        """Refuse anything but a floating-point (B, C, H, W) tensor with positive sides divisible by f."""
        c, f = self.config.in_channels, self.spatial_compression_ratio
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor (B, {c}, H, W) in [-1, 1]; got {type(images).__name__}")
        if not images.is_floating_point():
            raise InputError(f"images must be a floating-point tensor (B, {c}, H, W) in [-1, 1]; got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != c:
            raise InputError(f"images must be (B, {c}, H, W); got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h == 0 or w == 0:
            raise InputError(f"image sides must be positive multiples of the compression ratio {f}; got {h}x{w}")
        if h % f or w % f:
            raise InputError(
                f"image size {h}x{w} is not divisible by the compression ratio {f}; "
                f"crop or resize to a multiple of {f} (e.g. {h // f * f or f}x{w // f * f or f})"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        """Refuse anything but a floating-point (B, C, h, w) tensor of this model's channels with positive sides."""
        c = self.config.latent_channels
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch.Tensor (B, {c}, h, w); got {type(latents).__name__}")
        if not latents.is_floating_point():
            raise InputError(f"latents must be a floating-point tensor (B, {c}, h, w); got {latents.dtype}")
        if latents.ndim != 4:
            raise InputError(f"latents must be (B, {c}, h, w); got shape {tuple(latents.shape)}")
        if latents.shape[1] != c:
            raise InputError(
                f"latents have {latents.shape[1]} channels; this DCAE expects {c} "
                f"(shape {tuple(latents.shape)}, expected (B, {c}, h, w))"
            )
        h, w = latents.shape[-2:]
        if h == 0 or w == 0:
            f = self.spatial_compression_ratio
            raise InputError(
                f"latent sides must be positive (the image sides are positive multiples of the compression "
                f"ratio {f}); got {h}x{w}"
            )

    def _tile_grid(self, tile: int | None, overlap: int | None, px_per_grid: int, halo: int) -> tuple[int, int]:
        """Tile and overlap in image pixels -> grid units of `px_per_grid` pixels, validated."""
        f = self.spatial_compression_ratio
        _check_tile_options(f, tile, overlap)
        o = 2 * halo if overlap is None else overlap // px_per_grid
        tile = DEFAULT_TILE_CORE + o * px_per_grid if tile is None else tile
        t = tile // px_per_grid
        if o >= t:
            what = f"overlap ({overlap} px)" if overlap is not None else f"receptive-field overlap ({o * px_per_grid} px)"
            least = -(-(o + 1) * px_per_grid // f) * f
            raise InputError(f"the {what} must be smaller than the tile ({tile} px); use a larger tile (>= {least} px)")
        return t, o

    def _encoder_split(self) -> tuple[list[Step], list[Step], int, int]:
        """Encoder steps -> (tiled local steps, whole-map rest, image pixels per local-output position, halo)."""
        steps = self.encoder.steps()
        first_global = next((i for i, st in enumerate(steps) if math.isinf(st.radius)), len(steps))
        local, rest = steps[:first_global], steps[first_global:]
        px_per_grid = round(1 / math.prod(st.scale for st in local))
        radius, _ = local_geometry(local, px_per_grid)
        return local, rest, px_per_grid, math.ceil(radius)

    def _decoder_split(self) -> tuple[list[Step], list[Step], int, int]:
        """Decoder steps -> (whole-map rest, tiled local steps, image pixels per local-input position, halo)."""
        steps = self.decoder.steps()
        last_global = max((i for i, st in enumerate(steps) if math.isinf(st.radius)), default=-1)
        rest, local = steps[: last_global + 1], steps[last_global + 1:]
        radius, px_per_grid = local_geometry(local, 1)
        return rest, local, round(px_per_grid), math.ceil(radius)

    def _check_tiling_request(self, tiled: bool, split: Callable[[], tuple], tile, overlap, tile_batch) -> None:
        """Check the tiling options of an encode / decode even when this call does not tile.

        A typo then never waits for the first large image to surface; `split` is `_encoder_split` or
        `_decoder_split`, whose geometry the tiled path checks the tile against itself.
        """
        _check_tile_options(self.spatial_compression_ratio, tile, overlap, tile_batch)
        if not tiled and (tile is not None or overlap is not None):
            *_, px_per_grid, halo = split()
            self._tile_grid(tile, overlap, px_per_grid, halo)

    def wants_tiling(self, height: int, width: int, tiling: bool | str = "auto") -> bool:
        """Whether an image of height x width pixels goes through the tiled path under `tiling`."""
        if tiling not in TILING_CHOICES or not isinstance(tiling, bool | str):
            raise InputError(f"tiling must be 'auto', True or False; got {tiling!r}")
        if tiling == "auto":
            return height * width > AUTO_TILE_PIXELS
        return bool(tiling)

    # ---- encode / decode ------------------------------------------------------------------

    def encode(self, images: torch.Tensor, tiling: bool | str = "auto", tile: int | None = None,
               overlap: int | None = None, tile_batch: int | None = None, *,
               return_dict: bool | None = None) -> torch.Tensor | DCAEEncoderOutput | tuple[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, C, H/f, W/f); tiled per `tiling`.

        `return_dict` as in diffusers' ``AutoencoderDC.encode``: True wraps the latents as
        `DCAEEncoderOutput` (``.latent``), False as ``(latents,)``; None (default) returns the tensor.
        """
        self._check_images(images)
        tiled = self.wants_tiling(images.shape[-2], images.shape[-1], tiling)
        self._check_tiling_request(tiled, self._encoder_split, tile, overlap, tile_batch)
        if images.shape[0] == 0:
            z = self._empty_latents(images)
        elif tiled:
            z = self.tiled_encode(images, tile=tile, overlap=overlap, tile_batch=tile_batch)
        else:
            z = self.encoder(images.to(self.dtype))
        return wrap_output(z, return_dict, DCAEEncoderOutput)

    def decode(self, latents: torch.Tensor, tiling: bool | str = "auto", tile: int | None = None,
               overlap: int | None = None, tile_batch: int | None = None, *,
               return_dict: bool | None = None) -> torch.Tensor | DCAEDecoderOutput | tuple[torch.Tensor]:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h f, w f) in about [-1, 1]; tiled per `tiling`.

        `return_dict` as in diffusers' ``AutoencoderDC.decode`` (True: `DCAEDecoderOutput`, ``.sample``;
        False: ``(images,)``; None, the default: the tensor), so diffusers' SANA pipelines can decode
        with this model.
        """
        self._check_latents(latents)
        f = self.spatial_compression_ratio
        tiled = self.wants_tiling(latents.shape[-2] * f, latents.shape[-1] * f, tiling)
        self._check_tiling_request(tiled, self._decoder_split, tile, overlap, tile_batch)
        if latents.shape[0] == 0:
            x = self._empty_images(latents)
        elif tiled:
            x = self.tiled_decode(latents, tile=tile, overlap=overlap, tile_batch=tile_batch)
        else:
            z = latents.to(self.dtype)
            x = self.decoder(z.contiguous(memory_format=self._decode_format(z)))
        return wrap_output(x, return_dict, DCAEDecoderOutput)

    def _empty_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The encoding of an empty batch (0, 3, H, W): (0, C, H/f, W/f) in the weights' dtype."""
        f = self.spatial_compression_ratio
        shape = (0, self.config.latent_channels, images.shape[-2] // f, images.shape[-1] // f)
        return images.new_empty(shape, dtype=self.dtype)

    def _empty_images(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoding of an empty batch (0, C, h, w): (0, 3, h f, w f) in the weights' dtype."""
        f = self.spatial_compression_ratio
        shape = (0, self.config.in_channels, latents.shape[-2] * f, latents.shape[-1] * f)
        return latents.new_empty(shape, dtype=self.dtype)

    def tiled_encode(self, images: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                     tile_batch: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Encode in tiles of at most `tile` pixels (see the module doc); equal to untiled `encode` by default.

        The stages before the first attention layer run in tiles overlapping by `overlap` pixels
        (None: twice their receptive field, exact), `tile_batch` tiles per call (None: by tile
        size); the attention stages then run on the whole, 2^k times smaller map in strips of
        about `chunk` positions (None: DEFAULT_CHUNK).
        """
        self._check_images(images)
        _check_tile_options(self.spatial_compression_ratio, tile, overlap, tile_batch, chunk)
        local, rest, px_per_grid, halo = self._encoder_split()
        t, o = self._tile_grid(tile, overlap, px_per_grid, halo)
        if images.shape[0] == 0:
            return self._empty_latents(images)
        x = run_tiled(_chain(local), images.to(self.dtype), t, o, halo, in_scale=px_per_grid, out_scale=1,
                      tile_batch=_tile_batch(tile_batch, t * px_per_grid))  # (B, C_k, H / k, W / k)
        return run_whole_map(rest, x, DEFAULT_CHUNK if chunk is None else chunk)  # (B, latent, H / f, W / f)

    def tiled_decode(self, latents: torch.Tensor, tile: int | None = None, overlap: int | None = None,
                     tile_batch: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Decode in tiles of at most `tile` output pixels (see the module doc); equal to untiled `decode` by default.

        The stem and the attention stages (deep, small maps) run on the whole map in strips of
        about `chunk` positions (None: DEFAULT_CHUNK); the stages after the last attention layer,
        which hold nearly all the pixels and memory, run in tiles overlapping by `overlap` pixels
        (None: twice their receptive field, exact), `tile_batch` tiles per call (None: by tile
        size), accumulated into one output buffer.
        """
        self._check_latents(latents)
        _check_tile_options(self.spatial_compression_ratio, tile, overlap, tile_batch, chunk)
        rest, local, px_per_grid, halo = self._decoder_split()
        t, o = self._tile_grid(tile, overlap, px_per_grid, halo)
        if latents.shape[0] == 0:
            return self._empty_images(latents)
        fmt = self._decode_format(latents)
        z = latents.to(self.dtype).contiguous(memory_format=fmt)
        x = run_whole_map(rest, z, DEFAULT_CHUNK if chunk is None else chunk)  # (B, C_k, h 2^k, w 2^k)
        local = [Step(lambda t: t.contiguous(memory_format=fmt), 0, 1), *local]  # tiles in the decode's format
        return run_tiled(_chain(local), x, t, o, halo, in_scale=1, out_scale=px_per_grid,
                         tile_batch=_tile_batch(tile_batch, t * px_per_grid))  # (B, 3, h f, w f)
