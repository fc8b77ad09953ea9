"""`sanaflow edit VIDEO --prompt P` (TokenFlow video editing) and `sanaflow invert VIDEO`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

from ..errors import InputError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="video file (mp4, mov, webm, gif, ...) or a folder of frames")
    p.add_argument("--model", default=None, help="model folder / hub id (default: the embedded model)")
    p.add_argument("--variant", default=None,
                   help="weight-file variant to read where the model has it, e.g. fp16 or bf16 (default: the "
                        "default weights)")
    p.add_argument("--source-prompt", default="", help="prompt describing the source video (default: empty)")
    p.add_argument("--steps", type=int, default=50, help="editing steps; latents are cached at these times")
    p.add_argument("--inversion-steps", type=int, default=None,
                   help="inversion steps (default: --steps, the fast setting; TokenFlow's public code uses 500)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per chunk and per model call")
    p.add_argument("--inversion-batch-size", type=int, default=None,
                   help="frames per model call of the inversion and reconstruction (default: --batch-size)")
    p.add_argument("--frames", type=int, default=None, help="use at most N frames")
    p.add_argument("--start", type=int, default=0, help="first frame to use")
    p.add_argument("--stride", type=int, default=1, help="use every K-th frame")
    p.add_argument("--size", type=int, default=None,
                   help="longer side in pixels (default: the video's, at most 512), cropped to the model's multiple")
    p.add_argument("--cache-dir", default=None, help="inversion cache folder (default: ~/.cache/sanaflow/inversions)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16 or float16")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the output (default: the source's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add the `edit` and `invert` subcommands."""
    from ..tokenflow.correspondence import CORRESPONDENCES
    from ..tokenflow.editor import MODES

    edit = subparsers.add_parser("edit", help="edit a video with a text prompt (TokenFlow)",
                                 description="Edit a video with a text prompt, keeping its motion (TokenFlow).")
    _add_common(edit)
    edit.add_argument("--prompt", required=True, help="what the edited video should show")
    edit.add_argument("--negative", default=None,
                      help="negative prompt (default: the model's; TokenFlow's for SD, empty for SANA)")
    edit.add_argument("--mode", default="tokenflow-pnp", choices=MODES, help="editing method")
    edit.add_argument("--cfg", type=float, default=None,
                      help="classifier-free guidance scale (default: the model's; 7.5 for SD, 4.5 for SANA)")
    edit.add_argument("--seed", type=int, default=1, help="seed of the keyframe draws")
    edit.add_argument("--pnp-feature", type=float, default=0.8, help="fraction of steps with PnP feature injection")
    edit.add_argument("--pnp-attn", type=float, default=0.5, help="fraction of steps with PnP attention injection")
    edit.add_argument("--cross-attn", type=float, default=None, metavar="F",
                      help="fraction of steps (in [0, 1]) whose cross-attention keeps the source prompt's word "
                           "maps, token-aligned (Prompt-to-Prompt), so a swapped word lands on the object of the "
                           "word it replaces; PnP modes only (default: the model's, at most --pnp-attn; 0.5 for SANA, "
                           "0 for SD)")
    edit.add_argument("--cross-reweight", type=float, default=None, metavar="C",
                      help="while --cross-attn's control runs, multiply the edited words' cross-attention by C "
                           "(Prompt-to-Prompt re-weighting, in [0, 20]; 1 = off; default: the model's)")
    edit.add_argument("--propagation", type=float, default=None, metavar="P",
                      help="weight (in [0, 1]) of the keyframes' propagated self-attention tokens against each "
                           "frame's own attention output: 1 = TokenFlow's pure propagation, 0 = per-frame "
                           "attention; TokenFlow modes only (default: the model's)")
    edit.add_argument("--output-propagation", type=float, default=None, metavar="W",
                      help="weight (in [0, 1]) of the keyframes' predictions, carried along the same "
                           "correspondences, in each frame's prediction inside the edit: carries what a frame's "
                           "own latent decides (an edited colour) from the keyframes; 0 = off, TokenFlow modes "
                           "only (default: the model's)")
    edit.add_argument("--output-propagation-steps", type=float, default=None, metavar="F",
                      help="fraction of leading steps with --output-propagation (default: the model's)")
    edit.add_argument("--output-correspondence", choices=("flow", "tokens"), default="flow",
                      help="where --output-propagation takes the keyframes' predictions from: DIS optical flow "
                           "between the source frames, bilinear at the latent grid (default), or the attention's "
                           "token matches")
    edit.add_argument("--local-blend", type=float, default=None, metavar="T",
                      help="edit only where the source and target prompts' predictions differ by at least T (in "
                           "[0, 1)) of each frame's largest difference, keep the source video elsewhere; 0 = off "
                           "(default: the model's; 0.5 for SANA, 0 for SD)")
    edit.add_argument("--no-paste-source", dest="paste_source", action="store_false",
                      help="with --local-blend: keep the decoded frames outside the edit mask instead of putting "
                           "the source video's own pixels back there")
    edit.add_argument("--strength", type=float, default=0.9, help="tokenflow-sdedit: fraction of the schedule re-run")
    edit.add_argument("--correspondence", default="features", choices=CORRESPONDENCES,
                      help="token correspondences: diffusion-feature nearest neighbours or DIS optical flow")
    edit.add_argument("--max-keyframes", type=int, default=32,
                      help="keyframes attending jointly; longer videos run their keyframes in groups (bounds memory)")
    edit.add_argument("--controlnet", default=None, choices=("canny",), help="extra conditioning (SD only)")
    edit.add_argument("--controlnet-model", default=None,
                      help="ControlNet folder (default: the model folder's controlnet/ subfolder)")
    edit.add_argument("--controlnet-scale", type=float, default=1.0, help="ControlNet weight")
    edit.add_argument("--out", default=None, help="output video (.mp4, .gif or a folder; default: VIDEO_edit.mp4)")
    edit.add_argument("--side-by-side", default=None, metavar="FILE", help="also write source | edit")
    edit.add_argument("--reconstruct", action="store_true",
                      help="also write the inversion's reconstruction (OUT_reconstruction.mp4)")
    edit.set_defaults(func=run_edit)

    inv = subparsers.add_parser("invert", help="invert a video into cached latents and write its reconstruction",
                                description="Invert a video (cached for later edits) and write the reconstruction.")
    _add_common(inv)
    inv.add_argument("--out", default=None, help="reconstruction video (default: VIDEO_reconstruction.mp4)")
    inv.add_argument("--no-reconstruction", action="store_true", help="only fill the cache")
    inv.set_defaults(func=run_invert)


