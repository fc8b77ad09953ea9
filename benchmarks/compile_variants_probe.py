"""Whole-model torch.compile of our transformer with each fused kernel switched on or off, beside diffusers'.

At small token counts a compiled step is bound by the host's launches, so a fused Triton kernel that
saves GPU time can still cost more than the inductor kernels it replaces. This probe builds the
official config (``--model``) with fewer blocks (``--layers``, default 4: every block costs the same,
and a compile takes seconds instead of a minute), compiles the whole model per variant (`VARIANTS`:
which of linear attention / Mix-FFN / norm run their Triton kernel), and reports per px:

- ``host_ms`` / ``wall_ms`` per step, unprofiled (median of ``--repeats`` windows of ``--steps`` calls);
- kernel launches per step and the host's self CPU time of the top ops, from one profiled step;

and, with ``--code DIR``, inductor's generated output code per variant (to read how each kernel is launched).

    python benchmarks/compile_variants_probe.py --px 1024,2048 --json /tmp/probe.json   # CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import host_microseconds
from bench_sana import TRANSFORMERS
from profile_step import build_models, make_inputs, step_fn
from torch.profiler import ProfilerActivity, profile

# name -> (linear attention backend, fused Mix-FFN, fused norm); None: diffusers' model
VARIANTS: dict[str, tuple[str, bool, bool] | None] = {
    "diffusers": None,
    "ours": ("auto", True, True),
    "ours-la-torch": ("torch", True, True),
    "ours-mixffn-torch": ("auto", False, True),
    "ours-norm-torch": ("auto", True, False),
    "ours-la-mixffn-torch": ("torch", False, True),
    "ours-all-torch": ("torch", False, False),
}

GRAD_MODES = {"no_grad": torch.no_grad, "inference": torch.inference_mode}

LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def set_variant(spec: tuple[str, bool, bool]) -> None:
    from sanaflow.ops import linear_attention, mixffn, norm

    backend, fused_mixffn, fused_norm = spec
    linear_attention.set_backend(backend)
    mixffn.FUSED_MIXFFN = fused_mixffn
    norm.FUSED_NORM = fused_norm


def launches_and_host(fn, top: int) -> dict[str, Any]:
    """Kernel launches in one profiled call and the top ops by self CPU time (us)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_NAMES)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"launches": launches,
            "top_self_cpu_us": [{"op": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
                                for e in rows]}


def timed(fn, steps: int, repeats: int) -> dict[str, float]:
    """Median host / wall ms per call over `repeats` windows of `steps` calls (`host_microseconds`)."""
    windows = [host_microseconds(fn, steps, warmup=0) for _ in range(repeats)]
    hosts, walls = [w[0] for w in windows], [w[1] for w in windows]
    return {"host_ms": round(statistics.median(hosts) / 1e3, 3), "wall_ms": round(statistics.median(walls) / 1e3, 3),
            "wall_ms_min": round(min(walls) / 1e3, 3)}


def new_output_code(cache: Path, seen: set[Path]) -> list[Path]:
    """Output-code modules inductor wrote since the last call (files defining ``def call(``)."""
    found = []
    for p in cache.rglob("*.py"):
        if p in seen:
            continue
        seen.add(p)
        try:
            if "def call(" in p.read_text(errors="ignore"):
                found.append(p)
        except OSError:
            pass
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(TRANSFORMERS), default="600M")
    p.add_argument("--layers", type=int, default=4, help="blocks kept of the official config (default 4)")
    p.add_argument("--px", default="1024", help="comma-separated image sizes (default 1024)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=20, help="calls per timed window (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows (default 5)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--code", type=Path, default=None, help="copy inductor's output code per variant here")
    p.add_argument("--grad-modes", default="no_grad",
                   help="comma-separated, of no_grad, inference: the calls run under torch.no_grad() or "
                        "torch.inference_mode() (default no_grad); each mode compiles anew")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("compile_variants_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    unknown += [g for g in args.grad_modes.split(",") if g and g not in GRAD_MODES]
    if unknown:
        print(f"unknown variants or grad modes {unknown}; choose from {list(VARIANTS)} and {list(GRAD_MODES)}",
              file=sys.stderr)
        return 2
    TRANSFORMERS[args.model] = {**TRANSFORMERS[args.model], "num_layers": args.layers}
    device, dtype = torch.device("cuda"), torch.bfloat16
    build = argparse.Namespace(tiny=False, model=args.model, impl="both", quantize=None, compile=False,
                               regional=False, batch=2)
    models = build_models(build, device, dtype)
    from sanaflow.ops import preload_kernels

    preload_kernels()
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_" + os.environ.get("USER", "root")))
    seen = set(cache.rglob("*.py")) if cache.exists() else set()
    records = []
    for px in [int(s) for s in args.px.split(",")]:
        build.px = px
        inputs = make_inputs(TRANSFORMERS[args.model], build, device, dtype)
        for name, grad_mode in [(v, g) for v in variants for g in args.grad_modes.split(",") if g]:
            spec = VARIANTS[name]
            if spec is not None:
                set_variant(spec)
            torch._dynamo.reset()
            key = "diffusers" if spec is None else "ours"
            model = torch.compile(models[key], dynamic=False, fullgraph=key == "ours")
            fn = step_fn(key, model, inputs)
            t0 = time.perf_counter()
            with GRAD_MODES[grad_mode]():
                fn()
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                for _ in range(5):
                    fn()
                rec = {"variant": name, "grad_mode": grad_mode, "px": px, "layers": args.layers, "model": args.model,
                       "compile_s": round(compile_s, 1), **timed(fn, args.steps, args.repeats),
                       **launches_and_host(fn, args.top)}
            print(json.dumps({k: v for k, v in rec.items() if k != "top_self_cpu_us"}), flush=True)
            records.append(rec)
            if args.code is not None and cache.exists():
                dest = args.code / f"{px}_{name}"
                dest.mkdir(parents=True, exist_ok=True)
                for p in new_output_code(cache, seen):
                    shutil.copy(p, dest / p.name)
    set_variant(VARIANTS["ours"])
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
