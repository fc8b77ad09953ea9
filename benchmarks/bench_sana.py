#!/usr/bin/env python
"""Speed and memory of sanaflow's SANA against diffusers, in one process on one GPU (issue 7).

Both sides are built at the official 600M / 1600M configs (and the SANA-1.0 DC-AE, a
Gemma-2-2B-sized text encoder) with the *same* random weights: sanaflow loads diffusers' state
dict, so every pair runs identical arithmetic (speed does not depend on weight values). Cases:

  transformer_step   one forward of the CFG pair (batch 2, 300 caption tokens) at 1024/2048/4096 px:
                     diffusers, diffusers-compile, ours, ours-compile, ours-fp8 (fp8 + compile)
  linear_attention   the self-attention op alone, forward (and fwd+bwd): torch reference vs Triton
  dcae_decode        latents -> image at 1024/2048/4096 px: diffusers (untiled), diffusers-tiled, ours
  text_encoder       one Gemma-2-2B-sized forward of the CFG pair (prompt with CHI prefix + negative)
  e2e_t2i            1024 px, 20 steps, CFG 4.5, from prompt embeddings, decode included
  e2e_t2i_text       the same with the text encoder forward included (encoder resident on the GPU)
  sprint_e2e         SANA-Sprint 1600M, 1 and 2 steps, 1024 px, from prompt embeddings

Method: the GPU first runs large matmuls until its throughput is steady (clocks settled); each
case then warms up (compilation included) until its own time per run is steady, and is timed over
>= 10 runs with CUDA events; the
median and min are recorded, with the peak allocated memory of the timed runs (weights included).
The eager pair of the transformer step (diffusers, ours) is timed interleaved (``--interleave R``
rounds, the order flipping every round, the runs split evenly over them): at 1024 px both are bound
by the host's kernel launches, and the host's speed drifts over a process's first minutes, which a
case timed before the other would read as a difference between the implementations.
A case that fails (OOM, compile error) is recorded with an ``error`` and the run goes on.

Results are merged into ``--out`` (default benchmarks/results/sana_speed.json): a JSON list of
records {case, impl, model, px, steps, seconds, seconds_min, peak_gib, runs_s (every timed run), gpu, torch,
diffusers, error, notes}; a record replaces an earlier one with the same (case, impl, model, px, steps).
``--smoke`` runs every case with tiny configs and one repeat (CPU is fine) to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    CAPTION_TOKENS,
    DC_AE_F32C32,
    SANA_600M,
    SANA_TRANSFORMER_COMMON,
    TINY_DCAE,
    TINY_SANA,
    merge_records,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sana_speed.json"

CASES = ("transformer_step", "linear_attention", "dcae_decode", "text_encoder", "e2e_t2i", "e2e_t2i_text",
         "sprint_e2e")
DEFAULT_IMPLS = {
    "transformer_step": ("diffusers", "diffusers-compile", "ours", "ours-compile", "ours-fp8"),
    "linear_attention": ("reference", "ours", "reference-fwd-bwd", "ours-fwd-bwd"),
    "dcae_decode": ("diffusers", "diffusers-tiled", "ours"),
    "text_encoder": ("transformers",),
    "e2e_t2i": ("diffusers", "ours", "ours-compile", "ours-compile-cudagraphs", "ours-compile-all"),
    "e2e_t2i_text": ("diffusers", "ours", "ours-compile", "ours-compile-cudagraphs", "ours-compile-all"),
    "sprint_e2e": ("diffusers", "ours", "ours-compile", "ours-compile-cudagraphs", "ours-compile-all"),
}
# impls that can be asked for with --impls but are not run by default
EXTRA_IMPLS = {
    # -regional: torch.compile of each transformer block instead of the whole model (seconds to compile
    # instead of minutes); -cudagraphs: the step replayed from a CUDA graph (sanaflow's CUDAGraphRunner,
    # the same for both impls), which removes the host's kernel launches from the timing
    "transformer_step": ("ours-fp8-eager", "ours-int8", "diffusers-cudagraphs", "diffusers-compile-cudagraphs",
                         "diffusers-compile-regional", "diffusers-compile-regional-cudagraphs", "ours-cudagraphs",
                         "ours-compile-cudagraphs", "ours-compile-regional", "ours-compile-regional-cudagraphs",
                         "ours-fp8-cudagraphs", "ours-fp8-regional", "ours-fp8-regional-cudagraphs"),
    # ours-tileN: tiled with N-pixel tiles (default 1024), to trade peak memory against time
    "dcae_decode": ("ours-untiled", "ours-tiled", "ours-tile512", "ours-tile768", "ours-tile1536"),
    # diffusers-ours-models: diffusers' own pipeline with our transformer and DC-AE swapped in (eager)
    "e2e_t2i": ("diffusers-compile", "ours-fp8", "diffusers-ours-models"),
    "e2e_t2i_text": ("diffusers-compile", "ours-fp8", "diffusers-ours-models"),
    "sprint_e2e": ("diffusers-compile", "ours-fp8", "diffusers-ours-models"),
}

# ------------------------------------------------------------------------------------------------
# Configs (diffusers config.json keys)
# ------------------------------------------------------------------------------------------------

TRANSFORMERS = {
    "600M": SANA_600M,
    "1600M": dict(SANA_TRANSFORMER_COMMON, num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240),
}
SPRINT_KEYS = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads")  # SANA-Sprint 1.6B
GEMMA_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
CHI_TOKENS = 210  # Gemma tokens of SANA's complex-human-instruction prefix (about; the prompt adds 298)

# --smoke: the same cases at toy sizes (CPU-able; the transformer and DC-AE ones are in _common)
TINY_GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)


@dataclass
class Settings:
    """What one run of the script measures and how."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    repeats: int
    warmup_runs: int
    warmup_s: float
    settle_s: float
    models: list[str]
    px: list[int]
    e2e_px: list[int]
    cases: list[str]
    impls: list[str] | None
    compile_mode: str | None
    ours_compile_mode: str | None
    compile_backend: str
    interleave: int = 0  # rounds for the transformer step's eager pair timed together; 0 = one after the other
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        """Whether timings use the GPU."""
        return self.device.type == "cuda"

    def transformer_config(self, model: str, sprint: bool = False) -> dict[str, Any]:
        """diffusers config of a transformer size (tiny in smoke mode)."""
        cfg = dict(TINY_SANA if self.smoke else TRANSFORMERS[model])  # smoke: model is "tiny"
        if sprint:
            cfg.update(SPRINT_KEYS)
        return cfg

    @property
    def dcae_config(self) -> dict[str, Any]:
        """diffusers config of the DC-AE (tiny in smoke mode)."""
        return TINY_DCAE if self.smoke else DC_AE_F32C32

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent cell of the DC-AE in use."""
        return 2 ** (len(self.dcae_config["decoder_block_out_channels"]) - 1)

    def wants(self, case: str, impl: str) -> bool:
        """Whether (case, impl) is selected by --impls (or is a default impl of the case)."""
        if self.impls is None:
            return impl in DEFAULT_IMPLS[case]
        return any(fnmatch.fnmatch(impl, pattern) for pattern in self.impls)


class Recorder:
    """Collects records, prints a line per case, and writes the merged JSON at the end."""

    def __init__(self, settings: Settings, out: Path, fresh: bool):
        self.settings = settings
        self.out = out
        self.fresh = fresh
        self.records: list[dict[str, Any]] = []

    def add(self, case: str, impl: str, model: str, px: int | None, steps: int | None,
            result: dict[str, Any] | None, error: str | None = None, notes: str | None = None) -> None:
        """Record one measurement (or its error)."""
        meta = self.settings.meta
        rec = {
            "case": case, "impl": impl, "model": model, "px": px, "steps": steps,
            "seconds": None if result is None else round(result["seconds"], 6),
            "seconds_min": None if result is None else round(result["seconds_min"], 6),
            "peak_gib": None if result is None or result["peak_gib"] is None else round(result["peak_gib"], 3),
            "runs_s": None if result is None else [round(t, 6) for t in result["runs"]],
            "gpu": meta["gpu"], "torch": meta["torch"], "diffusers": meta["diffusers"],
            "error": error, "notes": notes,
        }
        self.records.append(rec)
        what = f"{case:17s} {impl:18s} {model:6s} px={px!s:5s} steps={steps!s:4s}"
        if error:
            print(f"{what} ERROR {error}", flush=True)
        else:
            peak = "" if rec["peak_gib"] is None else f" peak {rec['peak_gib']:.2f} GiB"
            print(f"{what} {rec['seconds']:.4f} s (min {rec['seconds_min']:.4f}){peak}"
                  f"{'  ' + notes if notes else ''}", flush=True)

    def write(self) -> None:
        """Merge into --out (same key replaces) and write it atomically."""

        def key(r):
            return (r["case"], r["impl"], r["model"], r["px"], r["steps"])

        merged = merge_records(self.out, self.records, key, self.fresh)
        print(f"wrote {len(self.records)} records ({len(merged)} in all) to {self.out}", flush=True)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def sync(settings: Settings) -> None:
    """Wait for the device."""
    if settings.cuda:
        torch.cuda.synchronize(settings.device)


def settle_clocks(settings: Settings) -> str:
    """Run bf16 matmuls until three consecutive half-second rates agree within 2% (GPU clocks settled)."""
    if not settings.cuda or settings.settle_s <= 0:
        return "no settling (CPU)"
    n = 8192
    a = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    rates: list[float] = []
    t_start = time.perf_counter()
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        end.synchronize()
        rates.append(20 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)  # TFLOP/s
        elapsed = time.perf_counter() - t_start
        last = rates[-3:]
        steady = len(last) == 3 and (max(last) - min(last)) / max(last) < 0.02
        if (steady and elapsed >= settings.settle_s) or elapsed >= 4 * settings.settle_s + 30:
            break
    del a, b
    torch.cuda.empty_cache()
    return f"bf16 matmul {rates[-1]:.0f} TFLOP/s after {elapsed:.0f} s ({'settled' if steady else 'NOT settled'})"


# Warm-up keeps going until the step time is steady: the last SETTLE_WINDOWS windows of
# SETTLE_RUNS runs agree within SETTLE_TOLERANCE (at most SETTLE_MAX_S). Host-bound steps (eager
# 1024 px) read slow for the first minute of a fresh machine, which settling the GPU's clocks with
# matmuls does not cover.
SETTLE_RUNS, SETTLE_WINDOWS, SETTLE_TOLERANCE, SETTLE_MAX_S = 5, 3, 0.03, 60.0


def _warm_up(fn: Callable[[], Any], settings: Settings) -> None:
    """Run fn at least warmup_runs times and for at least warmup_s, then until its time per run is steady."""
    t_start = time.perf_counter()
    t_end = t_start + settings.warmup_s
    runs = 0
    while runs < settings.warmup_runs or (time.perf_counter() < t_end and runs < 100):
        fn()
        sync(settings)
        runs += 1
    if settings.smoke or not settings.cuda:
        return
    windows: list[float] = []
    while time.perf_counter() - t_start < SETTLE_MAX_S and not steady(windows):
        t0 = time.perf_counter()
        for _ in range(SETTLE_RUNS):
            fn()
        sync(settings)
        windows.append(time.perf_counter() - t0)


def steady(windows: list[float], count: int = SETTLE_WINDOWS, tolerance: float = SETTLE_TOLERANCE) -> bool:
    """Whether the last `count` window times agree within `tolerance` of the fastest of them."""
    last = windows[-count:]
    return len(last) == count and max(last) - min(last) <= tolerance * min(last)


def _timed_runs(fn: Callable[[], Any], settings: Settings, n: int) -> tuple[list[float], float | None]:
    """Seconds of n runs (CUDA events on the GPU) and the peak GiB allocated during them (None on CPU)."""
    if settings.cuda:
        torch.cuda.reset_peak_memory_stats(settings.device)
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a timed run is not the implementation's time
    try:
        _time_each(fn, settings, n, times)
    finally:
        if gc_was_enabled:
            gc.enable()
    peak = torch.cuda.max_memory_allocated(settings.device) / 2**30 if settings.cuda else None
    return times, peak


def _time_each(fn: Callable[[], Any], settings: Settings, n: int, times: list[float]) -> None:
    for _ in range(n):
        if settings.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)


def _result(times: list[float], peak: float | None) -> dict[str, Any]:
    return {"seconds": statistics.median(times), "seconds_min": min(times), "peak_gib": peak, "runs": times}


def measure(fn: Callable[[], Any], settings: Settings) -> dict[str, Any]:
    """Warm up (>= warmup_runs and >= warmup_s), then time `repeats` runs: median, min, peak GiB."""
    _warm_up(fn, settings)
    gc.collect()
    return _result(*_timed_runs(fn, settings, settings.repeats))


def measure_interleaved(fns: dict[str, Callable[[], Any]], settings: Settings, rounds: int) -> dict[str, dict[str, Any]]:
    """Time several implementations together: per name, median / min of >= `repeats` runs and the peak GiB.

    All are warmed up first; then `rounds` rounds each time every implementation for
    ceil(repeats / rounds) runs, in an order that flips every round, so drift of the host or the
    GPU over the measurement falls on all of them alike.
    """
    for fn in fns.values():
        _warm_up(fn, settings)
    gc.collect()
    per_round = -(-settings.repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t, peak = _timed_runs(fns[name], settings, per_round)
            times[name] += t
            if peak is not None:
                peaks[name] = max(peak, peaks[name] or 0.0)
    return {name: _result(times[name], peaks[name]) for name in names}


def free_memory(settings: Settings) -> None:
    """Drop compiled graphs and cached blocks between implementations."""
    torch._dynamo.reset()
    gc.collect()
    if settings.cuda:
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    """One line naming the exception."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def run_case(rec: Recorder, settings: Settings, case: str, impl: str, model: str, px: int | None,
             steps: int | None, make: Callable[[], Callable[[], Any]],
             check: Callable[[Any], str | None] | None = None) -> None:
    """Build the timed function with `make`, measure it, record it; any failure becomes an error record."""
    if not settings.wants(case, impl):
        return
    try:
        fn = make()
        with torch.inference_mode():
            graphs_before = _dynamo_graphs()
            t0 = time.perf_counter()
            out = fn()  # compiles / captures, if the impl does
            sync(settings)
            first = f"first_call_s={time.perf_counter() - t0:.1f}"
            if _dynamo_graphs() > graphs_before:
                first += f" compiled_graphs={_dynamo_graphs() - graphs_before}"
            notes = check(out) if check is not None else None
            out = None
            notes = f"{notes} {first}" if notes else first
            result = measure(fn, settings)
        rec.add(case, impl, model, px, steps, result, notes=notes)
    except Exception as e:  # OOM, compile failure, unsupported device: record and go on
        rec.add(case, impl, model, px, steps, None, error=short_error(e))
    finally:
        fn = None
        gc.collect()
        if settings.cuda:
            torch.cuda.empty_cache()


