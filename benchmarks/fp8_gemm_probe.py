"""How much faster are the SANA transformer's GEMMs in fp8 than in bf16, on their own (issue 7)?

The fp8 step target is 1.4x our bf16 step at 4096 px. Whatever the rest of the step costs (norms,
attention, the Mix-FFN depthwise conv, which both precisions share), the step cannot gain more than
its GEMMs do, so this times every linear layer shape of the 600M and 1600M blocks at 4096 px (CFG batch
2: M = 2 x 128 x 128 token rows) and at 2048 px, in bf16 and in ``torch._scaled_mm`` fp8 e4m3 with the
scalings torch offers on Hopper: one scale per row (what ``sanaflow.quant`` ships) and one per tensor,
each with and without fast accumulation.

    python benchmarks/fp8_gemm_probe.py --out benchmarks/results/fp8_gemm_probe.json

CUDA only (fp8 ``_scaled_mm`` needs compute capability 8.9 or newer); the median of 5 CUDA-event
windows of N / 5 calls each, after warm-up. The weight-row scales do not change the speed, so unit
scales are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import cuda_event_seconds

# (name, K, N) of each linear layer of a block, hidden 1152 / 2240, Mix-FFN hidden 2880 / 5600 (GLU: 2x).
SHAPES = {
    "600M": [("attn q/k/v", 1152, 3456), ("attn out, cross q, cross out", 1152, 1152),
             ("mix-ffn inverted 1x1 (GLU)", 1152, 5760), ("mix-ffn point 1x1", 2880, 1152)],
    "1600M": [("attn q/k/v", 2240, 6720), ("attn out, cross q, cross out", 2240, 2240),
              ("mix-ffn inverted 1x1 (GLU)", 2240, 11200), ("mix-ffn point 1x1", 5600, 2240)],
}


def cuda_ms(fn, runs: int) -> float:
    """Median milliseconds per call over 5 windows of runs / 5 calls each (`_common.cuda_event_seconds`)."""
    return cuda_event_seconds(fn, repeats=5, inner=max(1, runs // 5), warmup=5)[0] * 1e3


def time_shape(m: int, k: int, n: int, runs: int) -> dict[str, float]:
    """Milliseconds of (m, k) @ (k, n) in bf16 and in fp8 with each scaling, output bf16."""
    dev, f8 = torch.device("cuda"), torch.float8_e4m3fn
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    a8, w8t = a.to(f8), w.to(f8).t()
    row_a, row_w = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    one = torch.ones((), device=dev)

    def fp8(sa, sw, fast):
        return lambda: torch._scaled_mm(a8, w8t, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)

    return {"bf16_ms": cuda_ms(lambda: a @ w.t(), runs),
            "fp8_row_ms": cuda_ms(fp8(row_a, row_w, False), runs),
            "fp8_row_fast_ms": cuda_ms(fp8(row_a, row_w, True), runs),
            "fp8_tensor_ms": cuda_ms(fp8(one, one, False), runs),
            "fp8_tensor_fast_ms": cuda_ms(fp8(one, one, True), runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", default="4096,2048", help="comma-separated image sizes (default 4096,2048)")
    p.add_argument("--runs", type=int, default=50, help="calls per timing (default 50)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("fp8_gemm_probe.py needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)",
              file=sys.stderr)
        return 2
    records = []
    for px in (int(s) for s in args.px.split(",")):
        m = 2 * (px // 32) ** 2
        for model, shapes in SHAPES.items():
            for name, k, n in shapes:
                r = {"model": model, "px": px, "layer": name, "M": m, "K": k, "N": n,
                     **time_shape(m, k, n, args.runs)}
                r["speedup_row_fast"] = r["bf16_ms"] / r["fp8_row_fast_ms"]  # the shipped scaling
                r["speedup_best"] = r["bf16_ms"] / min(v for key, v in r.items() if key.startswith("fp8_"))
                r["fp8_row_fast_tflops"] = 2 * m * k * n / r["fp8_row_fast_ms"] / 1e9
                records.append(r)
                print(f"{model:5s} {px} {name:30s} bf16 {r['bf16_ms']:.4f} ms  fp8 row/fast {r['fp8_row_fast_ms']:.4f}"
                      f" ({r['speedup_row_fast']:.2f}x, {r['fp8_row_fast_tflops']:.0f} TFLOP/s)"
                      f"  best fp8 {r['speedup_best']:.2f}x", flush=True)
    # A block's GEMM time by precision: q/k/v once, the 1152 x 1152 shape three times, the Mix-FFN pair once.
    uses = {"attn q/k/v": 1, "attn out, cross q, cross out": 3, "mix-ffn inverted 1x1 (GLU)": 1, "mix-ffn point 1x1": 1}
    summary = []
    for px in sorted({r["px"] for r in records}, reverse=True):
        for model in SHAPES:
            rows = [r for r in records if r["px"] == px and r["model"] == model]
            total = {key: sum(uses[r["layer"]] * r[key] for r in rows)
                     for key in ("bf16_ms", "fp8_row_fast_ms", "fp8_tensor_fast_ms")}
            summary.append({"model": model, "px": px, "block_gemm_ms": total,
                            "speedup_row_fast": total["bf16_ms"] / total["fp8_row_fast_ms"],
                            "speedup_tensor_fast": total["bf16_ms"] / total["fp8_tensor_fast_ms"]})
            print(f"{model} {px} px, one block's token GEMMs: bf16 {total['bf16_ms']:.3f} ms, fp8 row/fast "
                  f"{total['fp8_row_fast_ms']:.3f} ({summary[-1]['speedup_row_fast']:.2f}x), fp8 tensor/fast "
                  f"{total['fp8_tensor_fast_ms']:.3f} ({summary[-1]['speedup_tensor_fast']:.2f}x)", flush=True)
    if args.out:
        report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": args.runs,
                  "records": records, "block_summary": summary}
        from sanaflow.utils import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
