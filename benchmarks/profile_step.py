"""Profile one SANA transformer step (the CFG pair) with torch.profiler: where does the time go?

Builds sanaflow's ``SanaTransformer`` and, with ``--impl diffusers`` or ``both``, diffusers'
``SanaTransformer2DModel`` with the same random weights (ours loads diffusers' state dict), at an
official config (600M / 1600M, as in ``bench_sana.py``) or a toy one (``--tiny``, CPU), warms up,
then profiles ``--steps`` forwards and prints per implementation:

1. the top ops by self device time (CUDA; the kernels an aten op launches itself) or self CPU time,
   per step, with an "(unattributed kernels)" row for kernels launched outside aten ops (Triton);
2. the top device kernels by time (CUDA only);
3. per op category (gemm, conv, attention, norm, elementwise, copy/layout, other): time per step,
   an estimate of the bytes moved per step and the implied bandwidth. Bytes are estimated from the
   recorded input shapes (every tensor taken at the element size of ``--dtype``), plus one output
   the size of the largest input (a matmul's or conv's output from its shapes): a guide to which
   memory-bound passes are worth fusing, not an exact count.

    python benchmarks/profile_step.py --tiny                         # CPU smoke check, seconds
    python benchmarks/profile_step.py --model 1600M --px 4096        # both impls, bf16, CUDA
    python benchmarks/profile_step.py --model 1600M --px 4096 --impl ours --trace /tmp/trace

``--json PATH`` writes the tables as JSON; ``--trace DIR`` also exports a Chrome trace per impl.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import CAPTION_TOKENS, TINY_SANA
from bench_sana import TRANSFORMERS, cosine, randomize
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# aten op name -> category (ops not listed, or nested ones without kernels of their own, fall in "other")
CATEGORY_PATTERNS = (
    ("gemm", r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm|_int_mm|matmul|linear)$"),
    ("conv", r"^aten::(cudnn_convolution|_conv_depthwise2d|mkldnn_convolution|convolution|_convolution|"
             r"conv2d|_slow_conv2d_forward|thnn_conv2d|_nnpack_spatial_convolution|conv_depthwise2d)"),
    ("attention", r"(attention|^aten::_efficient_attention|^aten::_flash_attention)"),
    ("norm", r"^aten::(native_layer_norm|layer_norm|rsqrt|mean|var_mean|_fused_rms_norm)"),
    ("copy/layout", r"^aten::(copy_|_to_copy|to|contiguous|clone|cat|_reshape_alias|reshape|index|fill_|zero_)$"),
    ("elementwise", r"^aten::(add|add_|mul|mul_|addcmul|addcmul_|sub|rsub|div|silu|silu_|gelu|relu|relu_|"
                    r"sigmoid|pow|clamp|clip|exp|cos|sin|where|neg)$"),
)


def categorize(name: str) -> str:
    """The op category of an aten op (or kernel) name."""
    for cat, pattern in CATEGORY_PATTERNS:
        if re.search(pattern, name):
            return cat
    return "other"


def _numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 0


def bytes_per_call(name: str, shapes: list[list[int]], elem: int) -> int:
    """Estimated bytes one call reads and writes: its tensor inputs plus an output (see module doc)."""
    tensors = [s for s in shapes if isinstance(s, list) and s]
    if not tensors:
        return 0
    read = sum(_numel(s) for s in tensors)
    out = max(_numel(s) for s in tensors)
    mats = [s for s in tensors if len(s) >= 2]
    if re.search(r"^aten::(mm|addmm|_scaled_mm|_int_mm)$", name) and len(mats) >= 2:
        a, b = mats[-2], mats[-1]
        out = a[0] * b[-1]  # (M, K) @ (K, N)
    elif re.search(r"^aten::(bmm|baddbmm)$", name) and len(mats) >= 2:
        a, b = mats[-2], mats[-1]
        out = a[0] * a[1] * b[-1]  # (B, M, K) @ (B, K, N)
    elif categorize(name) == "conv" and len(tensors) >= 2 and len(tensors[0]) == 4 and len(tensors[1]) == 4:
        x, w = tensors[0], tensors[1]
        out = x[0] * w[0] * x[2] * x[3]  # stride 1, same padding: (B, C_out, H, W)
    return (read + out) * elem


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """{'diffusers': ..., 'ours': ...} (as asked) with the same random weights, eval, no grad."""
    from sanaflow.models import SanaTransformer

    cfg = TINY_SANA if args.tiny else TRANSFORMERS[args.model]
    models: dict[str, torch.nn.Module] = {}
    if args.impl in ("diffusers", "both"):
        from diffusers import SanaTransformer2DModel

        with torch.device("meta"):
            ref = SanaTransformer2DModel(**cfg)
        ref = ref.to_empty(device=device)
        randomize(ref, seed=1)
        models["diffusers"] = ref.to(dtype).eval().requires_grad_(False)
    if args.impl in ("ours", "both"):
        with torch.device("meta"):
            ours = SanaTransformer(**cfg)
        if "diffusers" in models:
            ours.load_weights(models["diffusers"].state_dict(), source="diffusers")
        else:
            ours = ours.to_empty(device=device)
            randomize(ours, seed=1)
            ours._init_computed_buffers()
        models["ours"] = ours.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if args.quantize is not None:
            from sanaflow.quant import quantize_transformer

            models["ours"] = quantize_transformer(models["ours"], args.quantize)
    if args.compile:
        from sanaflow.ops import preload_kernels

        preload_kernels()
    if args.compile and args.regional:  # each block compiled (in place), the rest eager
        for k, m in models.items():
            for block in m.transformer_blocks:
                block.compile(dynamic=False, fullgraph=k == "ours")
    elif args.compile:
        models = {k: torch.compile(m, dynamic=False, fullgraph=k == "ours") for k, m in models.items()}
    return models


def make_inputs(cfg: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Latents (B, C, px/32, px/32), caption (B, L, C_cap), mask (B, L) with one short prompt, timesteps (B,)."""
    g = torch.Generator(device).manual_seed(0)
    side = args.px // 32
    tokens = 8 if args.tiny else CAPTION_TOKENS
    x = torch.randn(args.batch, cfg["in_channels"], side, side, generator=g, device=device).to(dtype)
    caption = torch.randn(args.batch, tokens, cfg["caption_channels"], generator=g, device=device).to(dtype)
    mask = torch.ones(args.batch, tokens, dtype=torch.long, device=device)
    mask[0, tokens * 2 // 5:] = 0  # a short prompt beside a long one, as in bench_sana.py
    t = torch.full((args.batch,), 900.0, device=device)
    return x, caption, mask, t


def step_fn(name: str, model, inputs):
    """A zero-argument callable running one forward of `model` in its own API."""
    x, c, m, t = inputs
    if name == "diffusers":
        return lambda: model(hidden_states=x, encoder_hidden_states=c, encoder_attention_mask=m, timestep=t,
                             return_dict=False)[0]
    return lambda: model(x, c, t, encoder_attention_mask=m)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_timing(fn, steps: int, device: torch.device) -> dict[str, float]:
    """Unprofiled ms per step: `host_ms` until the last call returned (the host's launch work), `wall_ms`
    until the device finished. Equal values: the step is bound by the host's launches, not the GPU."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = time.perf_counter() - t0
    _sync(device)
    wall = time.perf_counter() - t0
    return {"host_ms": 1e3 * host / steps, "wall_ms": 1e3 * wall / steps}


def profile_impl(fn, args: argparse.Namespace, device: torch.device, trace: Path | None) -> dict[str, Any]:
    """Warm up, time and profile `args.steps` calls of `fn`; the op / kernel / category tables (ms per step)."""
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(args.warmup):
            fn()
        timing = host_timing(fn, args.steps, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(args.steps):
                fn()
            _sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    per_step = 1e-3 / args.steps  # profiler microseconds (summed over the steps) -> ms per step
    elem = DTYPES[args.dtype].itemsize

    ops: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    cats: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "bytes": 0.0})
    for row in prof.key_averages(group_by_input_shape=True):
        if row.device_type != DeviceType.CPU:
            continue
        t = row.self_device_time_total if cuda else row.self_cpu_time_total
        if t <= 0:
            continue
        ops[row.key] += t * per_step
        calls[row.key] += row.count
        cat = cats[categorize(row.key)]
        cat["ms"] += t * per_step
        cat["bytes"] += row.count * bytes_per_call(row.key, row.input_shapes, elem) / args.steps
    kernels: dict[str, float] = defaultdict(float)
    if cuda:
        for evt in prof.events():
            if evt.device_type == DeviceType.CUDA:
                kernels[evt.name] += evt.device_time_total * per_step
        unattributed = sum(kernels.values()) - sum(ops.values())
        if unattributed > 1e-3:  # kernels launched outside aten ops, e.g. our Triton linear attention
            ops["(unattributed kernels)"] = unattributed
            cats["attention/triton (unattributed)"]["ms"] += unattributed
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
    return {
        "total_ms": total,
        **timing,
        "ops": [{"op": k, "ms": v, "pct": 100 * v / total, "calls_per_step": calls[k] / args.steps} for k, v in top],
        "kernels": [{"kernel": k, "ms": v, "pct": 100 * v / total}
                    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]],
        "categories": [
            {"category": k, "ms": v["ms"], "pct": 100 * v["ms"] / total, "gb": v["bytes"] / 1e9,
             "gb_per_s": v["bytes"] / 1e9 / (v["ms"] / 1e3) if v["ms"] > 0 else 0.0}
            for k, v in sorted(cats.items(), key=lambda kv: -kv[1]["ms"])
        ],
    }


def print_report(name: str, report: dict[str, Any], cuda: bool) -> None:
    """The three tables of one implementation, as plain text."""
    clock = "self CUDA" if cuda else "self CPU"
    print(f"\n=== {name}: {report['total_ms']:.2f} ms {clock} time per step (profiled) ===")
    print(f"unprofiled: {report['wall_ms']:.2f} ms per step, of which the host's calls took {report['host_ms']:.2f} ms"
          + (" (launch-bound)" if cuda and report["host_ms"] > 0.9 * report["wall_ms"] else ""))
    print(f"{'ms/step':>9} {'%':>6} {'calls':>7}  op")
    for r in report["ops"]:
        print(f"{r['ms']:9.3f} {r['pct']:6.1f} {r['calls_per_step']:7.0f}  {r['op']}")
    if report["kernels"]:
        print(f"\n{'ms/step':>9} {'%':>6}  kernel")
        for r in report["kernels"]:
            print(f"{r['ms']:9.3f} {r['pct']:6.1f}  {r['kernel'][:110]}")
    print(f"\n{'ms/step':>9} {'%':>6} {'GB/step':>9} {'GB/s':>8}  category (bytes: estimate from shapes)")
    for r in report["categories"]:
        print(f"{r['ms']:9.3f} {r['pct']:6.1f} {r['gb']:9.2f} {r['gb_per_s']:8.0f}  {r['category']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("ours", "diffusers", "both"), default="both")
    p.add_argument("--model", choices=sorted(TRANSFORMERS), default="1600M", help="official config (default 1600M)")
    p.add_argument("--px", type=int, default=None, help="image size in pixels (latent px/32; default 4096, tiny 256)")
    p.add_argument("--batch", type=int, default=2, help="batch (2 = the CFG pair)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=3, help="profiled forwards (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled forwards first (default 2)")
    p.add_argument("--top", type=int, default=25, help="rows of the op and kernel tables (default 25)")
    p.add_argument("--compile", action="store_true", help="profile torch.compile'd models (warm-up compiles)")
    p.add_argument("--regional", action="store_true",
                   help="with --compile: compile each transformer block instead of the whole model (fast to compile)")
    p.add_argument("--quantize", choices=("fp8", "int8"), default=None, help="profile our model quantized")
    p.add_argument("--tiny", action="store_true", help="toy config at 256 px, for a CPU check of the script")
    p.add_argument("--json", type=Path, default=None, help="also write the tables to this JSON file")
    p.add_argument("--trace", type=Path, default=None, help="folder for Chrome traces (<impl>.json)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.px = args.px or (256 if args.tiny else 4096)
    if args.px % 32 or args.px <= 0:
        p.error(f"--px must be a positive multiple of 32 (the autoencoder's factor), got {args.px}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = TINY_SANA if args.tiny else TRANSFORMERS[args.model]
    models = build_models(args, device, dtype)
    inputs = make_inputs(cfg, args, device, dtype)
    model_name = "tiny" if args.tiny else args.model
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{model_name}, {args.px} px ({(args.px // 32) ** 2} tokens), batch {args.batch}, {args.dtype}, "
          f"{gpu}, torch {torch.__version__}{', compiled' if args.compile else ''}")
    results: dict[str, Any] = {"model": model_name, "px": args.px, "batch": args.batch, "dtype": args.dtype,
                               "gpu": gpu, "torch": torch.__version__, "compile": args.compile, "impls": {}}
    outputs = {}
    for name, model in models.items():
        fn = step_fn(name, model, inputs)
        trace = args.trace / f"{name}.json" if args.trace is not None else None
        report = profile_impl(fn, args, device, trace)
        with torch.no_grad():
            outputs[name] = fn().float()
        print_report(name, report, device.type == "cuda")
        results["impls"][name] = report
    if len(outputs) == 2:
        results["cosine_ours_vs_diffusers"] = cosine(outputs["ours"], outputs["diffusers"])
        print(f"\ncosine(ours, diffusers) = {results['cosine_ours_vs_diffusers']:.6f}")
    if args.json is not None:
        from sanaflow.utils import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