def run_cases_interleaved(rec: Recorder, settings: Settings, case: str, model: str, px: int | None,
                          steps: int | None,
                          entries: list[tuple[str, Callable[[], Callable[[], Any]], Callable[[Any], str | None] | None]]
                          ) -> None:
    """`run_case` for several (impl, make, check) timed together by `measure_interleaved`.

    Each is built and called once (checks in the given order); an impl that fails there is recorded
    with its error and the others are timed without it.
    """
    fns: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    try:
        with torch.inference_mode():
            for impl, make, check in entries:
                try:
                    fn = make()
                    t0 = time.perf_counter()
                    out = fn()
                    sync(settings)
                    first = f"first_call_s={time.perf_counter() - t0:.1f}"
                    note = check(out) if check is not None else None
                    out = None
                except Exception as e:
                    rec.add(case, impl, model, px, steps, None, error=short_error(e))
                    continue
                fns[impl] = fn
                notes[impl] = f"{note} {first}" if note else first
            try:
                results = measure_interleaved(fns, settings, settings.interleave) if fns else {}
            except Exception as e:
                for impl in fns:
                    rec.add(case, impl, model, px, steps, None, error=short_error(e))
                return
        for impl, result in results.items():
            rec.add(case, impl, model, px, steps, result,
                    notes=f"{notes[impl]} interleaved_with={'+'.join(n for n in fns if n != impl)}"
                          f" rounds={settings.interleave}")
    finally:
        fns.clear()
        gc.collect()
        if settings.cuda:
            torch.cuda.empty_cache()


