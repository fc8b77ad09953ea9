"""What the benchmark scripts share: the SANA model configs, the results-JSON merge, argument defaults.

The scripts import it as a sibling module (``python benchmarks/<script>.py`` puts this folder on
``sys.path``; the tests that load the scripts add it too).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------------
# Model configs (diffusers config.json keys; sanaflow's constructors take the same)
# ------------------------------------------------------------------------------------------------

# Keys the official SANA transformers (600M, 1600M) have in common.
SANA_TRANSFORMER_COMMON = dict(
    in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
    patch_size=1, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
)
# Sana_600M_1024px_diffusers transformer/config.json
SANA_600M = dict(SANA_TRANSFORMER_COMMON, num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
                 cross_attention_head_dim=72, cross_attention_dim=1152)
# The SANA-1.0 DC-AE f32c32 (312M)
DC_AE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
CAPTION_TOKENS = 300  # SANA keeps 300 caption tokens

# --smoke: the same code paths at toy sizes (CPU-able)
TINY_SANA = dict(
    in_channels=4, out_channels=4, attention_head_dim=16, caption_channels=32, mlp_ratio=2.5, sample_size=8,
    patch_size=1, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
    num_attention_heads=2, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
    cross_attention_dim=32,
)
TINY_DCAE = dict(
    in_channels=3, latent_channels=4, attention_head_dim=2,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 8, 16], decoder_block_out_channels=[8, 8, 16],
    encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
    encoder_qkv_multiscales=[[], [], [5]], decoder_qkv_multiscales=[[], [], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)

# ------------------------------------------------------------------------------------------------
# Results and arguments
# ------------------------------------------------------------------------------------------------


def merge_records(
    out: Path, records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable], fresh: bool
) -> list[dict[str, Any]]:
    """Merge `records` into the JSON list in `out` (a record with the same key replaces), write it atomically.

    Returns the merged list; with `fresh` the old file is ignored (overwritten).
    """
    from sanaflow.utils import atomic_write_text

    old: list[dict[str, Any]] = []
    if out.is_file() and not fresh:
        old = json.loads(out.read_text(encoding="utf-8"))
        if not isinstance(old, list):
            raise SystemExit(f"{out} does not hold a JSON list; pass --fresh to overwrite it")
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + records
    atomic_write_text(out, json.dumps(merged, indent=1) + "\n")
    return merged


def add_out_argument(p: argparse.ArgumentParser, default_out: Path, smoke_out: Path) -> None:
    """--out, whose default (filled in by `fill_defaults`) depends on --smoke."""
    p.add_argument("--out", type=Path, default=None, help=f"results JSON (default {default_out}; smoke: {smoke_out})")


def fill_defaults(args: argparse.Namespace, default_out: Path, smoke_out: Path) -> argparse.Namespace:
    """Fill --device (cuda when available, else cpu) and --out (`smoke_out` under --smoke) when not given."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.out is None:
        args.out = smoke_out if args.smoke else default_out
    return args


def host_microseconds(fn: Callable[[], Any], n: int, warmup: int = 5) -> tuple[float, float]:
    """(host, wall) microseconds per call of `fn` over n calls with no sync between them (CUDA).

    host: until the last call returned (what issuing the work costs the CPU); wall: until the GPU
    finished it too.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def cuda_event_seconds(fn: Callable[[], Any], repeats: int, inner: int = 10, warmup: int = 3) -> tuple[float, float]:
    """(median, min) seconds per call of `fn` on the GPU: CUDA events around `inner` calls, `repeats` times.

    Several calls between two events hide the launch overhead of one.
    """
    import statistics

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times), min(times)
