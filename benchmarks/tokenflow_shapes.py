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

and two settings: ``fast`` (the CLI default: inversion on the 50-step editing schedule, refined to
the sampler's inverse with 5 fixed-point iterations per step) and ``full`` (500 plain inversion steps,
the public code's default). Guidance and negative prompt are the model's defaults (SANA: 4.5 and
the empty prompt), PnP thresholds TokenFlow's (0.8 / 0.5), cross-attention control and local blending
the model's defaults (SANA: 0.5 of the steps, threshold 0.5; outside the blend mask the source pixels
are pasted back, `--no-paste-source` keeps the decoded ones), 50 steps, chunks of 8 frames.

Metrics (`sanaflow.shapes.video_metrics`): edit accuracy, structure IoU, and the warp error along
the ground-truth flow and along DIS flow of the source, both occlusion-masked; for shape edits the
mask also drops the edited object's surroundings, where the source flow cannot say how the new
outline moves (`edit_valid_mask`; the plain-mask values stay in the rows as ``*_all``). Each
inversion is also sampled back without an edit: the ``reconstruction`` rows are the reference
(what the model and the inversion give before any edit). Targets: tokenflow's ground-truth warp
error <= 0.7 x per-frame's, edit accuracy >= 0.8, structure IoU >= 0.75. Results (means per setting
and method, the target checks, every edit's row, timings and the command) go to
benchmarks/results/tokenflow_quality.json, rewritten after every video.

    # CPU (2 cores), the embedded model: ~3 min per video with all three methods (fast setting)
    python benchmarks/tokenflow_shapes.py --device cpu --settings fast --videos 5      # ~15 min
    python benchmarks/tokenflow_shapes.py --device cpu --settings fast                 # 20 videos, ~60 min
    python benchmarks/tokenflow_shapes.py --settings full --out benchmarks/results/tokenflow_quality_full.json
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
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tokenflow_quality.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "tokenflow_shapes_smoke.json"

SEED_BASE = 10_000_000  # video seeds SEED_BASE + i: kept out of every training run
# --validation videos start here: same split, never reported, so settings (PnP thresholds, guidance)
# can be chosen on them and then measured on the benchmark's own videos.
VALIDATION_OFFSET = 1000
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


def fit_frames(frames: np.ndarray, video) -> np.ndarray:
    """Frames resized to the source video's size (the pipeline crops to the backbone's multiple)."""
    import cv2

    h, w = video.frames.shape[1:3]
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


def edit_metrics(frames: np.ndarray, video, edit: dict[int, dict[str, str]], dis) -> dict[str, Any]:
    """`video_metrics` with the source's DIS flow computed once per video (warp errors on the edit-aware mask)."""
    from sanaflow.shapes import video_metrics

    return video_metrics(frames, video, edit, dis=dis)