def _dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile per block would show)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ------------------------------------------------------------------------------------------------
# Models with shared random weights
# ------------------------------------------------------------------------------------------------


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and buffer with random values of a sane scale (fan-in for matrices)."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
            if t.dim() >= 2:
                r = r / math.sqrt(math.prod(t.shape[1:]))
            elif name.endswith("weight"):  # norm scales
                r = 1 + 0.02 * r
            else:
                r = 0.02 * r
            t.copy_(r)


def build_random(cls, config: dict[str, Any], settings: Settings, seed: int):
    """Instantiate `cls(**config)` directly on the device (no CPU init), random weights, in the bench dtype."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to_empty(device=settings.device)
    randomize(model, seed)
    return model.to(settings.dtype).eval().requires_grad_(False)


def ours_like(ours_cls, diffusers_model, config: dict[str, Any]):
    """Our model sharing the tensors of a diffusers model (its state dict loads unchanged)."""
    with torch.device("meta"):
        model = ours_cls(**config)
    model.load_weights(diffusers_model.state_dict(), source="diffusers")
    return model.eval().requires_grad_(False)


def _compile_kwargs(settings: Settings, ours: bool) -> dict[str, Any]:
    """The run's backend / mode, static shapes; ours must compile without graph breaks (kernels preloaded)."""
    from sanaflow.ops import preload_kernels

    preload_kernels()
    kw: dict[str, Any] = {"backend": settings.compile_backend, "dynamic": False, "fullgraph": ours}
    mode = settings.ours_compile_mode if ours else settings.compile_mode
    if mode is not None and settings.compile_backend == "inductor":
        kw["mode"] = mode
    return kw


