"""Shapes-world evaluation of text-to-image models and DC-AEs (during training and of a finished model).

`evaluate_model` is the committed quality check of the embedded model:

    python -m sanaflow.training.evaluate --model src/sanaflow/assets/shapes-tiny --n 300 \
        --out benchmarks/results/embedded_quality.json

It draws `n` evaluation prompts (``sanaflow.shapes.eval_prompts``, eval split, held-out combinations
included), generates one image per prompt (seed = index), scores each with the shapes detector and
writes per-category accuracy, overall, held-out accuracy, and the DC-AE reconstruction PSNR on
held-out scenes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_path, atomic_write_text, dumps_json

EVAL_IMAGE_SEED = 10_000  # generation seeds are EVAL_IMAGE_SEED + prompt index


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    """Write uint8 images (B, H, W, 3) as one PNG grid (atomic)."""
    from PIL import Image

    b, h, w, _ = images.shape
    cols = min(cols, b)
    rows = (b + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def make_pipeline(transformer, vae, text_encoder, flow_shift: float, device: torch.device):
    """A TextToImagePipeline around in-memory parts (the same sampling path as a loaded model)."""
    from ..pipelines.components import SanaComponents
    from ..pipelines.text_to_image import TextToImagePipeline
    from .tasks import scheduler_config

    parts = SanaComponents(transformer, vae, text_encoder, scheduler_config(flow_shift), "training-eval")
    return TextToImagePipeline(parts, device)


def generate_and_score(pipe, prompts, steps: int, guidance: float, batch: int = 16,
                       size: int | None = None, sampler: str = "dpm++2m") -> tuple[np.ndarray, list[dict]]:
    """Generate one image per eval prompt (seed EVAL_IMAGE_SEED + index) and score it; (images, results)."""
    from ..shapes.detect import score

    images, results = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = pipe([p.caption for p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   seed=[EVAL_IMAGE_SEED + start + i for i in range(len(chunk))], output_type="np",
                   height=size, width=size, use_resolution_binning=False, sampler=sampler)
        ims = np.asarray(out.images)
        if ims.dtype != np.uint8:
            ims = (np.clip(ims, 0, 1) * 255).round().astype(np.uint8)
        for p, im in zip(chunk, ims):
            results.append({**score(im, p.scene), "caption": p.caption, "held_out": p.held_out})
        images.append(ims)
    return np.concatenate(images), results


def summary_scalars(summary: dict) -> dict[str, float]:
    """Flatten a shapes `summarize` output into eval/* scalars."""
    out = {"eval/overall": summary["overall"]}
    for cat, v in summary["categories"].items():
        out[f"eval/{cat}"] = v["accuracy"]
    if "held_out" in summary:
        out["eval/held_out"] = summary["held_out"]["accuracy"]
    return out


@torch.no_grad()
def evaluate_t2i_training(ema_net, vae, text_encoder, cfg, step: int, out: Path) -> dict[str, float]:
    """Periodic evaluation of the EMA transformer: a grid PNG and the shapes score on fixed prompts."""
    from ..shapes.detect import summarize
    from ..shapes.scene import eval_prompts

    device = next(ema_net.parameters()).device
    vae.to(device)
    text_encoder.to(device)
    was_training = ema_net.training
    ema_net.eval()
    pipe = make_pipeline(ema_net, vae, text_encoder, cfg.eval.flow_shift, device)
    prompts = eval_prompts(cfg.eval.num_prompts, seed=cfg.eval.seed)
    images, results = generate_and_score(pipe, prompts, cfg.eval.steps, cfg.eval.guidance_scale,
                                         size=cfg.data.resolution, sampler=cfg.eval.sampler)
    ema_net.train(was_training)
    save_grid(images[:32], out / "samples" / f"step_{step:07d}.png")
    summary = summarize(results, [r["held_out"] for r in results])
    return summary_scalars(summary)


def held_out_scenes(n: int, seed: int = 0) -> list:
    """`n` eval-split scenes (never drawn in training) for reconstruction checks."""
    from ..shapes.scene import derive_seed, sample_scene

    return [sample_scene(derive_seed(seed, 777, i), "eval") for i in range(n)]


@torch.no_grad()
def reconstruction_psnr(vae, n: int, resolution: int, device: torch.device, seed: int = 0,
                        batch: int = 16) -> tuple[float, float, np.ndarray]:
    """Mean PSNR (dB) of the DC-AE on `n` held-out scenes, the latent std, and a few (orig, recon) pairs."""
    from ..shapes.render import render
    from .losses import psnr

    scenes = held_out_scenes(n, seed)
    values, stds, pairs = [], [], []
    for start in range(0, n, batch):
        ims = np.stack([render(s, resolution) for s in scenes[start:start + batch]])  # (B, H, W, 3)
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
        z = vae.encode(x.to(vae.dtype), tiling=False)
        rec = vae.decode(z, tiling=False).float().clamp(-1, 1)
        # PSNR of the 8-bit images a user gets.
        rec8 = ((rec + 1) * 127.5).round() / 127.5 - 1
        values.append(psnr(rec8, x).cpu())
        stds.append(z.float().std().item())
        if not pairs:
            r = ((rec8[:8] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
            pairs = [ims[:8], r]
    return float(torch.cat(values).mean()), float(np.mean(stds)), np.concatenate(pairs)


def evaluate_dcae_training(ema_net, cfg, step: int, out: Path) -> dict[str, float]:
    """Periodic evaluation of the EMA DC-AE: held-out PSNR, latent std and a recon grid PNG."""
    device = next(ema_net.parameters()).device
    value, std, grid = reconstruction_psnr(ema_net, cfg.eval.num_images, cfg.data.resolution, device)
    save_grid(grid, out / "samples" / f"recon_{step:07d}.png")
    return {"eval/psnr": value, "eval/latent_std": std}


def evaluate_model(model: str | None, n: int = 300, seed: int = 0, steps: int = 20,
                   guidance: float | None = None, n_recon: int = 500, device: str | None = None,
                   batch: int = 16, grid: str | None = None) -> dict[str, Any]:
    """Shapes score and DC-AE PSNR of a saved model folder (None = the embedded model)."""
    from ..pipelines.text_to_image import load_pipeline
    from ..shapes.detect import summarize
    from ..shapes.scene import eval_prompts

    t0 = time.time()
    pipe = load_pipeline(model, device=device)
    guidance = 4.5 if guidance is None else guidance
    prompts = eval_prompts(n, seed=seed)
    images, results = generate_and_score(pipe, prompts, steps, guidance, batch=batch, size=pipe.native_size)
    summary = summarize(results, [r["held_out"] for r in results])
    psnr_value = (reconstruction_psnr(pipe.vae, n_recon, pipe.native_size, pipe.device, seed=seed)[0]
                  if n_recon > 0 else None)  # --n-recon 0: scores only
    if grid:
        save_grid(images[:48], Path(grid))
    failures = [r for r in results if not r["correct"]]
    return {
        "model": str(model) if model else "embedded default (sanaflow/shapes-tiny)",
        "prompts": n, "prompt_seed": seed, "steps": steps, "guidance_scale": guidance,
        "image_seeds": f"{EVAL_IMAGE_SEED} + prompt index", "resolution": pipe.native_size,
        "shapes_score": summary, "dcae_psnr_db": psnr_value, "dcae_scenes": n_recon,
        "failures_sample": [{"caption": r["caption"], "reason": r["reason"]} for r in failures[:20]],
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: evaluate a model folder on the shapes world and write JSON."""
    p = argparse.ArgumentParser(prog="python -m sanaflow.training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--n-recon", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--grid", default=None, help="also write a PNG grid of the first 48 images")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    result = evaluate_model(args.model, args.n, args.seed, args.steps, args.guidance, args.n_recon, args.device,
                            args.batch, args.grid)
    result["command"] = "python -m sanaflow.training.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    from ..shapes.detect import format_table

    print(format_table(result["shapes_score"]))
    if result["dcae_psnr_db"] is not None:
        print(f"dcae psnr {result['dcae_psnr_db']:.2f} dB on {result['dcae_scenes']} held-out scenes")
    if args.out:
        atomic_write_text(args.out, dumps_json(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def sweep(transformer: str, vae: str, text_encoder: str, n: int = 120, shifts=(3.0,), guidances=(4.5,),
          steps: int = 20, text_max_length: int = 32, device: str | None = None) -> list[dict[str, Any]]:
    """Shapes score of loose parts (no model_index.json) over flow shifts and guidance scales."""
    from ..models import DCAE, SanaTransformer
    from ..models.text_encoders import SentenceTextEncoder
    from ..shapes.detect import summarize
    from ..shapes.scene import eval_prompts
    from .export import _model_folder

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = SanaTransformer.from_pretrained(_model_folder(Path(transformer)), device=dev)
    ae = DCAE.from_pretrained(_model_folder(Path(vae)), device=dev)
    te = SentenceTextEncoder.from_pretrained(text_encoder, max_length=text_max_length, device=dev)
    prompts = eval_prompts(n, seed=0)
    rows = []
    for shift in shifts:
        for g in guidances:
            pipe = make_pipeline(net, ae, te, shift, dev)
            _, results = generate_and_score(pipe, prompts, steps, g, batch=60, size=256)
            s = summarize(results, [r["held_out"] for r in results])
            rows.append({"flow_shift": shift, "guidance": g, **summary_scalars(s)})
            print(dumps_json(rows[-1]), flush=True)
    return rows
