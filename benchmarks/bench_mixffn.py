"""Micro-benchmark of the Mix-FFN middle: the model's torch path vs the fused Triton kernel (GPU).

Times SiLU + depthwise 3x3 + GLU on the (B, N, 2h) activation of one block (default: the 1600M
model, h = 5600, at 4096 px = a 128 x 128 grid, CFG batch 2, bf16), median of CUDA-event-timed
runs after warm-up, and prints the relative error of the fused output against a float32 run of the
torch path. Nothing is written. Usage: ``python benchmarks/bench_mixffn.py [--grid 128] [--hidden 5600]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sanaflow.models.sana_transformer import GLUMBConv
from sanaflow.ops import triton_mixffn
from sanaflow.ops.triton_mixffn import fused_dwconv_glu

# (BLOCK_W, BLOCK_C, rows per program, num_warps, gather, pipelining stages) tried by --sweep
SWEEP = ((16, 64, 32, 4, False, 1), (16, 64, 32, 4, False, 2), (16, 64, 32, 4, False, 3),
         (16, 64, 32, 4, False, 4), (16, 64, 32, 8, False, 2), (16, 64, 32, 8, False, 3),
         (32, 64, 32, 8, False, 3), (8, 128, 32, 4, False, 3), (8, 64, 32, 2, False, 3),
         (16, 64, 64, 4, False, 3), (16, 64, 16, 4, False, 3), (32, 32, 32, 4, False, 3),
         (16, 32, 32, 2, False, 3), (16, 64, 32, 4, True, 1), (16, 64, 32, 4, True, 3))


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` CUDA-event-timed runs (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    """Run the comparison and print one line per implementation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=128, help="latent grid side (4096 px / 32)")
    parser.add_argument("--hidden", type=int, default=5600, help="h: 2.5 x 2240 for the 1600M model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile configs in SWEEP")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mixffn.py needs a CUDA GPU")
    H = W = args.grid
    dim = args.hidden * 2 // 5  # GLUMBConv(dim, 2.5) has hidden = 2.5 * dim
    mod = GLUMBConv(dim, 2.5).cuda().to(torch.bfloat16)
    C = mod.conv_depth.weight.shape[0]
    a = torch.randn(args.batch, H * W, C, device="cuda", dtype=torch.bfloat16)  # (B, N, 2h)
    with torch.no_grad():
        ref32 = mod.float().dwconv_glu(a.float(), H, W)  # (B, N, h) float32 oracle
        mod.to(torch.bfloat16)
        w, b = mod.conv_depth.weight, mod.conv_depth.bias
        fused = fused_dwconv_glu(a, w, b, H, W)
        err = ((fused.float() - ref32).norm() / ref32.norm()).item()
        err_torch = ((mod.dwconv_glu(a, H, W).float() - ref32).norm() / ref32.norm()).item()
        gb = (a.numel() + fused.numel()) * a.element_size() / 1e9  # the fused kernel's minimum traffic
        for name, fn, e in (("torch", lambda: mod.dwconv_glu(a, H, W), err_torch),
                            ("fused", lambda: fused_dwconv_glu(a, w, b, H, W), err)):
            ms = time_ms(fn, args.repeats)
            print(f"{name:6s} {ms:8.3f} ms  {gb / ms * 1e3:7.0f} GB/s (of {gb:.2f} GB min traffic)  "
                  f"rel err vs fp32 {e:.2e}  [{torch.cuda.get_device_name()}, B={args.batch}, "
                  f"{H}x{W}, h={C // 2}]")
        if args.sweep:  # the tile constants are module globals read at each call
            default = (triton_mixffn._BLOCK_W, triton_mixffn._BLOCK_C, triton_mixffn._ROWS, triton_mixffn._NUM_WARPS)
            for block_w, block_c, rows, warps, gather, stages in SWEEP:
                triton_mixffn._BLOCK_W, triton_mixffn._BLOCK_C, triton_mixffn._NUM_WARPS = block_w, block_c, warps

                def run(rows=rows, gather=gather, stages=stages):
                    return fused_dwconv_glu(a, w, b, H, W, rows_per_program=rows, gather=gather, stages=stages)

                try:
                    e = ((run().float() - ref32).norm() / ref32.norm()).item()
                    ms = time_ms(run, args.repeats)
                except Exception as exc:  # a config that does not compile (registers, shared memory)
                    print(f"sweep {block_w, block_c, rows, warps, gather, stages}: failed: {str(exc).splitlines()[0][:200]}")
                    continue
                print(f"sweep BLOCK_W={block_w:3d} BLOCK_C={block_c:4d} rows={rows:3d} warps={warps} "
                      f"gather={gather!s:5s} stages={stages}: {ms:8.3f} ms  {gb / ms * 1e3:7.0f} GB/s  rel err {e:.2e}")
            triton_mixffn._BLOCK_W, triton_mixffn._BLOCK_C, triton_mixffn._ROWS, triton_mixffn._NUM_WARPS = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