def _controlnet_ref(args) -> str | None:
    if args.controlnet is None:
        return None
    if args.controlnet_model is not None:
        return args.controlnet_model
    from ..hub import resolve_model_path

    folder = resolve_model_path(args.model) / "controlnet"
    if not folder.is_dir():
        raise InputError(f"--controlnet canny needs --controlnet-model (no controlnet/ folder in {folder.parent})")
    return str(folder)


def _check_options(args) -> None:
    """Judge the options `edit` and `invert` share before any file is read or model loaded."""
    from ..hub import check_variant
    from ..tokenflow.inversion import default_cache_dir
    from ..utils import check_folder_writable
    from ..video import check_fps, check_selection

    for name in ("inversion_steps", "inversion_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_selection(args.frames, args.start, args.stride)
    check_variant(args.variant)
    if args.fps is not None:
        check_fps(args.fps, "--fps")
    if args.size is not None:
        from ..tokenflow.backbones import frame_multiple
        from ..video import MAX_SIDE

        # The model's multiple is the real lower bound (each side is cropped down to it), read from its
        # configs so that a size it refuses fails here, with the same bounds, not after it has loaded.
        low = frame_multiple(args.model) or 8
        if not low <= args.size <= MAX_SIDE:
            raise InputError(f"--size must be in [{low}, {MAX_SIDE}] pixels (the longer side; at least this "
                             f"model's multiple of {low}), got {args.size}")
    cache = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
    check_folder_writable(cache, f"the inversion cache into {str(cache)!r} (--cache-dir)")


def _read(args):
    """Read the frames before any model loads, so bad input fails fast."""
    from ..video import read_video

    _check_options(args)
    return read_video(args.video, frames=args.frames, start=args.start, stride=args.stride, fps=args.fps)


def _targets(args, suffix: str, extra: tuple[tuple[str, str | None], ...] = (),
             reconstruction: bool = False) -> Path:
    """The output path (default: beside the video), checked with every extra output before any work.

    `extra` holds (flag, path or None) pairs. With `reconstruction`, the reconstruction beside the output (OUT_reconstruction.mp4) is one more
    output. Two outputs at one path, or one inside a frame folder another replaces, are refused.
    """
    from ..video import check_video_target

    target = Path(args.out) if args.out else _default_out(args.video, suffix)
    outputs = {"--out": target}
    if reconstruction:
        outputs["the reconstruction"] = _reconstruction_path(target)
    outputs.update({flag: Path(path) for flag, path in extra if path is not None})
    for path in outputs.values():
        check_video_target(path)
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        where = path.resolve()
        for other, other_flag in seen.items():
            if where == other:
                raise InputError(f"{flag} and {other_flag} both write {str(path)!r}; give each output its own path")
            # A frame folder (no suffix) is replaced as a whole, so nothing else may be written inside it.
            for outer, inner in ((where, other), (other, where)):
                if not outer.suffix and outer in inner.parents:
                    raise InputError(f"{flag} and {other_flag}: {str(inner)!r} lies inside the frame folder "
                                     f"{str(outer)!r}, which is written as a whole; give each output its own place")
        seen[where] = flag
    return target


def _reconstruction_path(target: Path) -> Path:
    return target.with_name(f"{target.stem}_reconstruction.mp4")


def _pipeline(args, controlnet: str | None = None):
    from ..pipelines.video_edit import VideoEditPipeline

    if args.quiet:
        # Loading bars of transformers / diffusers would break the one-line output of --quiet.
        for name in ("transformers", "diffusers"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name).utils.logging.disable_progress_bar()
    return VideoEditPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                             controlnet=controlnet, cache_dir=args.cache_dir, variant=args.variant)


