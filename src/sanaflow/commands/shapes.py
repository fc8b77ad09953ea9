"""`sanaflow shapes sample|video` (procedural data) and `sanaflow eval images|video` (scores)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import InputError, SanaflowError
from ..utils import check_folder_writable, dumps_json

PROMPTS_FILE = "prompts.jsonl"


def register(subparsers) -> None:
    """Add the `shapes` and `eval` subcommands."""
    shapes = subparsers.add_parser(
        "shapes", help="the procedural shapes world: sample captioned images and videos"
    )
    shapes.set_defaults(func=lambda args: _usage(shapes))
    sub = shapes.add_subparsers(dest="shapes_command", metavar="ACTION")

    p = sub.add_parser(
        "sample", help="write N rendered scenes (PNG) and prompts.jsonl (captions + scene specs)"
    )
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream (default 0)")
    p.add_argument(
        "--split",
        choices=("train", "eval"),
        default="train",
        help="train: the training stream; eval: the balanced evaluation prompts with held-out combinations",
    )
    p.add_argument(
        "--prompts-only", action="store_true", help="write prompts.jsonl only (to generate images for it)"
    )
    p.set_defaults(func=_sample)

    p = sub.add_parser("video", help="write a procedural video (mp4) and its scene track (JSON sidecar)")
    p.add_argument("--out", required=True, help="output .mp4 (the track goes beside it as .json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--objects", type=int, default=None, help="number of objects, 1-4 (default 2 or 3)")
    p.add_argument("--pan", action="store_true", help="textured background panning across the frame")
    p.add_argument("--fps", type=float, default=8.0)
    p.set_defaults(func=_video)

    ev = subparsers.add_parser(
        "eval", help="score generated images or edited videos with the shapes detector"
    )
    ev.set_defaults(func=lambda args: _usage(ev))
    sub = ev.add_subparsers(dest="eval_command", metavar="WHAT")
    p = sub.add_parser("images", help="GenEval-style scores of the images listed in DIR/prompts.jsonl")
    p.add_argument("dir", help="folder with prompts.jsonl and the images it names")
    p.add_argument("--out", default=None, help="JSON report (default DIR/shapes_scores.json)")
    p.set_defaults(func=_eval_images)
    p = sub.add_parser("video", help="edit accuracy, structure IoU and warp errors of an edited shapes video")
    p.add_argument("edited", help="the edited video")
    p.add_argument("--source", required=True, help="the source video written by `sanaflow shapes video`")
    p.add_argument(
        "--edit",
        action="append",
        default=[],
        metavar="K:ATTR=VALUE[,ATTR=VALUE]",
        help="what the edit changed, e.g. 0:color=green or 1:shape=star (repeatable)",
    )
    p.add_argument("--out", default=None, help="JSON report (default EDITED with suffix .metrics.json)")
    p.set_defaults(func=_eval_video)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _check_report_target(out_arg: str | None, default: Path, inputs=()) -> Path:
    """Check the JSON report path (--out, or `default` without it) before scoring; return it.

    It must be a file path (an existing report is replaced, an existing folder is refused) whose
    folders can be created, and none of the `inputs` being scored.
    """
    if out_arg is not None and not out_arg.strip():
        raise InputError("--out is empty; give the JSON file to write the report to, or leave --out out")
    out = Path(out_arg) if out_arg is not None else default
    what = f"--out {str(out)!r}" if out_arg is not None else f"the report {str(out)!r}"
    if out.is_dir():
        raise InputError(f"cannot write {what}: it is a folder; give a JSON file path (e.g. scores.json)")
    check_folder_writable(out.absolute().parent, what)
    target = out.resolve()
    for item in inputs:
        if Path(item).resolve() == target:
            raise InputError(f"cannot write {what}: it is an input ({str(item)!r}) and would be overwritten; "
                             "give another JSON file path")
    return out


def _sample(args) -> int:
    from ..shapes import ShapesDataset, eval_prompts, render
    from ..utils import atomic_write_text, staged_files

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    if not 16 <= args.size <= 4096:
        raise InputError(f"--size must be in [16, 4096], got {args.size}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if not args.out.strip():
        raise InputError("--out is empty; give the folder to write the scenes and prompts.jsonl to")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a folder")
    check_folder_writable(out.absolute().parent, f"--out {str(out)!r}")
    if (out / PROMPTS_FILE).is_dir():
        raise InputError(f"cannot write {str(out / PROMPTS_FILE)!r}: a folder of that name is in the way")
    if args.split == "eval":
        rows = [(p.scene, p.held_out) for p in eval_prompts(args.n, args.seed)]
    else:
        stream = ShapesDataset(seed=args.seed)
        rows = [(s, s.is_held_out()) for s in (stream.scene_at(i) for i in range(args.n))]
    lines = []
    # Rendered beside --out and moved in at the end, prompts.jsonl last: an interrupted run leaves
    # --out as it was, never images without their prompts.
    with staged_files(out, last=PROMPTS_FILE) as staging:
        for i, (scene, held) in enumerate(rows):
            name = f"{i:05d}.png"
            if not args.prompts_only:
                from PIL import Image

                Image.fromarray(render(scene, args.size)).save(staging / name, format="PNG")
            lines.append(
                json.dumps(
                    {
                        "file": name,
                        "caption": scene.caption(),
                        "category": scene.category,
                        "held_out": held,
                        "scene": scene.to_dict(),
                    }
                )
            )
        atomic_write_text(staging / PROMPTS_FILE, "\n".join(lines) + "\n")
    what = "prompts" if args.prompts_only else "images and prompts"
    print(f"wrote {len(rows)} {what} ({args.split} split, seed {args.seed}) to {out}")
    return 0


def _video(args) -> int:
    from ..shapes import random_video, save_video, video_caption
    from ..shapes.motion import sidecar_path
    from ..video import check_video_target

    if Path(args.out).suffix.lower() != ".mp4":
        raise InputError(f"--out must end in .mp4, got {args.out!r}")
    if not 16 <= args.size <= 2048:
        raise InputError(f"--size must be in [16, 2048], got {args.size}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise InputError(f"--fps must be a finite number above 0, got {args.fps}")
    check_video_target(args.out)  # before rendering: no folder in the way, parent writable
    side = sidecar_path(args.out)
    if side.is_dir():
        raise InputError(f"cannot write the scene track {str(side)!r} beside --out: a folder of that name is in "
                         "the way; choose another --out")
    video = random_video(args.seed, args.frames, args.size, args.objects, args.pan, args.fps)
    save_video(video, args.out)
    print(f"wrote {args.out} ({args.frames} frames, {args.size}px): {video_caption(video)}")
    return 0


def read_prompts(folder: str | Path) -> list[dict]:
    """Parse and validate FOLDER/prompts.jsonl -> rows with a `Scene` under "scene" and a list under "files"."""
    from ..shapes import Scene

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder")
    path = folder / PROMPTS_FILE
    if not path.is_file():
        raise InputError(
            f"no {PROMPTS_FILE} in {str(folder)!r}: write one with "
            f"`sanaflow shapes sample --split eval --prompts-only --n N --out {folder}`"
        )
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{no}: not JSON ({e})") from e
        if not isinstance(row, dict) or "scene" not in row or not ({"file", "files"} & set(row)):
            raise InputError(f"{path}:{no}: each line needs 'scene' and 'file' (or 'files')")
        files = row["files"] = row["files"] if "files" in row else [row["file"]]  # one form for the callers
        if (not isinstance(files, list) or not files
                or not all(isinstance(f, str) and f.strip() for f in files)):
            raise InputError(f"{path}:{no}: 'file' must be an image file name (a string) and 'files' a non-empty "
                             f"list of them, got {files!r}")
        if not isinstance(row.get("held_out", False), bool):
            raise InputError(f"{path}:{no}: 'held_out' must be true or false, got {row['held_out']!r}")
        try:
            row["scene"] = Scene.from_dict(row["scene"])
        except SanaflowError as e:
            raise InputError(f"{path}:{no}: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # other malformed specs
            raise InputError(f"{path}:{no}: bad scene spec ({type(e).__name__}: {e})") from e
        rows.append(row)
    if not rows:
        raise InputError(f"{path} lists no prompts")
    return rows


def _load_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image {str(path)!r} listed in {PROMPTS_FILE} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {str(path)!r}: {e}") from e


def _eval_images(args) -> int:
    from ..shapes import format_table, score, summarize
    from ..utils import atomic_write_text

    folder = Path(args.dir)
    rows = read_prompts(folder)
    listed = [folder / name for row in rows for name in row["files"]]
    out = _check_report_target(args.out, folder / "shapes_scores.json", [folder / PROMPTS_FILE, *listed])
    results, held, report = [], [], []
    for row in rows:
        scene = row["scene"]
        held_out = row.get("held_out", scene.is_held_out())
        for name in row["files"]:
            r = score(_load_image(folder / name), scene)
            results.append(r)
            held.append(held_out)
            report.append(
                {"file": name, "caption": row.get("caption", scene.caption()), "held_out": held_out, **r}
            )
    summary = summarize(results, held)
    print(format_table(summary))
    atomic_write_text(out, dumps_json({"summary": summary, "results": report}, indent=1))
    print(f"wrote {out}")
    return 0


def parse_edit(specs: list[str]) -> dict[int, dict]:
    """['0:color=green', '1:shape=star,color=red'] -> {0: {'color': 'green'}, 1: {...}}."""
    edit: dict[int, dict] = {}
    for spec in specs:
        head, sep, body = spec.partition(":")
        if not sep or not head.strip().isdigit() or not body:
            raise InputError(f"--edit {spec!r}: expected K:ATTR=VALUE[,ATTR=VALUE], e.g. 0:color=green")
        change = edit.setdefault(int(head), {})
        for item in body.split(","):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in ("color", "shape"):
                raise InputError(f"--edit {spec!r}: attributes are color=NAME and shape=NAME")
            change[key.strip()] = value.strip()
    return edit


def _eval_video(args) -> int:
    from ..shapes import load_video, video_metrics
    from ..shapes.motion import sidecar_path
    from ..utils import atomic_write_text
    from ..video import read_video

    edit = parse_edit(args.edit)
    default = Path(args.edited).with_suffix(".metrics.json")
    inputs = [args.edited, args.source, sidecar_path(args.source)]
    out = _check_report_target(args.out, default, inputs)  # before decoding and scoring
    source = load_video(args.source)
    edited = read_video(args.edited).frames
    metrics = video_metrics(edited, source, edit)
    for key, value in metrics.items():
        print(f"{key:<24}{value if not isinstance(value, float) else f'{value:.6f}'}")
    atomic_write_text(
        out,
        dumps_json(
            {
                "edited": str(args.edited),
                "source": str(args.source),
                "edit": {str(k): v for k, v in edit.items()},
                **metrics,
            },
            indent=1,
        ),
    )
    print(f"wrote {out}")
    return 0
