"""Speed of the shapes world on one CPU core: scene sampling, rendering, batched rendering, detection.

    python benchmarks/bench_shapes.py [--seconds 3] [--out benchmarks/results/shapes_speed.json]

The issue's bar: >= 2,000 scenes/s rendered at 256 px on one core (sampling + caption + render).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import torch


def _rate(fn, seconds: float) -> float:
    """Calls per second of fn(i) over about `seconds` (after a short warm-up)."""
    for i in range(20):
        fn(i)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn(n)
            n += 1
    return n / (time.perf_counter() - start)


def _sample_render(i: int, size: int):
    from sanaflow.shapes import render, sample_scene

    scene = sample_scene(i)
    return render(scene, size), scene.caption()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core: the numbers are per DataLoader worker
    torch.set_num_threads(1)
    from sanaflow.shapes import ShapesDataset, detect, render, render_batch, sample_scene

    scenes = [sample_scene(i) for i in range(2000)]
    images = {s: [render(scenes[i], s) for i in range(200)] for s in (256, 512)}
    stream = iter(ShapesDataset(size=256))
    stream_u8 = iter(ShapesDataset(size=256, uint8=True))
    results = {
        "sample_scene+caption per s": _rate(lambda i: sample_scene(i).caption(), args.seconds),
        "sample+caption+render 256px per s": _rate(lambda i: _sample_render(i, 256), args.seconds),
        "render 256px per s": _rate(lambda i: render(scenes[i % 2000], 256), args.seconds),
        "render 512px per s": _rate(lambda i: render(scenes[i % 2000], 512), args.seconds),
        "render_batch(64) 256px images per s": 64
        * _rate(lambda i: render_batch(scenes[(i % 30) * 64 : (i % 30) * 64 + 64], 256), args.seconds),
        "ShapesDataset 256px (tensor + caption) per s": _rate(lambda i: next(stream), args.seconds),
        "ShapesDataset 256px uint8 per s": _rate(lambda i: next(stream_u8), args.seconds),
        "detect 256px per s": _rate(lambda i: detect(images[256][i % 200]), args.seconds),
        "detect 512px per s": _rate(lambda i: detect(images[512][i % 200]), args.seconds),
    }
    for k, v in results.items():
        print(f"{k:<48}{v:>10.0f}")
    if args.out:
        from sanaflow.utils import atomic_write_text

        meta = {
            "cpu": platform.processor() or platform.machine(),
            "cores_visible": os.cpu_count(),
            "threads": 1,
            "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine slow every number
        }
        atomic_write_text(
            args.out,
            json.dumps({"meta": meta, "results": {k: round(v) for k, v in results.items()}}, indent=1),
        )


if __name__ == "__main__":
    main()