def tiny_backbone(device: torch.device):
    """A tiny random SANA backbone (for --smoke without a model folder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tokenflow import build_sana

    return build_sana(device, smoke=True)


def open_pipeline(args: argparse.Namespace, cache_dir: Path):
    """(VideoEditPipeline, model name) for the scripts' --model / --device / --dtype / --smoke options.

    On the CPU torch uses at most 4 threads (more only adds contention on small frames).
    """
    from sanaflow.pipelines.video_edit import VideoEditPipeline

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    if args.smoke and args.model is None:
        return VideoEditPipeline(tiny_backbone(device), cache_dir=cache_dir), "tiny random SANA (smoke)"
    pipe = VideoEditPipeline.from_pretrained(args.model, device=device, dtype=args.dtype, cache_dir=cache_dir)
    return pipe, args.model or "embedded (sanaflow/shapes-tiny)"


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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype (what `open_pipeline` reads)."""
    p.add_argument("--model", default=None, help="SANA model folder (default: the embedded model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bf16 on CUDA, float32 on CPU)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_arguments(p)
    p.add_argument("--videos", type=int, default=NUM_VIDEOS, help=f"number of videos (default {NUM_VIDEOS})")
    p.add_argument("--validation", action="store_true",
                   help=f"use the videos after the benchmark's (seeds {SEED_BASE + VALIDATION_OFFSET} + i), for "
                        "choosing settings without touching the reported videos")
    p.add_argument("--frames", type=int, default=FRAMES, help=f"frames per video (default {FRAMES})")
    p.add_argument("--size", type=int, default=SIZE, help=f"frame side in pixels (default {SIZE})")
    p.add_argument("--settings", default=",".join(SETTINGS), help="fast and/or full (default both)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--steps", type=int, default=50, help="editing steps (default 50)")
    p.add_argument("--full-inversion-steps", type=int, default=SETTINGS["full"],
                   help="inversion steps of the full setting (default 500)")
    p.add_argument("--inversion-refine", type=int, default=None,
                   help="fixed-point refinements per inversion step (default: the pipeline's; 5 for the fast "
                        "setting, 0 for the full one)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, 4.5 for SANA)")
    p.add_argument("--pnp-feature", type=float, default=0.8, help="PnP feature-injection fraction (default 0.8)")
    p.add_argument("--pnp-attn", type=float, default=0.5, help="PnP attention-injection fraction (default 0.5)")
    p.add_argument("--cross-attn", type=float, default=None,
                   help="Prompt-to-Prompt cross-attention fraction (default: the model's, 0.5 for SANA)")
    p.add_argument("--cross-reweight", type=float, default=None,
                   help="factor of the edited words' cross-attention while the control runs (default: the "
                        "model's; 1 = off)")
    p.add_argument("--propagation", type=float, default=None,
                   help="weight of propagated keyframe tokens against each frame's own attention (default: the "
                        "model's; 1 = TokenFlow's pure propagation)")
    p.add_argument("--output-propagation", type=float, default=None,
                   help="weight of the keyframes' carried predictions inside the edit (default: the model's; 0 = off)")
    p.add_argument("--output-propagation-steps", type=float, default=None,
                   help="fraction of leading steps with output propagation (default: the model's)")
    p.add_argument("--output-correspondence", choices=("flow", "tokens"), default="flow",
                   help="output propagation along DIS flow (default) or the attention's token matches")
    p.add_argument("--local-blend", type=float, default=None,
                   help="local-blend threshold (default: the model's, 0.5 for SANA; 0 = off)")
    p.add_argument("--no-paste-source", dest="paste_source", action="store_false",
                   help="with the local blend: keep the decoded frames outside the mask (default: the source "
                        "frames' pixels are put back there, as the pipeline does)")
    p.add_argument("--negative", default=None,
                   help="negative prompt (default: the model's; for SANA the empty unconditional it was trained with)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per chunk (default 8)")
    p.add_argument("--no-reconstruction", action="store_true",
                   help="skip the reference row of each inversion sampled back without guidance")
    p.add_argument("--baseline-from", type=Path, default=None,
                   help="take the per-frame baseline's rows and the reconstructions from this earlier report (same "
                        "videos and settings; the per-frame edit does not depend on --propagation) instead of "
                        "running them again")
    p.add_argument("--extend", type=Path, default=None,
                   help="add this run's --methods to an earlier report of the same videos and settings (any "
                        "device): its rows of the other methods and its reconstructions are kept as they are, "
                        "e.g. the DIS-flow variant run on a CPU beside a GPU run of the others")
    p.add_argument("--save-videos", type=Path, default=None, help="also write source | edit mp4s here")
    p.add_argument("--smoke", action="store_true", help="tiny random SANA (unless --model), 2 videos, few steps")
    p.add_argument("--resume", action="store_true",
                   help="keep the videos an interrupted run of the same settings already wrote to --out "
                        "and run only the rest")
    add_out_argument(p, DEFAULT_OUT, SMOKE_OUT)
    args = p.parse_args(argv)
    if args.smoke:
        args.videos, args.frames, args.size, args.steps = min(args.videos, 2), min(args.frames, 4), 64, 3
        args.full_inversion_steps = 6
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.extend is not None and args.baseline_from is not None:
        p.error("--extend and --baseline-from are alternatives: pick one")
    for name, choices in (("settings", SETTINGS), ("methods", METHODS)):
        bad = [v for v in getattr(args, name) if v not in choices]
        if bad:
            p.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(choices)}")
    return fill_defaults(args, DEFAULT_OUT, SMOKE_OUT)


# The report keys that must agree for an interrupted run's videos to be kept by --resume.
RESUME_KEYS = ("model", "model_identity", "device", "smoke", "seeds", "frames", "size", "steps", "cfg",
               "negative_prompt", "batch_size", "pnp_feature", "pnp_attention", "cross_attention",
               "local_blend", "paste_source", "methods", "propagation", "output_propagation",
               "cross_reweight")


