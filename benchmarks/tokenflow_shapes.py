#!/usr/bin/env python
"""TokenFlow quality on the shapes world, scored with exact ground truth (issue 6).

20 procedural videos (`sanaflow.shapes.random_video`, seeds 10_000_000 ... 10_000_019 of the
``video`` split: no training run draws from the video split, and the embedded model's image stream
is namespaced apart, see docs/shapes.md) x 2 edits of one object, the most visible one:

  color   a new palette colour, unused in the scene (and not a held-out colour-shape pair)
  shape   a new shape (not a held-out pair with the object's colour)

The source prompt is the scene's caption (`video_caption`), the target prompt the caption after the
edit. Each edit runs with three methods on one shared inversion per video and setting:

  tokenflow       tokenflow-pnp with feature nearest-neighbour correspondences (the default)
  tokenflow-dis   tokenflow-pnp with OpenCV DIS optical-flow correspondences
  per-frame       the same PnP edit on each frame alone (the baseline TokenFlow improves on)

and two settings: ``fast`` (the CLI default: inversion on the 50-step editing schedule) and ``full``
(500 inversion steps, the public code's default). Metrics (`sanaflow.shapes.video_metrics`): edit
accuracy, structure IoU, warp error along the ground-truth flow and along DIS flow of the source.
Targets: tokenflow's ground-truth warp error <= 0.7 x per-frame's, edit accuracy >= 0.8,
structure IoU >= 0.75. Results (means per setting and method, the target checks, every edit's row
and the command) go to benchmarks/results/tokenflow_shapes.json.

    python benchmarks/tokenflow_shapes.py                     # the embedded model, GPU if present
    python benchmarks/tokenflow_shapes.py --model PATH --settings fast --videos 5
    python benchmarks/tokenflow_shapes.py --smoke             # a tiny random SANA, CPU, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import add_out_argument, fill_defaults

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("sanaflow") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tokenflow_shapes.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "tokenflow_shapes_smoke.json"

SEED_BASE = 10_000_000  # video seeds SEED_BASE + i: kept out of every training run
NUM_VIDEOS = 20
FRAMES = 16
SIZE = 256
METHODS: dict[str, dict[str, str]] = {
    "tokenflow": {"mode": "tokenflow-pnp", "correspondence": "features"},
    "tokenflow-dis": {"mode": "tokenflow-pnp", "correspondence": "flow"},
    "per-frame": {"mode": "per-frame", "correspondence": "features"},
}
SETTINGS: dict[str, int | None] = {"fast": None, "full": 500}  # inversion steps (None: = edit steps)
TARGETS = {"warp_ratio_max": 0.7, "edit_accuracy_min": 0.8, "structure_iou_min": 0.75}
METRICS = ("edit_accuracy", "structure_iou", "warp_error_gt", "warp_error_dis")


def edits_for(video, seed: int) -> list[tuple[str, dict[int, dict[str, str]]]]:
    """A colour edit and a shape edit of the video's most visible object (deterministic in `seed`)."""
    from sanaflow.shapes import HELD_OUT_PAIRS, PALETTE, SHAPES

    rng = random.Random(seed)
    objects = video.track["objects"]
    k = int(np.argmax(video.visibility.mean(axis=0)))  # most frames where the edit can be judged
    obj = objects[k]
    used = {o["color"] for o in objects}  # distinct colours keep touching objects separable
    colors = [c for c in PALETTE if c not in used and (c, obj["shape"]) not in HELD_OUT_PAIRS]
    shapes = [s for s in SHAPES if s != obj["shape"] and (obj["color"], s) not in HELD_OUT_PAIRS]
    return [("color", {k: {"color": rng.choice(colors)}}), ("shape", {k: {"shape": rng.choice(shapes)}})]


def tiny_backbone(device: torch.device):
    """A tiny random SANA backbone (for --smoke without a model folder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tokenflow import build_sana

    return build_sana(device, smoke=True)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of every metric over rows (None values skipped), overall and per edit kind."""

    def means(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"edits": len(rs)}
        for m in METRICS:
            vals = [r["metrics"][m] for r in rs if r["metrics"].get(m) is not None]
            out[m] = round(float(np.mean(vals)), 6) if vals else None
        return out

    summary = means(rows)
    for kind in sorted({r["kind"] for r in rows}):
        summary[kind] = means([r for r in rows if r["kind"] == kind])
    return summary


