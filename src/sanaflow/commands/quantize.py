"""`sanaflow quantize REF --mode int8|fp8 --out DIR`: write a quantized copy of a SANA model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, InputError

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
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--device", default=None, help="where to quantize: cpu, cuda, cuda:N (default: cuda for fp8, "
                                                  "else cuda when available)")
    p.add_argument("--dtype", default=None, help="dtype of the layers kept in high precision: float32, bfloat16 or "
                                                 "float16 (default: bfloat16 for fp8, else float32)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Load REF, quantize its transformer and save it (with the rest of the pipeline) to --out."""
    import torch  # here, not at module level: the CLI imports every command module at start

    from ..hub import resolve_model_path
    from ..models.sana_transformer import SanaTransformer
    from ..quant import (
        check_mode,
        copy_pipeline_with_quantized_transformer,
        fp8_supported,
        quantize_transformer,
        save_quantized,
    )

    check_mode(args.mode)
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
    root = resolve_model_path(args.model)
    src = root.resolve()
    out = args.out.resolve()
    if out == src or src in out.parents:
        raise InputError(f"--out {args.out} is inside the source model folder {root}; choose another folder")
    is_pipeline = (root / "model_index.json").is_file()
    subfolder = "transformer" if is_pipeline else None
    transformer = SanaTransformer.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype, device=device)
    quantize_transformer(transformer, args.mode)  # fp8 off a suitable GPU -> SanaflowError
    if is_pipeline:
        copy_pipeline_with_quantized_transformer(root, args.out, transformer)
    else:
        save_quantized(transformer, args.out)
    print(f"wrote {args.mode} model to {args.out}", file=sys.stderr)
    return 0
