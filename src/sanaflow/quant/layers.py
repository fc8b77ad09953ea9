"""Quantized replacements of ``nn.Linear`` and pointwise (1x1) ``nn.Conv2d`` layers.

- `Int8WeightOnlyLinear`: int8 weight with one float32 scale per output channel (symmetric,
  ``w ~ q * scale``); activations stay in the model dtype and the scale is applied to the matmul
  output (``x W^T = (x q^T) * scale``). Runs anywhere; on CPU through torch's int8-weight kernel.
- `Fp8Linear`: float8 e4m3 weight with a float32 scale per output channel, and the activation
  quantized on the fly with one scale per token row; one ``torch._scaled_mm`` (cuBLASLt / CUTLASS
  row-wise kernel, bf16 output) per call. Needs a GPU with FP8 tensor cores (sm_89+, e.g. H100).

An activation that only fp8 layers read can reach them already quantized (`Fp8Rows`): `prequantize`
quantizes one tensor once for several layers, and `norm_modulate_fp8` / `gated_residual_fp8` have
the row pass that produces the activation write it as fp8 rows in the first place (the bf16 tensor is
never written, nor read back to be quantized). `accepts_fp8_rows` says which layers may be given them.

Both store plain tensors (``weight``, ``weight_scale``, ``bias``) so a quantized model is written
and read with safetensors like any other. A pointwise conv is the same matmul over channels: the
layer reads (B, C, H, W) through a (B, H, W, C) view (free for the channels-last grids that
SANA's Mix-FFN produces) and returns (B, O, H, W) in the same layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..ops import norm as norm_ops
from ..ops.norm import row_quantizer

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_SCALE_MIN = 1e-12  # an all-zero row gets this scale instead of 0 (no division by zero)


def is_pointwise_conv(module: nn.Module) -> bool:
    """True for a 1x1, stride-1, unpadded, ungrouped Conv2d (a matmul over channels)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (O, I) float -> (q int8 (O, I), scale float32 (O,)), w ~ q * scale."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=_SCALE_MIN)  # (O,)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # (O, I)
    return q, scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 e4m3: x (R, I) -> (q fp8 (R, I), scale float32 (R, 1)), x ~ q * scale.

    On CUDA (with triton) one fused pass (`sanaflow.ops.triton_norm.quantize_rows`), else
    `quantize_fp8_rows_reference`: the same values.
    """
    if x.is_cuda and x.dim() == 2 and 0 < x.shape[1] <= _ROW_KERNEL_MAX:
        kernel = row_quantizer()
        if kernel is not None:
            return kernel(x, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    return quantize_fp8_rows_reference(x)


def quantize_fp8_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of `quantize_fp8_rows` (three passes: amax, scale, cast)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (R, 1)
    scale = amax.clamp(min=_SCALE_MIN) / FP8_MAX  # (R, 1)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # (R, I)
    return q, scale


_ROW_KERNEL_MAX = 16384  # widest row the kernel holds (sanaflow.ops.triton_norm.MAX_ROW)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., I) @ (int8 weight (O, I) * scale (O,))^T + bias -> (..., O) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, I)
    # Dequantise the weight for one float GEMM: int8 values are exact in any float dtype and the scale
    # goes on the (smaller) output. torch's int8-weight CPU kernel (`_weight_int8pack_mm`) was 4-40x
    # slower than this on the 2-core dev machine (one thread) at every M from 1 to 2,560 (1,170 vs 28 ms for
    # 2,560 x 256 -> 768), so it is not used.
    out = F.linear(x2, weight.to(x2.dtype)) * scale.to(x2.dtype)  # (M, O)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Rows(NamedTuple):
    """An activation quantized once for several fp8 layers that read it (`prequantize`)."""

    q: torch.Tensor  # (M, I) float8 e4m3, row-major
    scale: torch.Tensor  # (M, 1) float32
    shape: torch.Size  # the activation's shape (..., I)
    dtype: torch.dtype  # and its dtype (the layers' output dtype)


def _on_fp8_device(x: torch.Tensor) -> bool:
    # Where the fp8 matmul runs (the one device check of the fp8 paths; CPU tests that run the
    # matmul through torch's CPU _scaled_mm patch it).
    return x.is_cuda


def accepts_fp8_rows(*layers: nn.Module) -> bool:
    """True when every layer is an `Fp8Linear` (linear or pointwise conv) with no hooks: it may be given `Fp8Rows`."""
    return all(type(m) is Fp8Linear and not m._forward_hooks and not m._forward_pre_hooks for m in layers)


def fp8_rows_wanted(x: torch.Tensor) -> bool:
    """Whether the row passes producing activations like `x` should write them as fp8 rows for fp8 readers.

    True for tokens on the fp8 device with the fused row kernels switched on (``SANAFLOW_FUSED_NORM``);
    the readers are checked separately (`accepts_fp8_rows`).
    """
    return norm_ops.FUSED_NORM and _on_fp8_device(x)


def _rows_of(x: torch.Tensor) -> Fp8Rows:
    q, scale = quantize_fp8_rows(x.reshape(-1, x.shape[-1]))  # (M, I) fp8, (M, 1) float32
    return Fp8Rows(q, scale, x.shape, x.dtype)


def prequantize(x: torch.Tensor | Fp8Rows, *layers: nn.Module) -> torch.Tensor | Fp8Rows:
    """`x` quantized once (`Fp8Rows`) when every layer accepts fp8 rows, else `x` itself (rows pass through).

    Three projections of one activation (q, k, v) then share one quantisation pass instead of three.
    """
    if isinstance(x, Fp8Rows) or not _on_fp8_device(x) or not accepts_fp8_rows(*layers):
        return x
    return _rows_of(x)


def norm_modulate_fp8(
    norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    residual: torch.Tensor | None = None, enabled: bool | None = None, residual_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Fp8Rows]:
    """`sanaflow.ops.norm.norm_modulate` with h handed over as fp8 rows: (x', Fp8Rows of h (B, N, D)).

    Where the fused norm runs, one pass writes the fp8 values and row scales instead of h
    (`triton_norm.norm_modulate_quantize`: bit for bit the rows of quantizing the h it would write);
    elsewhere the torch path, then `quantize_fp8_rows`. `enabled`, `residual_gate` as in `norm_modulate`.
    """
    kernel = norm_ops.norm_quantizer(norm, x, shift, scale, residual, enabled, residual_gate)
    if kernel is None:
        x, h = norm_ops.norm_modulate(norm, x, shift, scale, residual, enabled, residual_gate)
        return x, _rows_of(h)
    x, q, s = kernel(x, shift, scale, norm.eps, residual, FP8_DTYPE, FP8_MAX, _SCALE_MIN, residual_gate=residual_gate)
    return x, Fp8Rows(q, s, x.shape, x.dtype)


def gated_residual_fp8(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, enabled: bool | None = None,
) -> tuple[torch.Tensor, Fp8Rows]:
    """(x', Fp8Rows of x'), x' = ``torch.addcmul(x, gate, y)``: a gated residual add whose result an fp8 layer reads next.

    One pass where the row kernels run (`triton_norm.gated_residual_quantize`), else addcmul, then
    `quantize_fp8_rows`. x, y (B, N, D); gate (B, 1, D). `enabled` as in `ops.norm.norm_modulate`.
    """
    kernel = norm_ops.residual_quantizer(x, gate, y, enabled)
    if kernel is None:
        x = torch.addcmul(x, gate, y)  # (B, N, D)
        return x, _rows_of(x)
    x, q, s = kernel(x, gate, y, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    return x, Fp8Rows(q, s, x.shape, x.dtype)


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., I) @ (fp8 weight (O, I) * scale (O,))^T + bias, activations quantized per row -> (..., O).

    `x` may come quantized already (`Fp8Rows`, from `prequantize`).
    """
    if isinstance(x, Fp8Rows):
        xq, x_scale, shape, dtype = x
    else:
        shape, dtype = x.shape, x.dtype
        xq, x_scale = quantize_fp8_rows(x.reshape(-1, x.shape[-1]))  # (M, I) fp8, (M, 1) float32
    xq = xq.contiguous()  # _scaled_mm wants a row-major A (a no-op unless x was an odd view)
    # row-wise scaled matmul: output is bf16 only; a bf16 bias is fused into the epilogue
    fused_bias = bias if bias is not None and bias.dtype == torch.bfloat16 else None
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=scale[None], bias=fused_bias,
        out_dtype=torch.bfloat16, use_fast_accum=True,
    )  # (M, O)
    if bias is not None and fused_bias is None:
        out = out + bias.to(out.dtype)
    return out.to(dtype).reshape(*shape[:-1], weight.shape[0])