def _resume(report: dict[str, Any], path: Path) -> int:
    """Copy the finished videos of an earlier run of the same settings at ``path`` into ``report``.

    Returns how many videos (in seed order) are done. Every video's rows are independent of the
    others' (each edit seeds its own noise), so the kept rows equal what a fresh run would write.
    """
    if not path.exists():
        print(f"--resume: {path} does not exist yet, starting from the first video", flush=True)
        return 0
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--resume: cannot read {path}: {e}") from None
    differ = [k for k in RESUME_KEYS if old.get(k) != report[k]]
    if differ or set(old.get("settings", {})) != set(report["settings"]):
        raise SystemExit(f"--resume: {path} was written with other settings ({', '.join(differ) or 'settings'}); "
                         f"rerun without --resume or pick another --out")
    done = int(old.get("videos_done", 0))
    kept = set(report["seeds"][:done])
    report["rows"] = [r for r in old.get("rows", []) if r["seed"] in kept]
    report["reconstructions"] = [r for r in old.get("reconstructions", []) if r["seed"] in kept]
    for s, info in old.get("settings", {}).items():
        report["settings"][s].update(info)
    report["seconds_before_resume"] = float(old.get("seconds_total", 0.0))
    report["resumed"] = [*old.get("resumed", []), {"date": old.get("date"), "videos_done": done}]
    print(f"--resume: kept {done} of {len(report['seeds'])} videos from {path}", flush=True)
    return done


def _differences(old: dict[str, Any], report: dict[str, Any], skip: tuple[str, ...]) -> list[str]:
    """The RESUME_KEYS (less `skip`) in which an earlier report differs from this run's, across machines:
    the device and the model folder's identity may differ, the weights' content (when recorded) must not."""
    same = [k for k in RESUME_KEYS if k not in (*skip, "device", "model_identity")]
    if "model_content" in old:
        same.append("model_content")
    return [k for k in same if old.get(k) != report[k]]