def compiled(module, settings: Settings, ours: bool):
    """torch.compile of the whole model."""
    return torch.compile(module, **_compile_kwargs(settings, ours))


def regional(module, settings: Settings, ours: bool):
    """torch.compile each transformer block in place (regional compilation; the rest stays eager)."""
    kw = _compile_kwargs(settings, ours)
    for block in module.transformer_blocks:
        block.compile(**kw)
    return module


def transformer_inputs(settings: Settings, cfg: dict[str, Any], px: int, batch: int = 2, seed: int = 0):
    """Latents (B, C, px/32, px/32), caption (B, 300, C_cap), its mask (B, 300) and timesteps (B,)."""
    g = torch.Generator(settings.device).manual_seed(seed)
    side = px // 32
    x = torch.randn(batch, cfg["in_channels"], side, side, generator=g, device=settings.device).to(settings.dtype)
    caption = torch.randn(batch, CAPTION_TOKENS, cfg["caption_channels"], generator=g, device=settings.device)
    mask = torch.ones(batch, CAPTION_TOKENS, dtype=torch.long, device=settings.device)
    mask[0, 120:] = 0  # a short prompt beside a long one, as in a real CFG pair
    t = torch.tensor([900.0, 900.0][:batch], device=settings.device)
    return x, caption.to(settings.dtype), mask, t


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def bench_transformer_step(rec: Recorder, settings: Settings) -> None:
    """One transformer forward of the CFG pair at each px, per implementation and model size."""
    for model_name in settings.models:
        _transformer_step(rec, settings, model_name)
        free_memory(settings)


def _step_fn(model, inputs, px: int, diffusers_api: bool, graphs: bool = False) -> Callable[[], torch.Tensor]:
    x, c, m, t = inputs[px]
    if diffusers_api:
        def call(x, c, m, t):
            return model(hidden_states=x, encoder_hidden_states=c, encoder_attention_mask=m, timestep=t,
                         return_dict=False)[0]
    else:
        def call(x, c, m, t):
            return model(x, c, t, encoder_attention_mask=m)
    if not graphs:
        return lambda: call(x, c, m, t)
    from sanaflow.pipelines.acceleration import CUDAGraphRunner

    runner: list[CUDAGraphRunner] = []

    def replay() -> torch.Tensor:
        if not runner:  # capture at the first call (warm-up calls compile first, if compiled)
            runner.append(CUDAGraphRunner(call, {"x": x, "c": c, "m": m, "t": t}))
        return runner[0](x=x, c=c, m=m, t=t)
    return replay