class _QuantizedLinear(nn.Module):
    """Shared storage and layout handling; subclasses set `mode`, `weight_dtype` and `_matmul`."""

    mode = ""
    weight_dtype = torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool, pointwise_conv: bool,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.pointwise_conv = pointwise_conv
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self.weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, module: nn.Linear | nn.Conv2d) -> _QuantizedLinear:
        """Quantize the weight of a Linear or pointwise Conv2d (bias kept in its dtype)."""
        pointwise = isinstance(module, nn.Conv2d)
        w = module.weight.detach()
        w = w.flatten(1) if pointwise else w  # (O, I)
        bias = module.bias
        layer = cls(w.shape[1], w.shape[0], bias is not None, pointwise,
                    bias_dtype=bias.dtype if bias is not None else w.dtype, device=w.device)
        q, scale = cls._quantize_weight(w)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @staticmethod
    def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        # Fp8Rows hold token rows (..., I) whatever the layer: a pointwise conv returns (..., O) tokens for them
        if not self.pointwise_conv or isinstance(x, Fp8Rows):
            return self._matmul(x)  # (..., O)
        y = self._matmul(x.permute(0, 2, 3, 1))  # (B, H, W, O)
        return y.permute(0, 3, 1, 2)  # (B, O, H, W), channels-last memory

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() cast every floating tensor, float8 included: move the quantized
        # weight and its float32 scales to the new device only, never to another dtype.
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = weight.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer stands for, (O, I)."""
        return self.weight.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        kind = "pointwise_conv" if self.pointwise_conv else "linear"
        return f"{kind}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.mode}"


class Int8WeightOnlyLinear(_QuantizedLinear):
    """Linear / pointwise conv with an int8 per-channel weight; activations in the model dtype."""

    mode = "int8"
    weight_dtype = torch.int8

    @staticmethod
    def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_int8_rows(w)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


class Fp8Linear(_QuantizedLinear):
    """Linear / pointwise conv with fp8 e4m3 weight and dynamic per-token fp8 activations (CUDA sm_89+)."""

    mode = "fp8"
    weight_dtype = FP8_DTYPE

    @staticmethod
    def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_fp8_rows(w)
        return q, scale[:, 0]

    def _matmul(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        data = x.q if isinstance(x, Fp8Rows) else x
        if not _on_fp8_device(data):
            raise InputError(f"fp8 layers run on CUDA GPUs with FP8 tensor cores (compute capability >= 8.9); "
                             f"got an input on {data.device}")
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)


LAYER_CLASSES: dict[str, type[_QuantizedLinear]] = {"int8": Int8WeightOnlyLinear, "fp8": Fp8Linear}