def _baseline(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The per-frame rows and reconstructions of --baseline-from, checked to match this run's settings."""
    path = args.baseline_from
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--baseline-from: cannot read {path}: {e}") from None
    # The per-frame edit does not depend on the propagation settings; another machine's run is fine.
    differ = _differences(old, report, ("methods", "propagation", "output_propagation"))
    if differ or not set(report["settings"]) <= set(old.get("settings", {})):
        raise SystemExit(f"--baseline-from: {path} was written with other settings ({', '.join(differ) or 'settings'})")
    rows = [r for r in old.get("rows", []) if r["method"] == "per-frame" and r["setting"] in report["settings"]]
    missing = sorted(set(report["seeds"]) - {r["seed"] for r in rows})
    if missing:
        raise SystemExit(f"--baseline-from: {path} has no per-frame rows for seeds {missing[:5]}")
    if "per-frame" not in args.methods:
        args.methods.append("per-frame")
        report["methods"]["per-frame"] = METHODS["per-frame"]
    report["baseline_from"] = str(path)
    recs = [r for r in old.get("reconstructions", []) if r["setting"] in report["settings"]]
    return {"rows": rows, "reconstructions": recs}


def _content_hash(pipe: Any) -> str | None:
    """A fingerprint of the model's weight files' bytes (None for models not loaded from a folder)."""
    import hashlib

    name = str(pipe.backbone.name)
    root = Path(name.rsplit("#", 1)[0])
    if "#" not in name or not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _extend(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The rows of the methods this run does not run, and the reconstructions, of --extend's report."""
    path = args.extend
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--extend: cannot read {path}: {e}") from None
    differ = _differences(old, report, ("methods",))
    if differ or not set(report["settings"]) <= set(old.get("settings", {})):
        raise SystemExit(f"--extend: {path} was written with other settings ({', '.join(differ) or 'settings'})")
    kept = [m for m in old.get("methods", {}) if m not in args.methods]
    rows = [r for r in old.get("rows", []) if r["method"] in kept and r["setting"] in report["settings"]]
    missing = sorted(set(report["seeds"]) - {r["seed"] for r in rows}) if kept else []
    if missing:
        raise SystemExit(f"--extend: {path} has no rows for seeds {missing[:5]}")
    args.methods += kept
    report["methods"] = {m: METHODS[m] for m in args.methods}
    report["extends"] = {"path": str(path), "methods": kept, "device": old.get("device"), "gpu": old.get("gpu"),
                         "torch": old.get("torch"), "date": old.get("date")}
    if "baseline_from" in old:  # where the kept per-frame rows came from
        report["extends"]["baseline_from"] = old["baseline_from"]
    recs = [r for r in old.get("reconstructions", []) if r["setting"] in report["settings"]]
    return {"rows": rows, "reconstructions": recs}


def _summarize_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Means per setting and method (and of the reconstructions), and the target checks."""
    summary = {
        s: {m: summarize([r for r in report["rows"] if r["setting"] == s and r["method"] == m])
            for m in args.methods}
        for s in args.settings
    }
    for s in args.settings:
        recs = [r for r in report["reconstructions"] if r["setting"] == s]
        if recs:
            summary[s]["reconstruction"] = summarize([{**r, "kind": "none"} for r in recs])
    report["summary"] = summary
    report["checks"] = {s: check_targets(summary[s]) for s in args.settings}


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _line(m: dict[str, Any]) -> str:
    warp = " ".join(f"{k} {m[k]:.5f}" for k in ("warp_error_gt", "warp_error_dis"))
    acc = "-" if m["edit_accuracy"] is None else f"{m['edit_accuracy']:.3f}"
    iou = "-" if m["structure_iou"] is None else f"{m['structure_iou']:.3f}"
    return f"acc {acc} iou {iou} {warp}"


def main(argv: list[str] | None = None) -> int:
    """Run every video x edit x method x setting; write the JSON after each video."""
    from sanaflow.shapes import dis_flow, random_video, video_caption
    from sanaflow.shapes.motion import EDGE_MARGIN
    from sanaflow.utils import atomic_write_text
    from sanaflow.video import VideoClip

    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenflow_shapes_") as tmp:
        pipe, model = open_pipeline(args, Path(tmp) / "cache")
        # The pipeline's defaults, resolved here so the report names the values that ran.
        cfg = pipe.backbone.default_guidance if args.cfg is None else args.cfg
        negative = pipe.backbone.default_negative if args.negative is None else args.negative
        cross = (min(pipe.backbone.default_cross_attention, args.pnp_attn) if args.cross_attn is None
                 else args.cross_attn)
        blend = pipe.backbone.default_local_blend if args.local_blend is None else args.local_blend
        reweight = pipe.backbone.default_cross_reweight if args.cross_reweight is None else args.cross_reweight
        propagation = pipe.backbone.default_propagation if args.propagation is None else args.propagation
        out_weight = (pipe.backbone.default_output_propagation if args.output_propagation is None
                      else args.output_propagation)
        out_steps = (pipe.backbone.default_output_propagation_steps if args.output_propagation_steps is None
                     else args.output_propagation_steps)
        # None when off, so reports written before the option existed compare equal (--resume, --extend).
        output_propagation = None if out_weight <= 0 else {
            "weight": out_weight, "steps": out_steps, "correspondence": args.output_correspondence}
        first = SEED_BASE + (VALIDATION_OFFSET if args.validation else 0)
        seeds = [first + i for i in range(args.videos)]
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
            "model": model, "model_identity": pipe.backbone.name, "model_content": _content_hash(pipe),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "smoke": args.smoke, "seeds": seeds, "frames": args.frames, "size": args.size, "steps": args.steps,
            "cfg": cfg, "negative_prompt": negative, "batch_size": args.batch_size,
            "pnp_feature": args.pnp_feature, "pnp_attention": args.pnp_attn, "cross_attention": cross,
            "local_blend": blend, "propagation": propagation, "output_propagation": output_propagation,
            # None when off, as output_propagation
            "cross_reweight": None if reweight == 1.0 or cross <= 0 else reweight,
            "paste_source": args.paste_source,
            "settings": {s: {"inversion_steps": args.full_inversion_steps if s == "full" else args.steps}
                         for s in args.settings},
            "methods": {m: METHODS[m] for m in args.methods}, "targets": TARGETS,
            "warp_mask": f"source flow-valid pixels; shape edits also drop the edited object's surroundings "
                         f"(circumradius + {EDGE_MARGIN:g} px) outside its source footprint (*_all: without that)",
            "rows": [], "reconstructions": [],
        }
        baseline = None
        if args.baseline_from is not None:
            baseline = _baseline(report, args)
        elif args.extend is not None:
            baseline = _extend(report, args)
        copied = set(report["extends"]["methods"]) if args.extend is not None else set()
        done = _resume(report, args.out) if args.resume else 0
        batch = max(args.batch_size, args.frames)  # inversion, reconstruction and decoding: no coupling
        for i, seed in enumerate(seeds):
            if i < done:
                continue
            video = random_video(seed, frames=args.frames, size=args.size)
            source_prompt = video_caption(video)
            dis = dis_flow(video.frames)  # the source's DIS flow, shared by every edit of the video
            clip = pipe.prepare(VideoClip(video.frames, video.fps), size=args.size)
            if baseline is not None:
                report["rows"] += [r for r in baseline["rows"] if r["seed"] == seed]
                report["reconstructions"] += [r for r in baseline["reconstructions"] if r["seed"] == seed]
            for setting in args.settings:
                inversion_steps = args.full_inversion_steps if setting == "full" else None
                # One inversion per video and setting, timed on its own; every edit below reuses it.
                t0 = time.perf_counter()
                inversion = pipe.invert(clip, source_prompt, args.steps, inversion_steps, batch,
                                        reconstruct=not args.no_reconstruction and baseline is None, progress=False,
                                        inversion_refine=args.inversion_refine)
                seconds = time.perf_counter() - t0
                report["settings"][setting]["inversion_refine"] = inversion.cache.manifest["key"]["refine"]
                if inversion.reconstruction is not None:
                    # The reference: the inversion sampled back with no edit and no guidance.
                    metrics = edit_metrics(fit_frames(inversion.reconstruction, video), video, {}, dis)
                    report["reconstructions"].append({"seed": seed, "setting": setting, "seconds": round(seconds, 3),
                                                      "metrics": _rounded(metrics)})
                    print(f"[{i + 1}/{len(seeds)}] seed {seed} {setting:4s} inversion + reconstruction "
                          f"{_line(metrics)} ({seconds:.1f} s)", flush=True)
                for kind, edit in edits_for(video, seed):
                    target = video_caption(video, edit)
                    for method in args.methods:
                        if method in copied or (args.baseline_from is not None and method == "per-frame"):
                            continue  # copied from the earlier report above
                        t0 = time.perf_counter()
                        out = pipe(clip, target, source_prompt=source_prompt, negative_prompt=negative,
                                   steps=args.steps, inversion_steps=inversion_steps, guidance_scale=cfg,
                                   pnp_feature=args.pnp_feature, pnp_attention=args.pnp_attn,
                                   cross_attention=cross, cross_reweight=reweight, local_blend=blend,
                                   paste_source=args.paste_source,
                                   propagation=propagation, output_propagation=out_weight,
                                   output_propagation_steps=out_steps,
                                   output_correspondence=args.output_correspondence,
                                   batch_size=args.batch_size, inversion_batch_size=batch,
                                   inversion_refine=args.inversion_refine, progress=False, **METHODS[method])
                        seconds = time.perf_counter() - t0
                        if not out.inversion.reused:
                            raise RuntimeError("the edit did not reuse the video's inversion (cache key mismatch)")
                        metrics = edit_metrics(fit_frames(out.frames, video), video, edit, dis)
                        report["rows"].append({
                            "seed": seed, "setting": setting, "method": method, "kind": kind,
                            "edit": {str(k): v for k, v in edit.items()}, "source_prompt": source_prompt,
                            "prompt": target, "seconds": round(seconds, 3), "metrics": _rounded(metrics),
                        })
                        if args.save_videos is not None:
                            from sanaflow.video import side_by_side, write_video

                            write_video(args.save_videos / f"{seed}_{setting}_{kind}_{method}.mp4",
                                        side_by_side(video.frames, out.frames), video.fps)
                        print(f"[{i + 1}/{len(seeds)}] seed {seed} {setting:4s} {kind:5s} {method:13s} "
                              f"{_line(metrics)} ({seconds:.1f} s)", flush=True)
            _summarize_report(report, args)
            report["videos_done"] = i + 1
            report["seconds_total"] = round(report.get("seconds_before_resume", 0.0)
                                            + time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")  # after every video
    if "summary" not in report:  # --resume of a finished run: nothing was left to run
        _summarize_report(report, args)
        report["videos_done"] = len(report["seeds"])
        report["seconds_total"] = round(report["seconds_before_resume"], 1)
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    for s in args.settings:
        for m, r in report["summary"][s].items():
            print(f"{s:4s} {m:14s} edits {r['edits']:3d}  acc {r['edit_accuracy']}  iou {r['structure_iou']}  "
                  f"warp_gt {r['warp_error_gt']}  warp_dis {r['warp_error_dis']}", flush=True)
        print(f"{s:4s} checks {report['checks'][s]}", flush=True)
    print(f"wrote {args.out} ({report['seconds_total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