def _transformer_step(rec: Recorder, settings: Settings, model_name: str) -> None:
    from diffusers import SanaTransformer2DModel

    from sanaflow.models.sana_transformer import SanaTransformer
    from sanaflow.quant import quantize_transformer

    case = "transformer_step"
    cfg = settings.transformer_config(model_name)
    try:
        dmodel = build_random(SanaTransformer2DModel, cfg, settings, seed=1)
    except Exception as e:
        for impl in DEFAULT_IMPLS[case]:
            rec.add(case, impl, model_name, None, 1, None, error=f"building the model: {short_error(e)}")
        return
    inputs = {px: transformer_inputs(settings, cfg, px) for px in settings.px}
    refs: dict[str, dict[int, torch.Tensor]] = {"diffusers": {}, "ours": {}}
    backend = linear_attention_backend(settings)

    def check(px: int, store: str | None = None, vs_ours: bool = False, extra: str = ""):
        # keep the output of a reference impl; report cosines against the references
        def fn(out):
            out = out.float().cpu()
            notes = []
            if px in refs["diffusers"] and store != "diffusers":
                notes.append(f"cosine_vs_diffusers={cosine(out, refs['diffusers'][px]):.5f}")
            if vs_ours and px in refs["ours"]:
                notes.append(f"cosine_vs_ours_bf16={cosine(out, refs['ours'][px]):.5f}")
            if store is not None:
                refs[store][px] = out
            return " ".join([*notes, extra]).strip() or None
        return fn

    def run_all(impl: str, model, diffusers_api: bool, plain: bool = True, **check_kw) -> None:
        # `impl` (unless `plain` is False: timed already) and, where asked for, `impl`-cudagraphs (the
        # same model replayed from a CUDA graph)
        for graphs in (False, True) if plain else (True,):
            name = f"{impl}-cudagraphs" if graphs else impl
            for px in settings.px:
                run_case(rec, settings, case, name, model_name, px, 1,
                         lambda px=px, graphs=graphs: _step_fn(model, inputs, px, diffusers_api, graphs),
                         check(px, **check_kw))

    def wants_any(impl: str) -> bool:
        return settings.wants(case, impl) or settings.wants(case, f"{impl}-cudagraphs")

    ours = ours_like(SanaTransformer, dmodel, cfg)  # shares diffusers' weight tensors: no extra memory
    # The eager pair timed together (see the module docstring), then each of them replayed from CUDA graphs.
    paired = settings.interleave > 0 and settings.wants(case, "diffusers") and settings.wants(case, "ours")
    if paired:
        for px in settings.px:
            run_cases_interleaved(rec, settings, case, model_name, px, 1, [
                ("diffusers", lambda px=px: _step_fn(dmodel, inputs, px, True), check(px, store="diffusers")),
                ("ours", lambda px=px: _step_fn(ours, inputs, px, False),
                 check(px, store="ours", extra=f"linear_attention={backend}")),
            ])
    run_all("diffusers", dmodel, True, plain=not paired, store="diffusers")
    if wants_any("diffusers-compile"):
        run_all("diffusers-compile", compiled(dmodel, settings, ours=False), True)
        free_memory(settings)
    if wants_any("diffusers-compile-regional"):
        run_all("diffusers-compile-regional", regional(copy.deepcopy(dmodel), settings, ours=False), True)
        free_memory(settings)
    run_all("ours", ours, False, plain=not paired, store="ours", extra=f"linear_attention={backend}")
    if wants_any("ours-compile"):
        run_all("ours-compile", compiled(ours, settings, ours=True), False)
        free_memory(settings)
    if wants_any("ours-compile-regional"):
        run_all("ours-compile-regional", regional(ours_like(SanaTransformer, dmodel, cfg), settings, ours=True),
                False)
        free_memory(settings)

    # Quantized copies last, the float weights freed first so that peaks hold only what each impl
    # needs: diffusers' model goes now, ours once its last quantized copy exists.
    dmodel = None
    free_memory(settings)
    modes = {"int8": ("ours-int8",), "fp8": ("ours-fp8", "ours-fp8-eager", "ours-fp8-regional")}
    wanted = [m for m, impls in modes.items() if any(wants_any(i) for i in impls)]
    for i, mode in enumerate(wanted):
        try:
            qmodel = quantize_transformer(ours_like(SanaTransformer, ours, cfg), mode)
        except Exception as e:
            for impl in modes[mode]:
                if settings.wants(case, impl):
                    rec.add(case, impl, model_name, None, 1, None, error=short_error(e))
            continue
        finally:
            if i == len(wanted) - 1:
                ours = None
                free_memory(settings)
        if mode == "fp8" and wants_any("ours-fp8"):
            run_all("ours-fp8", compiled(qmodel, settings, ours=True), False, vs_ours=True)
            free_memory(settings)
        run_all("ours-int8" if mode == "int8" else "ours-fp8-eager", qmodel, False, vs_ours=True)
        if mode == "fp8" and wants_any("ours-fp8-regional"):  # last: it compiles qmodel's blocks in place
            run_all("ours-fp8-regional", regional(qmodel, settings, ours=True), False, vs_ours=True)
        qmodel = None
        free_memory(settings)


def linear_attention_backend(settings: Settings) -> str:
    """Which linear attention our model runs on this device (the lead's dispatch decides)."""
    from sanaflow.ops.triton_linear_attention import triton_available

    return "triton" if settings.cuda and triton_available(settings.device) else "torch"


def _attention_inputs(settings: Settings, heads: int, d: int, n: int, requires_grad: bool, seed: int):
    """q, k, v (2, heads, n, d) as views of (2, n, heads * d) projections, as the model passes them."""
    g = torch.Generator(settings.device).manual_seed(seed)
    return [torch.randn(2, n, heads * d, generator=g, device=settings.device).to(settings.dtype)
            .view(2, n, heads, d).transpose(1, 2).requires_grad_(requires_grad) for _ in range(3)]


def _attention_fn(settings: Settings, op, heads: int, d: int, n: int, backward: bool, seed: int):
    """The timed call: the op forward, or forward + backward."""
    from sanaflow.ops.triton_linear_attention import linear_attention_triton, triton_available

    if op is linear_attention_triton and not (settings.cuda and triton_available(settings.device)):
        raise RuntimeError("the Triton kernels need a CUDA GPU and triton")
    q, k, v = _attention_inputs(settings, heads, d, n, backward, seed)
    if not backward:
        return lambda: op(q, k, v)
    grad = torch.randn(q.shape, device=settings.device, dtype=settings.dtype)

    def step():
        with torch.inference_mode(False), torch.enable_grad():
            q.grad = k.grad = v.grad = None  # no gradient-accumulation kernels in the timing
            op(q, k, v).backward(grad)
    return step


