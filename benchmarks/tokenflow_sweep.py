"""Choose TokenFlow's PnP thresholds and guidance for a backbone on the --validation videos (issue 6).

The same procedural videos and edits as `tokenflow_shapes.py`, but from the validation seeds
(10_001_000 + i: the video split, never reported), and one edit method (default: tokenflow-pnp with
feature correspondences) run over a grid of settings ``feature/attention/guidance[/cross]`` on one
shared inversion per video (cross: the Prompt-to-Prompt cross-attention fraction; left out, the
model's default), crossed with negative prompts (``--negatives``) and local-blend thresholds
(``--local-blends``). Writes the mean edit accuracy, structure IoU and warp errors per setting, so
that a backbone's defaults are chosen here and then measured once on the benchmark's own videos.

    # CPU, the embedded model: ~35 s per video for the inversion + ~18 s per edit and setting
    python benchmarks/tokenflow_sweep.py --device cpu --videos 4 \\
        --grid 0.8/0.5/4.5,0.6/0.4/4.5,0.4/0.2/4.5,0.8/0.5/7.0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_out_argument, fill_defaults
from tokenflow_shapes import (
    METHODS,
    ROOT,
    SEED_BASE,
    VALIDATION_OFFSET,
    _line,
    _rounded,
    add_model_arguments,
    edit_metrics,
    edits_for,
    fit_frames,
    open_pipeline,
    summarize,
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tokenflow_validation_sweep.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "tokenflow_sweep_smoke.json"


def parse_grid(text: str) -> list[tuple[float, float, float, float | None]]:
    """'0.8/0.5/4.5,0.6/0.4/4.5/0' -> [(feature, attention, guidance, cross or None), ...].

    Fractions lie in [0, 1], guidance >= 0; a missing cross-attention fraction is the model's default.
    """
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split("/")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            feature, attention, guidance, *rest = (float(v) for v in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"grid entry {item!r}: write FEATURE/ATTENTION/GUIDANCE[/CROSS], e.g. 0.8/0.5/4.5 or 0.8/0.5/4.5/0.3"
            ) from None
        cross = rest[0] if rest else None
        if not (0 <= feature <= 1 and 0 <= attention <= 1 and guidance >= 0 and (cross is None or 0 <= cross <= 1)):
            raise argparse.ArgumentTypeError(
                f"grid entry {item!r}: PnP and cross-attention fractions must lie in [0, 1] and guidance be >= 0")
        out.append((feature, attention, guidance, cross))
    if not out:
        raise argparse.ArgumentTypeError("the grid is empty")
    return out


def parse_output_propagation(item: str) -> tuple[float, float, str]:
    """'0.6' -> (0.6, 1.0, 'flow'); '0.6/0.5/tokens' -> (0.6, 0.5, 'tokens')."""
    from sanaflow.tokenflow.editor import OUTPUT_CORRESPONDENCES

    parts = item.split("/")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{item!r}: write WEIGHT[/STEPS[/CORRESPONDENCE]]")
    weight, steps = float(parts[0]), float(parts[1]) if len(parts) > 1 else 1.0
    corr = parts[2] if len(parts) > 2 else "flow"
    if not (0 <= weight <= 1 and 0 <= steps <= 1) or corr not in OUTPUT_CORRESPONDENCES:
        raise ValueError(f"{item!r}: WEIGHT and STEPS lie in [0, 1], CORRESPONDENCE is one of {OUTPUT_CORRESPONDENCES}")
    return weight, steps, corr


def _numbers(p: argparse.ArgumentParser, flag: str, text: str | None, ok: Callable[[float], bool],
             allowed: str) -> list[float | None]:
    """A comma-separated axis of numbers, each in `allowed`; None (the flag left out): [None], the model's default."""
    if text is None:
        return [None]
    try:
        values = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        p.error(f"{flag} takes comma-separated numbers in {allowed}; got {text!r}")
    if not values or not all(ok(b) for b in values):
        p.error(f"{flag} takes numbers in {allowed}; got {values}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_arguments(p)
    p.add_argument("--videos", type=int, default=4, help="validation videos (default 4)")
    p.add_argument("--first-video", type=int, default=0, help="index of the first validation video (default 0)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="editing steps (default 50; inversion on the same schedule)")
    p.add_argument("--method", default="tokenflow", choices=sorted(METHODS))
    p.add_argument("--grid", type=parse_grid, default=parse_grid("0.8/0.5/4.5"),
                   help="comma-separated FEATURE/ATTENTION/GUIDANCE[/CROSS] settings (default 0.8/0.5/4.5; "
                        "CROSS: the cross-attention control fraction, default the model's)")
    p.add_argument("--negatives", default="default",
                   help="comma-separated negative prompts to cross with the grid: 'default' (the model's) and/or "
                        "'source' (each video's source prompt, guiding away from it) (default: default)")
    p.add_argument("--local-blends", default=None,
                   help="comma-separated local-blend thresholds to cross with the grid (0 = off; default: the "
                        "model's default only)")
    p.add_argument("--propagations", default=None,
                   help="comma-separated weights of propagated keyframe tokens against each frame's own attention "
                        "to cross with the grid (1 = pure propagation; default: the model's default only)")
    p.add_argument("--output-propagations", default=None,
                   help="comma-separated output-propagation settings WEIGHT[/STEPS] to cross with the grid (0 = "
                        "off; STEPS: fraction of leading steps, default 1; default: the model's default only)")
    p.add_argument("--reweights", default=None,
                   help="comma-separated factors of the edited words' cross-attention to cross with the grid "
                        "(1 = off; default: the model's default only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny random SANA, 1 video, few steps")
    add_out_argument(p, DEFAULT_OUT, SMOKE_OUT)
    args = p.parse_args(argv)
    args.negatives = [n.strip() for n in args.negatives.split(",") if n.strip()]
    if not args.negatives or any(n not in ("default", "source") for n in args.negatives):
        p.error(f"--negatives takes 'default' and/or 'source'; got {args.negatives}")
    args.local_blends = _numbers(p, "--local-blends", args.local_blends, lambda b: 0 <= b < 1, "[0, 1)")
    args.propagations = _numbers(p, "--propagations", args.propagations, lambda b: 0 <= b <= 1, "[0, 1]")
    args.reweights = _numbers(p, "--reweights", args.reweights, lambda b: 0 <= b <= 20, "[0, 20]")
    try:
        args.output_propagations = ([None] if args.output_propagations is None else [
            parse_output_propagation(item)
            for item in (t.strip() for t in args.output_propagations.split(",")) if item])
    except ValueError as e:
        p.error(f"--output-propagations: {e}")
    if not args.output_propagations:
        p.error("--output-propagations is empty")
    if args.smoke:
        args.videos, args.frames, args.size, args.steps = 1, 4, 64, 3
    return fill_defaults(args, DEFAULT_OUT, SMOKE_OUT)


def main(argv: list[str] | None = None) -> int:
    from sanaflow.shapes import dis_flow, random_video, video_caption
    from sanaflow.utils import atomic_write_text
    from sanaflow.video import VideoClip

    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    grid = [(setting, neg, blend, prop, outp, rw) for rw in args.reweights for outp in args.output_propagations
            for prop in args.propagations for blend in args.local_blends for neg in args.negatives
            for setting in args.grid]
    keys = [f"{f:g}/{a:g}/{g:g}" + ("" if c is None else f"/{c:g}") + ("" if neg == "default" else f"+neg={neg}")
            + ("" if blend is None else f"+blend={blend:g}") + ("" if prop is None else f"+prop={prop:g}")
            + ("" if outp is None else f"+out={outp[0]:g}/{outp[1]:g}/{outp[2]}")
            + ("" if rw is None else f"+reweight={rw:g}")
            for (f, a, g, c), neg, blend, prop, outp, rw in grid]
    with tempfile.TemporaryDirectory(prefix="tokenflow_sweep_") as tmp:
        pipe, _ = open_pipeline(args, Path(tmp) / "cache")
        negative = pipe.backbone.default_negative
        # The cross-attention fraction each setting ran with (the model's default where the grid names none).
        crosses = [min(pipe.backbone.default_cross_attention, a) if c is None else c for (_, a, _, c), *_ in grid]
        blends = [pipe.backbone.default_local_blend if b is None else b for _, _, b, *_ in grid]
        props = [pipe.backbone.default_propagation if q is None else q for *_, q, _, _ in grid]
        outps = [(pipe.backbone.default_output_propagation, pipe.backbone.default_output_propagation_steps, "flow")
                 if o is None else o for *_, o, _ in grid]
        reweights = [pipe.backbone.default_cross_reweight if r is None else r for *_, r in grid]
        seeds = [SEED_BASE + VALIDATION_OFFSET + args.first_video + i for i in range(args.videos)]
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
            "model_identity": pipe.backbone.name, "device": str(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
            "seeds": seeds, "frames": args.frames, "size": args.size, "steps": args.steps,
            "method": args.method, "grid": keys, "negative_prompt": negative,
            "cross_attention": dict(zip(keys, crosses)), "local_blend": dict(zip(keys, blends)),
            "propagation": dict(zip(keys, props)), "output_propagation": dict(zip(keys, outps)),
            "cross_reweight": dict(zip(keys, reweights)), "rows": [],
        }
        batch = max(args.batch_size, args.frames)
        for i, seed in enumerate(seeds):
            video = random_video(seed, frames=args.frames, size=args.size)
            source_prompt = video_caption(video)
            dis = dis_flow(video.frames)
            clip = pipe.prepare(VideoClip(video.frames, video.fps), size=args.size)
            pipe.invert(clip, source_prompt, args.steps, None, batch, reconstruct=False, progress=False)
            for kind, edit in edits_for(video, seed):
                target = video_caption(video, edit)
                for key, cross, blend, prop, outp, rw, ((feature, attention, guidance, _), neg, *_) in zip(
                        keys, crosses, blends, props, outps, reweights, grid):
                    t0 = time.perf_counter()
                    out = pipe(clip, target, source_prompt=source_prompt,
                               negative_prompt=source_prompt if neg == "source" else negative,
                               steps=args.steps, guidance_scale=guidance, pnp_feature=feature,
                               pnp_attention=attention, cross_attention=cross, cross_reweight=rw, local_blend=blend,
                               propagation=prop,
                               output_propagation=outp[0], output_propagation_steps=outp[1],
                               output_correspondence=outp[2],
                               batch_size=args.batch_size,
                               inversion_batch_size=batch, progress=False, **METHODS[args.method])
                    if not out.inversion.reused:
                        raise RuntimeError("the edit did not reuse the video's inversion (cache key mismatch)")
                    metrics = edit_metrics(fit_frames(out.frames, video), video, edit, dis)
                    report["rows"].append({"seed": seed, "setting": key, "kind": kind, "prompt": target,
                                           "seconds": round(time.perf_counter() - t0, 3),
                                           "metrics": _rounded(metrics)})
                    print(f"[{i + 1}/{len(seeds)}] seed {seed} {kind:5s} {key:12s} {_line(metrics)}", flush=True)
            report["summary"] = {k: summarize([r for r in report["rows"] if r["setting"] == k]) for k in keys}
            report["videos_done"] = i + 1
            report["seconds_total"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    for k, r in report["summary"].items():
        print(f"{k:12s} acc {r['edit_accuracy']}  iou {r['structure_iou']}  warp_gt {r['warp_error_gt']}", flush=True)
    print(f"wrote {args.out} ({report['seconds_total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
