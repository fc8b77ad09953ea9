"""`sanaflow quantize REF --mode int8|fp8 --out DIR`: write a quantized copy of a SANA model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, InputError
from ..utils import check_folder_writable

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `quantize` subcommand."""
    p = sub.add_parser(
        "quantize", help="quantize a SANA transformer (int8 weight-only, or fp8 for Hopper GPUs)",
        description="Write a copy of a SANA model whose transformer is quantized. REF may be a pipeline folder "
                    "(model_index.json: the other components are copied unchanged) or a transformer folder. "
                    "The result loads with the usual commands (--model DIR).",
    )
    p.add_argument("model", help="model folder, built-in name or hub repo id")
    p.add_argument("--mode", required=True, help="int8 (weight-only; CPU and GPU) or fp8 (H100/H200-class GPUs)")
    p.add_argument("--out", required=True, help="output folder (written atomically): a new or empty folder, or a "
                                              "model folder to replace; never the source model or a folder "
                                              "holding it")
    p.add_argument("--device", default=None, help="where to quantize: cpu, cuda, cuda:N (default: cuda for fp8, "
                                                  "else cuda when available)")
    p.add_argument("--dtype", default=None, help="dtype of the layers kept in high precision: float32, bfloat16 or "
                                                 "float16 (default: bfloat16 for fp8, else float32)")
    p.add_argument("--variant", default=None, help="read the transformer's variant weight files, e.g. fp16 or bf16, "
                                                   "where the model has them (default: its default weights)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Load REF, quantize its transformer and save it (with the rest of the pipeline) to --out."""
    import torch  # here, not at module level: the CLI imports every command module at start

    from ..hub import check_variant, component_variant, resolve_model_path
    from ..models.sana_transformer import SanaTransformer
    from ..quant import (
        check_mode,
        copy_pipeline_with_quantized_transformer,
        fp8_supported,
        quantize_transformer,
        save_quantized,
    )

    check_mode(args.mode)
    variant = check_variant(args.variant)
    name = args.dtype or ("bfloat16" if args.mode == "fp8" else "float32")
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; choose from: {', '.join(DTYPES)}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    if args.mode == "fp8" and not fp8_supported(device):
        raise InputError(f"--mode fp8 needs a CUDA GPU with FP8 tensor cores (H100/H200, L40S, RTX 40xx); "
                         f"device {device} has none. Use --mode int8, or run this on such a GPU")
    out = check_out_folder(args.out, args.model)  # before resolving REF, which may download it
    root = resolve_model_path(args.model, variant=variant)
    check_out_not_source(args.out, out, root)  # before loading and quantizing
    is_pipeline = (root / "model_index.json").is_file()
    subfolder = "transformer" if is_pipeline else None
    variant = component_variant(root / subfolder if subfolder else root, variant)
    transformer = SanaTransformer.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype, device=device,
                                                  variant=variant)
    quantize_transformer(transformer, args.mode)  # fp8 off a suitable GPU -> SanaflowError
    if is_pipeline:
        copy_pipeline_with_quantized_transformer(root, out, transformer)
    else:
        save_quantized(transformer, out)
    print(f"wrote {args.mode} model to {args.out}", file=sys.stderr)
    return 0


# Files that mark a folder as a model folder (pipeline or single component), which --out may replace.
MODEL_MARKERS = ("model_index.json", "config.json")
# Files a model folder may hold beside its weights and configs (hub downloads add these).
_MODEL_EXTRAS = ("README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", ".gitattributes")
_MODEL_SUFFIXES = (".safetensors", ".json")  # weights, configs and shard maps
_COMPONENT_SUFFIXES = (*_MODEL_SUFFIXES, ".txt", ".model")  # and, inside components, vocabularies


def _is_model_folder(folder: Path, depth: int = 0) -> bool:
    """A folder that holds a model and nothing else (so replacing it loses no user file).

    It has a marker (model_index.json or config.json); each file is a weights / config / tokenizer
    file or a hub extra, and each subfolder is a component named in model_index.json (itself such a
    folder, or a tokenizer / scheduler folder of configs and vocabularies).
    """
    import json

    if depth == 0 and not any((folder / name).is_file() for name in MODEL_MARKERS):
        return False
    components: set[str] = set()
    index = folder / "model_index.json"
    if depth == 0 and index.is_file():
        try:
            components = {k for k in json.loads(index.read_text()) if not k.startswith("_")}
        except (OSError, ValueError, AttributeError):
            return False
    for entry in folder.iterdir():
        if entry.is_dir():
            if entry.name not in components or not _is_model_folder(entry, depth + 1):
                return False
        elif entry.name not in _MODEL_EXTRAS and entry.suffix not in (_COMPONENT_SUFFIXES if depth else _MODEL_SUFFIXES):
            return False
    return True


def check_out_folder(out_arg: str, model_ref: str | None = None) -> Path:
    """Check --out before any work; return it as an absolute, resolved path.

    The output replaces whatever folder is at --out in one rename (`sanaflow.utils.atomic_path`), so
    only a new path, an empty folder or an earlier model folder holding nothing else (`_is_model_folder`)
    is accepted; a file, a folder holding other things, or a path under a file is refused. When
    `model_ref` is a local folder, --out must also keep clear of it (see `check_out_not_source`).
    """
    if not str(out_arg).strip():
        raise InputError("--out is empty; give the folder to write the quantized model to (a new folder)")
    out = Path(out_arg).expanduser().resolve()
    if model_ref is not None and Path(model_ref).expanduser().is_dir():
        check_out_not_source(out_arg, out, Path(model_ref).expanduser())
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out_arg)!r} is an existing file; give a folder to write the quantized "
                         "model to (a new or empty folder, or an earlier model folder to replace)")
    if out.is_dir() and any(out.iterdir()) and not _is_model_folder(out):
        raise InputError(f"--out {str(out_arg)!r} is a folder holding other files and no model "
                         f"(a model folder holds {' or '.join(MODEL_MARKERS)}, weights and configs only); the "
                         "quantized model replaces the whole folder, so "
                         "choose a new or empty folder, or a model folder to replace")
    check_folder_writable(out.parent, f"--out {str(out_arg)!r}")
    return out


def check_out_not_source(out_arg: str, out: Path, root: Path) -> None:
    """Refuse an --out that is the source model folder, lies inside it, or holds it."""
    src = Path(root).resolve()
    if out == src:
        raise InputError(f"--out {str(out_arg)!r} is the source model folder {str(root)!r}; "
                         "write the quantized copy to another folder")
    if src in out.parents:
        raise InputError(f"--out {str(out_arg)!r} is inside the source model folder {str(root)!r}; "
                         "choose a folder outside it")
    if out in src.parents:
        raise InputError(f"--out {str(out_arg)!r} holds the source model folder {str(root)!r} and would be "
                         "replaced by the quantized copy; choose a folder outside it")
