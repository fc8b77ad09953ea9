#!/usr/bin/env python
"""Live activation memory of a DC-AE decode, counted on the meta device (no GPU, no arithmetic).

Every tensor an operator creates is counted from its creation until its storage is freed; the peak of
that sum is what a decode needs on top of its weights, before the allocator's rounding and any
library workspace (cuDNN's, for one). It runs the real f32c32 decoder at full size in seconds on a
CPU, so the tiling policy's memory can be checked without a GPU: `bench_sana.py` measures the peak
on the GPU (weights and workspaces included), this script says which tensors make it.

    python benchmarks/dcae_memory.py                       # 4096 px: auto tiling, tile sweep
    python benchmarks/dcae_memory.py --px 2048 --untiled   # also the untiled decode
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("sanaflow") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by operators while they are alive; keeps the peak and what made it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, tuple[int, ...], str]] = {}
        self.peak = 0
        self.at_peak: list[tuple[int, tuple[int, ...], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:  # views and in-place results share a counted storage
                    self.live[ref.cdata] = (ref, storage.nbytes(), tuple(t.shape), str(func))
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            del self.live[key]
        now = sum(v[1] for v in self.live.values())
        if now > self.peak:
            self.peak = now
            self.at_peak = sorted(((v[1], v[2], v[3]) for v in self.live.values()), reverse=True)
        return out


def decode_live_peak(config: dict, px: int, dtype: torch.dtype = torch.bfloat16, **decode_kwargs) -> LiveBytes:
    """Decode (1, C, px / f, px / f) latents with a DCAE of `config` on the meta device; the counter afterwards."""
    from sanaflow.models.dc_ae import DCAE

    with torch.device("meta"):
        model = DCAE(**config).to(dtype).eval()
    f = model.spatial_compression_ratio
    z = torch.empty(1, model.config.latent_channels, px // f, px // f, device="meta", dtype=dtype)
    counter = LiveBytes()
    with torch.no_grad(), counter:
        model.decode(z, **decode_kwargs)
    return counter


def main(argv: list[str] | None = None) -> int:
    from _common import DC_AE_F32C32

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--px", type=int, default=4096)
    p.add_argument("--tiles", default="512,768,1024,1536", help="explicit tile sizes to sweep (pixels, overlap included)")
    p.add_argument("--untiled", action="store_true", help="also count the untiled decode")
    args = p.parse_args(argv)
    runs = [("auto", {})] + [(f"tile {t}", {"tiling": True, "tile": int(t)}) for t in args.tiles.split(",") if t]
    if args.untiled:
        runs.append(("untiled", {"tiling": False}))
    for name, kw in runs:
        c = decode_live_peak(DC_AE_F32C32, args.px, **kw)
        top = ", ".join(f"{n / 2**20:.0f} MiB {list(s)}" for n, s, _ in c.at_peak[:4])
        print(f"{args.px} px {name:>10}: live peak {c.peak / 2**30:.2f} GiB  ({top})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
