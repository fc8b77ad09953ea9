"""`sanaflow generate` (prompts -> PNGs with metadata) and `sanaflow info` (what a model folder holds)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, SanaflowError, unknown_choice
from ..utils import IMAGE_SUFFIXES, SEED_MAX, check_folder_writable, dumps_json

MAX_SIDE = 4096


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `generate` and `info` subcommands."""
    p = sub.add_parser("generate", help="generate images from text prompts",
                       description="Generate images from text prompts (default model: the embedded shapes model).")
    p.add_argument("prompt", nargs="*", help="one or more prompts (quote each)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--config", default="generate", help="a generate YAML config (path or shipped name; default 'generate')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sampling.steps=30 (repeatable)")
    p.add_argument("--model", default=None, help="model folder, built-in name or hub repo id (default: embedded)")
    p.add_argument("--variant", default=None,
                   help="weight-file variant to read where the model has it, e.g. fp16 or bf16 (the official "
                        "repos' half-size files; default: the default weights)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 32 (default: the model's native size)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--pag", type=float, default=None, help="perturbed-attention guidance scale (default 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image k uses seed+k (default: random)")
    p.add_argument("-n", "--num-images", type=int, default=None, help="images per prompt (default 1)")
    p.add_argument("--sampler", default=None, help="dpm++2m (default) or euler; Sprint models always use scm")
    p.add_argument("--out", default=None,
                   help="output folder (default ./outputs), or a .png file name when the run makes one image")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    # store_true with default None: an absent flag leaves the config's value alone.
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the transformer (faster steps; the first image at each size compiles)")
    p.add_argument("--compile-regional", action="store_true", default=None,
                   help="torch.compile one transformer block graph that all blocks reuse: seconds to compile "
                        "instead of a minute (best with --cuda-graphs)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay each sampling step from a captured CUDA graph (CUDA only)")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="quantize the transformer after loading: int8 (weight-only, CPU and GPU) or fp8 "
                        "(H100-class GPUs); `sanaflow quantize` saves a quantized model instead")
    p.add_argument("--offload", action="store_true", default=None,
                   help="keep the text encoder on the CPU except while encoding (less GPU memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_generate)

    i = sub.add_parser("info", help="print a model's config, parameter counts and dtype")
    i.add_argument("model", nargs="?", default=None, help="model folder, built-in name or hub repo id (default: embedded)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=run_info)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'WxH' -> (width, height), validated: multiples of 32, at most MAX_SIDE."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 1024x768")
    w, h = int(m.group(1)), int(m.group(2))
    from ..pipelines.resolution import check_size

    check_size(h, w, 32, MAX_SIDE)
    return w, h


def read_prompts(args: argparse.Namespace, configured: list[str]) -> list[str]:
    """Prompts from the command line, the prompts file and the config; each must be non-empty."""
    prompts = list(args.prompt) + list(configured)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read prompts file {args.prompts_file}: {e}") from e
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError("no prompt given; pass a prompt or --prompts-file")
    for p in prompts:
        if not p.strip():
            raise InputError("empty prompt; describe the image you want")
    return prompts


def check_sampler(name: str) -> str:
    """`--sampler NAME`, if it is a flow-matching sampler or scm (judged by the model once it loads).

    An unknown name lists the samplers every model takes: a flow model refuses scm, and a SANA-Sprint
    model samples with scm whatever is asked, so listing scm would offer a choice that fails.
    """
    from .. import sampling

    if name not in sampling.SAMPLERS:
        flow = [n for n in sampling.SAMPLERS if n != "scm"]
        raise ConfigError(f"{unknown_choice('--sampler', name, flow)}; SANA-Sprint models always use scm")
    return name


# CLI flag -> dotted key of GenerateConfig (flags win over --config and --set).
FLAG_KEYS = {"model": "model", "variant": "variant", "negative": "negative_prompt", "steps": "sampling.steps",
             "cfg": "sampling.guidance_scale", "pag": "sampling.pag_scale", "seed": "sampling.seed",
             "num_images": "num_images_per_prompt", "sampler": "sampling.sampler", "out": "output_dir",
             "device": "device", "dtype": "dtype", "compile": "compile", "compile_regional": "compile_regional",
             "cuda_graphs": "cuda_graphs",
             "offload": "offload_text_encoder", "quantize": "quantize"}


def resolve_config(args: argparse.Namespace):
    """The GenerateConfig of this run: the YAML config, then --set overrides, then explicit flags."""
    import yaml

    from ..config import GenerateConfig, load_config

    overrides = list(args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    size = parse_size(args.size)
    if size is not None:
        overrides += [f"width={size[0]}", f"height={size[1]}"]
    cfg = load_config(args.config, GenerateConfig, overrides)
    if cfg.width is not None or cfg.height is not None:
        from ..pipelines.resolution import check_size

        # A side left out is checked as a valid 32, so the message names the side that was given.
        check_size(32 if cfg.height is None else cfg.height, 32 if cfg.width is None else cfg.width, 32, MAX_SIDE)
    return cfg


# --out names with these suffixes are image files, not folders (only .png is written).
OUT_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".gif")


def single_output_file(out: Path, count: int) -> Path | None:
    """`out` when it names one PNG file for a one-image run; None when it is a folder.

    A name with another image suffix, or a .png name for a run of several images, is an error.
    """
    suffix = out.suffix.lower()
    if suffix not in OUT_IMAGE_SUFFIXES or out.is_dir():  # an existing folder stays a folder, whatever its name
        return None
    if suffix != ".png":
        raise InputError(f"--out {out}: images are written as PNG (with their settings in the metadata); "
                         f"name a .png file or a folder")
    if count != 1:
        raise InputError(f"--out {out} names one file, but this run makes {count} images; name a folder")
    return out


def check_writable(folder: Path) -> None:
    """Make sure files can be written into `folder`, before any work is done, without creating it.

    A missing folder is made when the first image is written, so a run that fails before then
    (a bad model, an unknown device) leaves no empty folder behind.
    """
    check_folder_writable(folder, f"to output folder {folder}")


def slug(text: str, n: int = 40) -> str:
    """A short filename-safe form of a prompt."""
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "image"


def png_metadata(meta: dict[str, Any]):
    """PNG text chunks: one per field, plus a JSON 'sanaflow' chunk and an A1111-style 'parameters' line."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    info.add_text("sanaflow", json.dumps(meta))
    info.add_text("parameters", f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\n"
                                f"Steps: {meta['steps']}, Sampler: {meta['sampler']}, CFG scale: {meta['guidance_scale']}, "
                                f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['model']}")
    return info


def _show_progress_logs() -> None:
    """Print sanaflow's info logs (compile and CUDA-graph capture times) on stderr, once."""
    import logging

    log = logging.getLogger("sanaflow")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sanaflow: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def run_generate(args: argparse.Namespace) -> int:
    """Generate images for every prompt and write PNGs (atomically) with their settings."""
    import dataclasses
    import random

    from tqdm import tqdm

    from .. import __version__, sampling
    from ..config import dump_config
    from ..pipelines import load_pipeline
    from ..utils import atomic_path

    # Validate everything cheap before loading a model.
    if args.sampler is not None:
        check_sampler(args.sampler)
    cfg = resolve_config(args)
    prompts = read_prompts(args, cfg.prompts)
    sc = cfg.sampling
    if sc.sampler not in sampling.SAMPLERS:
        raise unknown_choice("sampler", sc.sampler, sampling.SAMPLERS)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if sc.steps > 1000:
        raise InputError(f"steps {sc.steps} is above the limit of 1000")
    if cfg.cuda_graphs or cfg.quantize is not None:
        from ..pipelines.components import pick_device

        device = pick_device(cfg.device)
        if cfg.cuda_graphs and device.type != "cuda":
            raise InputError(f"--cuda-graphs needs a CUDA device; this run uses {device}")
        if cfg.quantize is not None:
            from ..quant import check_quantization

            check_quantization(cfg.quantize, device)  # before any model loads
    if not str(cfg.output_dir).strip():
        raise InputError("--out is empty; name an output folder or a .png file")
    out_dir = Path(cfg.output_dir)
    n = cfg.num_images_per_prompt
    out_file = single_output_file(out_dir, len(prompts) * n)
    if out_file is not None:
        out_dir = out_file.parent
    check_writable(out_dir)
    if sc.seed is not None and sc.seed + len(prompts) * n - 1 > SEED_MAX:  # image k uses seed + k
        raise InputError(f"--seed {sc.seed} + {len(prompts) * n} images runs past the largest seed {SEED_MAX}; "
                         f"use a seed of at most {SEED_MAX - len(prompts) * n + 1}")

    if cfg.compile or cfg.compile_regional or cfg.cuda_graphs or cfg.offload_text_encoder:
        _show_progress_logs()
    pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, variant=cfg.variant,
                         offload_text_encoder=cfg.offload_text_encoder, cuda_graphs=cfg.cuda_graphs,
                         compile_regional=cfg.compile_regional, quantize=cfg.quantize)
    width = cfg.width or pipe.native_size
    height = cfg.height or pipe.native_size
    seed = sc.seed if sc.seed is not None else random.randrange(2**31 - 1)
    jobs = [(p, seed + k * n + j) for k, p in enumerate(prompts) for j in range(n)]
    sampler_name = "scm" if pipe.is_sprint else sc.sampler
    written = []
    bar = tqdm(total=len(jobs), desc="images", unit="img", file=sys.stderr, disable=args.quiet)
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        out = pipe([p for p, _ in chunk], negative_prompt=cfg.negative_prompt, height=height, width=width,
                   num_inference_steps=sc.steps, guidance_scale=sc.guidance_scale, pag_scale=sc.pag_scale,
                   pag_layers=sc.pag_layers, flow_shift=sc.flow_shift, seed=[s for _, s in chunk],
                   sampler=sampler_name, output_type="pil", use_resolution_binning=cfg.use_resolution_binning,
                   progress=not args.quiet)  # a bar over each batch's steps, as `edit` shows its bars
        for (p, s), img in zip(chunk, out.images):
            meta = {"prompt": p, "negative_prompt": cfg.negative_prompt, "seed": s, "steps": sc.steps,
                    "guidance_scale": sc.guidance_scale, "pag_scale": sc.pag_scale, "sampler": sampler_name,
                    "model": pipe.name, "width": width, "height": height, "sanaflow_version": __version__}
            path = out_file or out_dir / f"{len(written):04d}-{slug(p)}-{s}.png"
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG", pnginfo=png_metadata(meta))
            written.append(path)
            bar.update(1)
    bar.close()
    resolved = dataclasses.replace(cfg, prompts=prompts, width=width, height=height, model=pipe.name,
                                   sampling=dataclasses.replace(sc, seed=seed, sampler=sampler_name))
    if out_file is None:  # a folder run records its settings; a single file carries them in its metadata
        dump_config(resolved, out_dir / "config.yaml")
    for p in written:
        print(p)
    return 0


def _weights_summary(folder: Path) -> dict[str, Any]:
    """Parameter count and dtypes of a model folder, read from safetensors headers (no tensors loaded)."""
    from safetensors import safe_open

    from ..hub import find_weight_files

    count, dtypes = 0, set()
    for f in find_weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    count += n
                    dtypes.add(sl.get_dtype())
        except Exception as e:
            raise SanaflowError(f"cannot read weights file {f}: {e}") from e
    return {"parameters": count, "dtype": ",".join(sorted(dtypes))}


def _model_class(part: str | None, class_name: Any):
    """Our class for a component folder (by its part name or config.json's _class_name), or None."""
    from ..models.dc_ae import DCAE
    from ..models.sana_transformer import SanaTransformer

    if part == "transformer" or class_name == SanaTransformer.diffusers_class_name:
        return SanaTransformer
    if part == "vae" or class_name == DCAE.diffusers_class_name:
        return DCAE
    return None


def run_info(args: argparse.Namespace) -> int:
    """Print each component's config, parameter count and stored dtype."""
    from ..hub import read_json, resolve_model_path

    root = resolve_model_path(args.model)
    report: dict[str, Any] = {"model": args.model or "embedded default", "path": str(root)}
    index_path = root / "model_index.json"
    parts = ["transformer", "vae"] if index_path.is_file() else [None]
    if index_path.is_file():
        index = read_json(index_path)
        report["pipeline"] = index.get("_class_name")
        from ..pipelines.components import index_entry

        for key in ("transformer", "vae", "text_encoder", "scheduler"):
            index_entry(index, key)  # each named as loading takes it: [library, class]
        report["text_encoder"] = index.get("text_encoder")
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            report["scheduler"] = read_json(sched)
    for part in parts:
        folder = root / part if part else root
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} has no config.json; is it a diffusers-format model folder?")
        raw = read_json(folder / "config.json")
        model_cls = _model_class(part, raw.get("_class_name"))
        if model_cls is not None:  # the checks from_pretrained makes: unknown keys, types, signs
            model_cls.validate_config(raw, source=str(folder / "config.json"))
        entry = {"config": {k: v for k, v in raw.items() if not k.startswith("_")}}
        entry.update(_weights_summary(folder))
        report[part or "component"] = entry
    if args.json:
        print(dumps_json(report, indent=2))
        return 0
    print(f"model: {report['model']}  ({report['path']})")
    for key in ("pipeline", "text_encoder"):
        if report.get(key):
            print(f"{key}: {report[key]}")
    for part in parts:
        entry = report[part or "component"]
        print(f"[{part or 'component'}] {entry['parameters'] / 1e6:.2f} M parameters, dtype {entry['dtype']}")
        for k, v in entry["config"].items():
            print(f"  {k}: {v}")
    if "scheduler" in report:
        print(f"[scheduler] {report['scheduler'].get('_class_name')}")
    return 0