def _default_out(video: str, suffix: str) -> Path:
    # Resolved first: a frame folder given as "." or ".." has no name of its own to build on.
    p = Path(video).resolve()
    return p.with_name(f"{p.stem if p.is_file() else p.name}{suffix}.mp4")


def run_edit(args) -> int:
    """The `edit` subcommand."""
    from ..pipelines.video_edit import VideoEditPipeline
    from ..video import side_by_side, write_video

    knobs = dict(
        source_prompt=args.source_prompt, negative_prompt=args.negative, mode=args.mode,
        steps=args.steps, guidance_scale=args.cfg,
        pnp_feature=args.pnp_feature, pnp_attention=args.pnp_attn, cross_attention=args.cross_attn,
        cross_reweight=args.cross_reweight, propagation=args.propagation,
        output_propagation=args.output_propagation,
        output_propagation_steps=args.output_propagation_steps,
        output_correspondence=args.output_correspondence, local_blend=args.local_blend,
        paste_source=args.paste_source, strength=args.strength, batch_size=args.batch_size, seed=args.seed,
        correspondence=args.correspondence, max_keyframes=args.max_keyframes,
        control_scale=args.controlnet_scale if args.controlnet else None,
    )
    VideoEditPipeline.settings(args.prompt, **knobs)  # every edit flag, before any file or model is read
    target = _targets(args, "_edit", (("--side-by-side", args.side_by_side),), reconstruction=args.reconstruct)
    clip = _read(args)
    pipe = _pipeline(args, _controlnet_ref(args))
    out = pipe(clip, args.prompt, **knobs, inversion_steps=args.inversion_steps,
               inversion_batch_size=args.inversion_batch_size, size=args.size, reconstruct=args.reconstruct,
               progress=not args.quiet)
    fps = out.fps
    write_video(target, out.frames, fps)
    inv = out.inversion
    print(f"{'reused' if inv.reused else 'cached'} inversion: {inv.cache.folder}")
    if inv.reconstruction is not None:
        recon = _reconstruction_path(target)
        write_video(recon, inv.reconstruction, fps)
        print(f"wrote {recon}")
    if args.side_by_side:
        write_video(args.side_by_side, side_by_side(out.source, out.frames), fps)
        print(f"wrote {args.side_by_side}")
    print(f"wrote {target} ({len(out.frames)} frames, {out.frames.shape[2]}x{out.frames.shape[1]})")
    return 0


def run_invert(args) -> int:
    """The `invert` subcommand."""
    from ..video import write_video

    for name in ("steps", "batch_size"):  # `edit` checks these with the other edit flags
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    target = None if args.no_reconstruction else _targets(args, "_reconstruction")
    source = _read(args)
    pipe = _pipeline(args)
    clip = pipe.prepare(source, size=args.size)
    result = pipe.invert(clip, args.source_prompt, args.steps, args.inversion_steps,
                         args.inversion_batch_size or args.batch_size,
                         reconstruct=not args.no_reconstruction, progress=not args.quiet)
    print(f"{'reused' if result.reused else 'cached'} inversion: {result.cache.folder}")
    if result.reconstruction is not None and target is not None:
        write_video(target, result.reconstruction, clip.fps)
        print(f"wrote {target}")
    return 0