def check_targets(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for one setting: tokenflow against per-frame."""
    tf, pf = summary.get("tokenflow"), summary.get("per-frame")
    out: dict[str, Any] = {}
    if tf is None:
        return out
    if pf is not None and tf["warp_error_gt"] is not None and pf["warp_error_gt"]:
        ratio = tf["warp_error_gt"] / pf["warp_error_gt"]
        out["warp_ratio_gt"] = round(ratio, 4)
        out["warp_ratio_ok"] = ratio <= TARGETS["warp_ratio_max"]
        dis = summary.get("tokenflow-dis")
        if dis is not None and dis["warp_error_gt"] is not None:
            out["warp_ratio_gt_dis_variant"] = round(dis["warp_error_gt"] / pf["warp_error_gt"], 4)
    if tf["edit_accuracy"] is not None:
        out["edit_accuracy_ok"] = tf["edit_accuracy"] >= TARGETS["edit_accuracy_min"]
    if tf["structure_iou"] is not None:
        out["structure_iou_ok"] = tf["structure_iou"] >= TARGETS["structure_iou_min"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="SANA model folder (default: the embedded model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bf16 on CUDA, float32 on CPU)")
    p.add_argument("--videos", type=int, default=NUM_VIDEOS, help=f"number of videos (default {NUM_VIDEOS})")
    p.add_argument("--frames", type=int, default=FRAMES, help=f"frames per video (default {FRAMES})")
    p.add_argument("--size", type=int, default=SIZE, help=f"frame side in pixels (default {SIZE})")
    p.add_argument("--settings", default=",".join(SETTINGS), help="fast and/or full (default both)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--steps", type=int, default=50, help="editing steps (default 50)")
    p.add_argument("--full-inversion-steps", type=int, default=SETTINGS["full"],
                   help="inversion steps of the full setting (default 500)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5, the CLI default)")
    p.add_argument("--negative", default="",
                   help="negative prompt (default empty: the unconditional the model was trained with)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per chunk (default 8)")
    p.add_argument("--save-videos", type=Path, default=None, help="also write source | edit mp4s here")
    p.add_argument("--smoke", action="store_true", help="tiny random SANA (unless --model), 2 videos, few steps")
    add_out_argument(p, DEFAULT_OUT, SMOKE_OUT)
    args = p.parse_args(argv)
    if args.smoke:
        args.videos, args.frames, args.size, args.steps = min(args.videos, 2), min(args.frames, 4), 64, 3
        args.full_inversion_steps = 6
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, choices in (("settings", SETTINGS), ("methods", METHODS)):
        bad = [v for v in getattr(args, name) if v not in choices]
        if bad:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(choices)}")
    return fill_defaults(args, DEFAULT_OUT, SMOKE_OUT)


def main(argv: list[str] | None = None) -> int:
    """Run every video x edit x method x setting; write the JSON after each video."""
    from sanaflow.pipelines.video_edit import VideoEditPipeline
    from sanaflow.shapes import random_video, video_caption, video_metrics
    from sanaflow.utils import atomic_write_text

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    with tempfile.TemporaryDirectory(prefix="tokenflow_shapes_") as tmp:
        if args.smoke and args.model is None:
            pipe = VideoEditPipeline(tiny_backbone(device), cache_dir=Path(tmp) / "cache")
            model = "tiny random SANA (smoke)"
        else:
            pipe = VideoEditPipeline.from_pretrained(args.model, device=device, dtype=args.dtype,
                                                     cache_dir=Path(tmp) / "cache")
            model = args.model or "embedded (sanaflow/shapes-tiny)"
        seeds = [SEED_BASE + i for i in range(args.videos)]
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
            "model": model, "model_identity": pipe.backbone.name, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "smoke": args.smoke, "seeds": seeds, "frames": args.frames, "size": args.size, "steps": args.steps,
            "cfg": args.cfg, "negative_prompt": args.negative, "batch_size": args.batch_size,
            "settings": {s: {"inversion_steps": args.full_inversion_steps if s == "full" else args.steps}
                         for s in args.settings},
            "methods": {m: METHODS[m] for m in args.methods}, "targets": TARGETS, "rows": [],
        }
        for i, seed in enumerate(seeds):
            video = random_video(seed, frames=args.frames, size=args.size)
            source_prompt = video_caption(video)
            for setting in args.settings:
                inversion_steps = args.full_inversion_steps if setting == "full" else None
                for kind, edit in edits_for(video, seed):
                    target = video_caption(video, edit)
                    for method in args.methods:
                        t0 = time.perf_counter()
                        out = pipe(video.frames, target, source_prompt=source_prompt, negative_prompt=args.negative,
                                   steps=args.steps, inversion_steps=inversion_steps, guidance_scale=args.cfg,
                                   batch_size=args.batch_size, inversion_batch_size=max(args.batch_size, args.frames),
                                   progress=False, **METHODS[method])
                        seconds = time.perf_counter() - t0
                        metrics = video_metrics(out.frames, video, edit)
                        report["rows"].append({
                            "seed": seed, "setting": setting, "method": method, "kind": kind,
                            "edit": {str(k): v for k, v in edit.items()}, "source_prompt": source_prompt,
                            "prompt": target, "seconds": round(seconds, 3),
                            "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                        })
                        if args.save_videos is not None:
                            from sanaflow.video import side_by_side, write_video

                            write_video(args.save_videos / f"{seed}_{setting}_{kind}_{method}.mp4",
                                        side_by_side(video.frames, out.frames), video.fps)
                        m = metrics
                        print(f"[{i + 1}/{len(seeds)}] seed {seed} {setting:4s} {kind:5s} {method:13s} "
                              f"acc {m['edit_accuracy']} iou {m['structure_iou']} "
                              f"warp_gt {m['warp_error_gt']:.5f} warp_dis {m['warp_error_dis']:.5f} "
                              f"({seconds:.1f} s)", flush=True)
            summary = {
                s: {m: summarize([r for r in report["rows"] if r["setting"] == s and r["method"] == m])
                    for m in args.methods}
                for s in args.settings
            }
            report["summary"] = summary
            report["checks"] = {s: check_targets(summary[s]) for s in args.settings}
            report["videos_done"] = i + 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")  # after every video
    for s in args.settings:
        for m in args.methods:
            r = report["summary"][s][m]
            print(f"{s:4s} {m:13s} edits {r['edits']:3d}  acc {r['edit_accuracy']}  iou {r['structure_iou']}  "
                  f"warp_gt {r['warp_error_gt']}  warp_dis {r['warp_error_dis']}", flush=True)
        print(f"{s:4s} checks {report['checks'][s]}", flush=True)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