def bench_linear_attention(rec: Recorder, settings: Settings) -> None:
    """The self-attention op alone at SANA shapes: the torch reference vs the fused Triton kernels."""
    from sanaflow.ops.linear_attention import linear_attention_reference
    from sanaflow.ops.triton_linear_attention import linear_attention_triton

    case = "linear_attention"
    for model_name in settings.models:
        cfg = settings.transformer_config(model_name)
        heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
        for px in settings.px:
            n = (px // 32) ** 2  # tokens of a px x px image (32x DC-AE, patch 1)
            for impl, op in (("reference", linear_attention_reference), ("ours", linear_attention_triton)):
                for backward in (False, True):
                    run_case(rec, settings, case, f"{impl}-fwd-bwd" if backward else impl, model_name, px, None,
                             lambda op=op, backward=backward, n=n, px=px, heads=heads, d=d: _attention_fn(
                                 settings, op, heads, d, n, backward, seed=px))


def bench_dcae_decode(rec: Recorder, settings: Settings) -> None:
    """Latents -> image at each px: diffusers untiled / tiled, ours (tiling chosen by size)."""
    from diffusers import AutoencoderDC

    from sanaflow.models.dc_ae import DCAE, use_channels_last

    case = "dcae_decode"
    model_name = "tiny" if settings.smoke else "dc-ae-f32c32"
    cfg = settings.dcae_config
    try:
        dvae = build_random(AutoencoderDC, cfg, settings, seed=2)
        ours = ours_like(DCAE, dvae, cfg).to("cpu")  # only the model being timed stays on the device
    except Exception as e:
        rec.add(case, "diffusers", model_name, None, None, None, error=f"building the model: {short_error(e)}")
        return

    def diffusers_decode(z: torch.Tensor, tiled: bool):
        if tiled:
            dvae.enable_tiling()
        else:
            dvae.disable_tiling()
        return lambda: dvae.decode(z, return_dict=False)[0]

    f = settings.latent_scale
    for px in settings.px:
        g = torch.Generator(settings.device).manual_seed(px)
        z = torch.randn(1, cfg["latent_channels"], px // f, px // f, generator=g, device=settings.device)
        z = z.to(settings.dtype)  # (1, C, px / f, px / f)
        run_case(rec, settings, case, "diffusers", model_name, px, None, lambda z=z: diffusers_decode(z, False))
        run_case(rec, settings, case, "diffusers-tiled", model_name, px, None, lambda z=z: diffusers_decode(z, True))
        dvae.disable_tiling()
        # each implementation's peak holds its own weights only (ours shared diffusers' tensors)
        dvae.to("cpu")
        ours.to(settings.device)
        free_memory(settings)
        variants = [("ours", "auto", None), ("ours-untiled", False, None), ("ours-tiled", True, None)]
        variants += [(f"ours-tile{t}", True, t) for t in (512, 768, 1536)]
        for impl, tiling, tile in variants:
            run_case(rec, settings, case, impl, model_name, px, None,
                     lambda z=z, tiling=tiling, tile=tile: lambda: ours.decode(z, tiling=tiling, tile=tile),
                     lambda out, px=px, tiling=tiling, tile=tile: f"tiled={ours.wants_tiling(px, px, tiling)}"
                     + ("" if tile is None else f", tile={tile}") + f", channels_last={use_channels_last(out)}")
        ours.to("cpu")
        dvae.to(settings.device)
    free_memory(settings)


def gemma_config(settings: Settings):
    """A Gemma-2-2B-sized config (tiny in smoke mode)."""
    from transformers import Gemma2Config

    return Gemma2Config(**(TINY_GEMMA if settings.smoke else GEMMA_2B))


def build_text_encoder(settings: Settings):
    """A random Gemma-2 model (the SANA caption encoder's architecture) on the device."""
    from transformers import Gemma2Model

    with torch.device("meta"):
        model = Gemma2Model(gemma_config(settings))
    model = model.to_empty(device=settings.device)
    randomize(model, seed=3)
    return model.to(settings.dtype).eval().requires_grad_(False)


def text_forward(model, settings: Settings) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The caption-encoder work of one CFG prompt pair: (CHI + 298)-token prompt, 300-token negative.

    Returns (cond, cond_mask, uncond, uncond_mask), each 300 tokens as SANA keeps them.
    """
    vocab = model.config.vocab_size
    g = torch.Generator(settings.device).manual_seed(4)
    ids_c = torch.randint(3, vocab, (1, CHI_TOKENS + CAPTION_TOKENS - 2), generator=g, device=settings.device)
    ids_u = torch.randint(3, vocab, (1, CAPTION_TOKENS), generator=g, device=settings.device)
    mask_c, mask_u = torch.ones_like(ids_c), torch.ones_like(ids_u)
    mask_u[:, 5:] = 0  # an empty negative prompt is mostly padding
    keep = [0, *range(-CAPTION_TOKENS + 1, 0)]  # SANA's selection: BOS + the last 299 tokens

    def run():
        hc = model(input_ids=ids_c, attention_mask=mask_c).last_hidden_state[:, keep]  # (1, 300, C)
        hu = model(input_ids=ids_u, attention_mask=mask_u).last_hidden_state  # (1, 300, C)
        return hc, mask_c[:, keep], hu, mask_u
    return run


class PrecomputedTextEncoder:
    """A text encoder for our pipeline that returns what `produce` gives (fixed embeddings, or a forward)."""

    max_length = CAPTION_TOKENS

    def __init__(self, produce: Callable[[], tuple[torch.Tensor, ...]], hidden_size: int):
        self.produce = produce
        self.hidden_size = hidden_size

    def to(self, device) -> PrecomputedTextEncoder:
        """Nothing to move (the pipeline moves an offloaded encoder); returns self."""
        return self

    def encode(self, prompts, use_instruction: bool = True, device=None, dtype=None):
        """(hidden (B, 300, C), mask (B, 300)) of the prompt (use_instruction) or of the negative prompt."""
        hc, mc, hu, mu = self.produce()
        hidden, mask = (hc, mc) if use_instruction else (hu, mu)
        n = 1 if isinstance(prompts, str) else len(prompts)
        return hidden.expand(n, -1, -1), mask.expand(n, -1)


def bench_text_encoder(rec: Recorder, settings: Settings) -> None:
    """One Gemma-2-2B-sized forward of the CFG pair."""
    model_name = "tiny" if settings.smoke else "gemma-2-2b"
    run_case(rec, settings, "text_encoder", "transformers", model_name, None, None,
             lambda: text_forward(build_text_encoder(settings), settings))
    free_memory(settings)


def _scheduler_config(scheduler) -> dict[str, Any]:
    config = dict(scheduler.config)
    config["_class_name"] = type(scheduler).__name__
    return config


def bench_pipelines(rec: Recorder, settings: Settings) -> None:
    """End to end: SANA 20 steps (with and without text encoding) and SANA-Sprint 1 / 2 steps."""
    from diffusers import AutoencoderDC

    from sanaflow.models.dc_ae import DCAE

    wanted = [c for c in ("e2e_t2i", "e2e_t2i_text", "sprint_e2e") if c in settings.cases]
    if not wanted or (not settings.smoke and "1600M" not in settings.models):
        return
    dvae = build_random(AutoencoderDC, settings.dcae_config, settings, seed=2)
    vaes = (dvae, ours_like(DCAE, dvae, settings.dcae_config))
    cap = settings.transformer_config("1600M")["caption_channels"]
    g = torch.Generator(settings.device).manual_seed(5)
    mask_u = torch.ones(1, CAPTION_TOKENS, dtype=torch.long, device=settings.device)
    mask_u[:, 5:] = 0
    embeds = (torch.randn(1, CAPTION_TOKENS, cap, generator=g, device=settings.device).to(settings.dtype),
              torch.ones(1, CAPTION_TOKENS, dtype=torch.long, device=settings.device),
              torch.randn(1, CAPTION_TOKENS, cap, generator=g, device=settings.device).to(settings.dtype),
              mask_u)
    for case in wanted:
        _pipeline_case(rec, settings, case, vaes, embeds)
        free_memory(settings)


def _pipeline_case(rec: Recorder, settings: Settings, case: str, vaes, embeds) -> None:
    from diffusers import (
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaSprintPipeline,
        SanaTransformer2DModel,
        SCMScheduler,
    )

    from sanaflow.models.sana_transformer import SanaTransformer
    from sanaflow.pipelines.components import SanaComponents
    from sanaflow.pipelines.text_to_image import TextToImagePipeline
    from sanaflow.quant import quantize_transformer

    model_name = "tiny" if settings.smoke else "1600M"
    sprint = case == "sprint_e2e"
    cfg = settings.transformer_config("1600M", sprint=sprint)
    dvae, ours_vae = vaes
    try:
        dt = build_random(SanaTransformer2DModel, cfg, settings, seed=6 if sprint else 1)
        # e2e_t2i_text: the text-encoder forward of the CFG pair runs inside every generation
        produce = text_forward(build_text_encoder(settings), settings) if case == "e2e_t2i_text" else (lambda: embeds)
    except Exception as e:
        rec.add(case, "diffusers", model_name, None, None, None, error=f"building the models: {short_error(e)}")
        return
    step_list = (1, 2) if sprint else (20,)
    px_list = [settings.px[0]] if settings.smoke else settings.e2e_px
    scheduler = SCMScheduler() if sprint else DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    pipe_cls = SanaSprintPipeline if sprint else SanaPipeline
    dpipe = pipe_cls(tokenizer=None, text_encoder=None, vae=dvae, transformer=dt, scheduler=scheduler)
    dpipe.set_progress_bar_config(disable=True)

    def diffusers_call(px: int, steps: int):
        def run():
            pe, pm, ne, nm = produce()
            gen = torch.Generator(settings.device).manual_seed(0)
            kw = dict(prompt_embeds=pe, prompt_attention_mask=pm, num_inference_steps=steps, guidance_scale=4.5,
                      height=px, width=px, output_type="pt", generator=gen, use_resolution_binning=False)
            if sprint:
                kw["intermediate_timesteps"] = 1.3 if steps == 2 else None
            else:
                kw.update(negative_prompt=None, negative_prompt_embeds=ne, negative_prompt_attention_mask=nm)
            return dpipe(**kw).images
        return run

    def ours_pipeline(impl: str) -> TextToImagePipeline:
        # the pipeline's own fast paths: compile() (fullgraph, static shapes) and CUDA-graph replay
        transformer = ours
        if impl == "ours-fp8":
            transformer = quantize_transformer(ours_like(SanaTransformer, ours, cfg), "fp8")
        comps = SanaComponents(transformer=transformer, vae=ours_vae,
                               text_encoder=PrecomputedTextEncoder(produce, cfg["caption_channels"]),
                               scheduler_config=_scheduler_config(scheduler), name="bench")
        pipe = TextToImagePipeline(comps, settings.device)
        if impl != "ours":
            # ours-compile-all: the transformer compiled and replayed as CUDA graphs, the DC-AE decoder compiled
            cudagraphs = impl in ("ours-compile-cudagraphs", "ours-compile-all")
            pipe.compile(mode=None if cudagraphs else settings.ours_compile_mode, backend=settings.compile_backend,
                         decoder=impl == "ours-compile-all")
            pipe.cuda_graphs = cudagraphs
        return pipe

    def ours_call(pipe: TextToImagePipeline, px: int, steps: int):
        return lambda: pipe("benchmark", negative_prompt="", height=px, width=px, num_inference_steps=steps,
                            guidance_scale=4.5, seed=0, output_type="pt", use_resolution_binning=False).images

    def run_all(impl: str, make_for):
        for px in px_list:
            for steps in step_list:
                run_case(rec, settings, case, impl, model_name, px, steps, lambda px=px, steps=steps: make_for(px, steps))

    run_all("diffusers", diffusers_call)
    if settings.wants(case, "diffusers-compile"):
        dpipe.transformer = compiled(dt, settings, ours=False)
        run_all("diffusers-compile", diffusers_call)
        dpipe.transformer = dt
        free_memory(settings)

    ours = ours_like(SanaTransformer, dt, cfg)
    if settings.wants(case, "diffusers-ours-models"):
        dpipe.transformer, dpipe.vae = ours, ours_vae
        run_all("diffusers-ours-models", diffusers_call)
        dpipe.transformer, dpipe.vae = dt, dvae
        free_memory(settings)
    for impl in ("ours", "ours-compile", "ours-compile-cudagraphs", "ours-compile-all", "ours-fp8"):
        if not settings.wants(case, impl):
            continue
        holder: dict[str, Any] = {}

        def make(px, steps, impl=impl, holder=holder):
            if "pipe" not in holder:  # one pipeline per impl: compiled graphs / CUDA graphs are reused
                holder["pipe"] = ours_pipeline(impl)
            return ours_call(holder["pipe"], px, steps)
        run_all(impl, make)
        holder.clear()
        free_memory(settings)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def versions(settings: Settings) -> dict[str, Any]:
    """GPU name and library versions written into every record."""
    import diffusers

    gpu = torch.cuda.get_device_name(settings.device) if settings.cuda else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__}


def parse_list(text: str | None, cast=str) -> list | None:
    """'a,b,c' -> [a, b, c] (None stays None)."""
    if text is None:
        return None
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None,
                   help=f"comma-separated cases or fnmatch patterns (default: all): {', '.join(CASES)}")
    p.add_argument("--impls", default=None,
                   help="comma-separated impl names or patterns (default: each case's standard set); extra ones: "
                        + "; ".join(f"{c}: {', '.join(v)}" for c, v in EXTRA_IMPLS.items()))
    p.add_argument("--models", default="600M,1600M", help="transformer sizes (default 600M,1600M)")
    p.add_argument("--px", default="1024,2048,4096", help="image sizes for step / decode / attention cases")
    p.add_argument("--e2e-px", default="1024", help="image sizes for the end-to-end cases (default 1024)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per case, median reported (>= 10)")
    p.add_argument("--warmup-runs", type=int, default=3, help="untimed runs before timing (compilation included)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="keep warming up a case at least this long")
    p.add_argument("--interleave", type=int, default=5,
                   help="rounds in which the transformer step's eager pair (diffusers, ours) is timed together, "
                        "the order flipping every round (default 5; 0: one after the other)")
    p.add_argument("--settle-s", type=float, default=10.0, help="minimum GPU clock-settling time before the first case")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the diffusers-compile impls (default: default)")
    p.add_argument("--ours-compile-mode", default=None,
                   help="torch.compile mode of our compiled impls, e.g. reduce-overhead for CUDA graphs "
                        "(default: --compile-mode)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--fresh", action="store_true", help="overwrite --out instead of merging into it")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configs, one repeat, no warm-up, compile with the 'eager' backend: checks the script")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated run settings."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = [c for c in CASES if args.cases is None or any(fnmatch.fnmatch(c, pat) for pat in parse_list(args.cases))]
    if not cases:
        raise SystemExit(f"--cases {args.cases!r} matches no case; cases: {', '.join(CASES)}")
    models = parse_list(args.models)
    bad = [m for m in models if m not in TRANSFORMERS]
    if bad:
        raise SystemExit(f"unknown --models {bad}; choose from {', '.join(TRANSFORMERS)}")
    if not args.smoke and args.repeats < 10:
        raise SystemExit("--repeats must be >= 10 (the issue asks for the median of at least 10 runs)")
    if args.interleave < 0:
        raise SystemExit(f"--interleave must be >= 0 (0: time the eager pair one after the other), got {args.interleave}")
    if args.smoke:
        return Settings(device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16, smoke=True,
                        repeats=1, warmup_runs=1, warmup_s=0.0, settle_s=0.0, models=["tiny"],
                        px=[64, 128], e2e_px=[64], cases=cases, impls=parse_list(args.impls),
                        compile_mode=None, ours_compile_mode=None, compile_backend="eager",
                        interleave=min(args.interleave, 2))
    return Settings(device=device, dtype=torch.bfloat16, smoke=False, repeats=args.repeats,
                    warmup_runs=args.warmup_runs, warmup_s=args.warmup_s, settle_s=args.settle_s, models=models,
                    px=parse_list(args.px, int), e2e_px=parse_list(args.e2e_px, int), cases=cases,
                    impls=parse_list(args.impls), compile_mode=args.compile_mode,
                    ours_compile_mode=args.ours_compile_mode or args.compile_mode, compile_backend="inductor",
                    interleave=args.interleave)


def print_table(records: list[dict[str, Any]]) -> None:
    """A short markdown table of this run's records."""
    print("\n| case | impl | model | px | steps | median s | min s | peak GiB | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r["error"]:
            cells = ["ERROR", "", "", r["error"][:80]]
        else:
            peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            cells = [f"{r['seconds']:.4f}", f"{r['seconds_min']:.4f}", peak, r["notes"] or ""]
        print("| " + " | ".join(str(x) for x in [r["case"], r["impl"], r["model"], r["px"], r["steps"] or "", *cells])
              + " |")


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases and write the results."""
    args = parse_args(argv)
    settings = settings_from_args(args)
    settings.meta = versions(settings)
    rec = Recorder(settings, args.out, fresh=args.fresh)
    # A time limit's SIGTERM (timeout(1), a batch system) ends the run through SystemExit, so the
    # `finally` below still writes the records measured so far.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"device {settings.meta['gpu']}, torch {settings.meta['torch']}, diffusers {settings.meta['diffusers']}, "
          f"cases {', '.join(settings.cases)}", flush=True)
    print(settle_clocks(settings), flush=True)
    steps = [
        ("transformer_step", bench_transformer_step),
        ("linear_attention", bench_linear_attention),
        ("dcae_decode", bench_dcae_decode),
        ("text_encoder", bench_text_encoder),
    ]
    try:
        for case, fn in steps:
            if case in settings.cases:
                fn(rec, settings)
        if any(c in settings.cases for c in ("e2e_t2i", "e2e_t2i_text", "sprint_e2e")):
            bench_pipelines(rec, settings)
    finally:  # whatever was measured before an interruption is kept
        if rec.records:
            rec.write()
    print_table(rec.records)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
