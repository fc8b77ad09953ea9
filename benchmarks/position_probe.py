#!/usr/bin/env python
"""Why does a model miss position captions? Five checks on a text-to-image model (issue 5).

1. **Failure breakdown**: generate `--n` position prompts of the evaluation world (a seed other than the
   300-prompt evaluation's) and sort each miss into "an object is missing" or "both objects are there
   but the relation is wrong"; with both objects found, a model that ignores the relation is right
   about half the time.
2. **Word-order sensitivity**: for `--pairs` position captions, generate with the caption and with its
   role-swapped twin (same words and relation, the two objects exchanged, so the layout it asks for is
   the mirror image: "a red circle above a blue square" -> "a blue square above a red circle") from the
   same seeds, and compare the mean absolute image difference with that of an unrelated caption from
   the same seeds. A model that reads the relation changes its image about as much for the swapped
   caption as for another caption (ratio near 1); a model that reads the caption as a bag of words
   barely changes it (ratio near 0).
3. **First-step layout**: the layout of an image is decided at the noisiest times, where only the
   caption can decide it. For `--layout` position captions that name two different colours, predict
   the clean image from pure noise (the schedule's first sigma, ~1: the sampler's first model call, no
   guidance) for max(`--seeds`, 8) noises, decode it and locate each named colour (colour-weighted centroid). The
   displacement of the first object from the second along the stated axis is positive when the
   prediction follows the relation; a model that ignores the relation words scores ~50 % right and a
   mean displacement ~0.
4. **Binding at moderate noise**: the layout is readable from x_t well before the colours are, so the
   caption must say which blob is which. For the same captions, the rendered scene is noised to
   sigma `--binding-sigma` (0.9) with 8 noises and the clean image is predicted once with the caption
   and once with its mirrored twin (no guidance). The relation displacement of the prediction
   (measured against the true caption) should drop, ideally below 0, under the twin; a model that
   reads the caption as a bag of words gives the same prediction for both (follows caption ~50 %).
5. **Caption sensitivity over noise**: for `--sensitivity` captions, the rendered scene noised to each of
   sigma 1.0, 0.93, 0.85, 0.7, 0.5 (`--seeds` noises): the mean absolute change of the unguided velocity
   when the caption is replaced by its mirrored twin, by the caption with the inverse relation word, and
   by the empty caption. A model that reads relations moves with the first two a good fraction of what
   it moves without any caption; session 3's model moved 0.08-0.13x at every noise level.

    python benchmarks/position_probe.py                       # embedded model, CPU, ~4 min
    python benchmarks/position_probe.py --model DIR --out probe.json
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("sanaflow") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

PROBE_SEED = 1  # evaluation prompts of another seed than the 300-prompt score's (seed 0)


def position_prompts(n: int, seed: int = PROBE_SEED) -> list:
    """The first `n` position prompts of the evaluation stream with `seed`."""
    from sanaflow.shapes.scene import eval_prompts

    out, pool = [], 6 * n + 60
    while len(out) < n:
        out = [p for p in eval_prompts(pool, seed=seed) if p.scene.category == "position"][:n]
        pool *= 2
    return out


def swapped(scene):
    """The scene with its two objects' roles exchanged: the caption names them in the other order with the
    same relation, so it asks for the mirrored layout (each object moves to the other's place)."""
    a, b = scene.objects
    return replace(scene, objects=(replace(b, x=a.x, y=a.y), replace(a, x=b.x, y=b.y)))


def _colour_centroids(images: np.ndarray, colors: list[str]) -> np.ndarray:
    """Colour-weighted centroids (x, y) in [0, 1] of each named colour in images (N, H, W, 3) in [0, 1]."""
    from sanaflow.shapes.scene import PALETTE

    h, w = images.shape[1:3]
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    out = np.zeros((len(colors), len(images), 2))
    chroma = images.max(-1) - images.min(-1)  # (N, H, W); 0 on the neutral backgrounds
    for k, c in enumerate(colors):
        ref = np.asarray(PALETTE[c], dtype=np.float64) / 255.0
        wgt = chroma * np.exp(-((images - ref) ** 2).sum(-1) / (2 * 0.12**2))  # (N, H, W)
        tot = wgt.sum((1, 2)) + 1e-9
        out[k, :, 0] = (wgt.sum(1) * xs).sum(1) / tot
        out[k, :, 1] = (wgt.sum(2) * ys).sum(1) / tot
    return out  # (colours, N, 2)


def relation_displacement(images: np.ndarray, scene) -> np.ndarray:
    """Per image (N, H, W, 3) in [0, 1]: how far the scene's first named colour sits on the stated side of
    the second, along the relation's axis (fractions of the image side; > 0 where the relation holds)."""
    a, b = scene.objects
    ca, cb = _colour_centroids(images, [a.color, b.color])  # (N, 2) each
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[scene.relation]
    return sign * (ca[:, axis] - cb[:, axis])  # (N,)


def _velocity_fn(pipe):
    """(first sigma of the schedule, velocity(x, sigma, caption) -> the unguided model output for x):
    one call through the pipeline's own model function; caption None is the unconditional (empty) one."""
    import torch

    from sanaflow import sampling

    schedule = sampling.schedule_from_scheduler_config(pipe.scheduler_config, 20)
    model = pipe._model_fn(schedule.timestep_of, None)
    features: dict[str | None, tuple] = {}  # caption -> (hidden, mask): each caption is encoded once

    @torch.no_grad()
    def velocity(x, sigma: float, caption: str | None):
        if caption not in features:
            if caption is None:
                features[None] = pipe.encode_prompts(["-"], [""])[1]
            else:
                features[caption] = pipe.encode_prompts([caption], None)[0]
        hidden, mask = features[caption]
        n = len(x)
        return model(x, torch.full((n,), sigma, device=pipe.device), hidden.expand(n, -1, -1), mask.expand(n, -1))

    return float(schedule.sigmas[0]), velocity


def _clean_estimator(pipe):
    """(first sigma of the schedule, estimate(x, sigma, caption) -> decoded clean-image estimates
    (N, H, W, 3) in [0, 1]): one unguided model call through the pipeline's own model function."""
    import torch

    from sanaflow.pipelines.text_to_image import to_output

    first, velocity = _velocity_fn(pipe)

    @torch.no_grad()
    def estimate(x, sigma: float, caption: str) -> np.ndarray:
        v = velocity(x, sigma, caption)
        return to_output(pipe.decode(x - sigma * v), "np").astype(np.float64)  # x0 = x_t - sigma v

    return first, estimate


def _noised_scene(pipe, scene, sigma: float, seeds: int, gen):
    """The rendered scene's latents noised to `sigma` with `seeds` noises: (seeds, C, h, w)."""
    import torch

    from sanaflow.shapes.render import render

    image = torch.from_numpy(render(scene, pipe.native_size)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(image.to(pipe.device)).float() * pipe.vae.config.scaling_factor  # (1, C, h, w)
        noise = torch.randn(seeds, *z.shape[1:], generator=gen).to(pipe.device)
    return (1 - sigma) * z + sigma * noise


def caption_sensitivity(pipe, prompts: list, seeds: int, sigmas=(1.0, 0.93, 0.85, 0.7, 0.5)) -> dict:
    """Check 5: how much the velocity moves, at each noise level, when the caption's two objects swap
    places (mirrored twin), when its relation word is inverted, and when the caption is dropped."""
    import torch

    from sanaflow.shapes.scene import INVERSE_RELATIONS

    _, velocity = _velocity_fn(pipe)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for sigma in sigmas:
        diffs = collections.defaultdict(list)
        for p in prompts:
            scene = replace(p.scene, mention_color=True)
            x = _noised_scene(pipe, scene, sigma, seeds, gen)
            v = velocity(x, sigma, scene.caption())
            others = {"mirrored": swapped(scene).caption(),
                      "relation_inverted": replace(scene, relation=INVERSE_RELATIONS[scene.relation]).caption(),
                      "no_caption": None}
            for name, caption in others.items():
                diffs[name].append(float((velocity(x, sigma, caption) - v).abs().mean()))
        row = {k: round(float(np.mean(d)), 5) for k, d in diffs.items()}
        row["mirrored_vs_no_caption"] = round(row["mirrored"] / row["no_caption"], 3) if row["no_caption"] else None
        out[str(sigma)] = row
    return {"captions": len(prompts), "seeds": seeds, "by_sigma": out}


def first_step_layout(pipe, prompts: list, seeds: int) -> dict:
    """Check 3: does the prediction from pure noise place the two named colours as the relation says?"""
    import torch

    sigma, estimate = _clean_estimator(pipe)
    cfg = pipe.transformer.config
    lat = pipe.native_size // pipe.vae_scale
    noise = torch.randn(seeds, cfg.in_channels, lat, lat, generator=torch.Generator().manual_seed(0))
    x = noise.to(pipe.device)
    rows, signed = [], []
    for p in prompts:
        scene = replace(p.scene, mention_color=True)
        d = float(relation_displacement(estimate(x, sigma, scene.caption()), scene).mean())
        signed.append(d)
        rows.append({"caption": scene.caption(), "displacement": round(d, 4)})
    return {"captions": len(rows), "seeds": seeds, "sigma": sigma,
            "right": round(float(np.mean([d > 0 for d in signed])), 3) if rows else None,
            "mean_displacement": round(float(np.mean(signed)), 4) if rows else None, "rows": rows}


def binding_at_noise(pipe, prompts: list, seeds: int, sigma: float = 0.9) -> dict:
    """Check 4: from the rendered scene noised to `sigma`, does the caption decide which blob gets which colour?"""
    import torch

    _, estimate = _clean_estimator(pipe)
    rows, follows, d_true, d_twin = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    for p in prompts:
        scene = replace(p.scene, mention_color=True)
        twin = swapped(scene)
        x = _noised_scene(pipe, scene, sigma, seeds, gen)  # (seeds, C, h, w)
        shown = [float(relation_displacement(estimate(x, sigma, c), scene).mean())
                 for c in (scene.caption(), twin.caption())]
        d_true.append(shown[0])
        d_twin.append(shown[1])
        follows.append(shown[0] > shown[1])
        rows.append({"caption": scene.caption(), "twin": twin.caption(), "displacement": round(shown[0], 4),
                     "displacement_twin": round(shown[1], 4)})
    return {"captions": len(rows), "seeds": seeds, "sigma": sigma,
            "follows_caption": round(float(np.mean(follows)), 3) if rows else None,
            "mean_displacement": round(float(np.mean(d_true)), 4) if rows else None,
            "mean_displacement_twin": round(float(np.mean(d_twin)), 4) if rows else None, "rows": rows}


def _images(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    out = pipe(captions, num_inference_steps=steps, guidance_scale=guidance, seed=seeds, output_type="np",
               use_resolution_binning=False)
    return np.asarray(out.images, dtype=np.float64)  # (B, H, W, 3) in [0, 1]


def probe(model: str | None = None, n: int = 60, pairs: int = 8, seeds: int = 4, steps: int = 20,
          guidance: float = 4.5, device: str | None = "cpu", batch: int = 20, layout: int = 40,
          binding_sigma: float = 0.9, sensitivity: int = 24) -> dict:
    """Run the checks (each skipped with a count of 0); return a JSON-ready dict."""
    from sanaflow.pipelines.text_to_image import load_pipeline
    from sanaflow.training.evaluate import generate_and_score

    pipe = load_pipeline(model, device=device)
    prompts = position_prompts(max(n, pairs, layout, sensitivity))
    kinds = collections.Counter()
    if n > 0:
        _, results = generate_and_score(pipe, prompts[:n], steps, guidance, batch=batch, size=pipe.native_size)
        for r in results:
            kinds["correct" if r["correct"] else "wrong relation" if " is not " in r["reason"] else "object missing"] += 1
    both = kinds["correct"] + kinds["wrong relation"]
    rows = []
    for i, p in enumerate(prompts[:pairs]):
        other = prompts[(i + 1) % len(prompts)].caption  # an unrelated caption, same seeds
        seed_list = [1000 * i + k for k in range(seeds)]
        base, swap, ref = (_images(pipe, [c] * seeds, seed_list, steps, guidance)
                           for c in (p.caption, swapped(p.scene).caption(), other))
        d_swap, d_ref = float(np.abs(swap - base).mean()), float(np.abs(ref - base).mean())
        rows.append({"caption": p.caption, "swapped": swapped(p.scene).caption(), "other": other,
                     "diff_swapped": round(d_swap, 5), "diff_other": round(d_ref, 5)})
    d_swap = float(np.mean([r["diff_swapped"] for r in rows])) if rows else None
    d_ref = float(np.mean([r["diff_other"] for r in rows])) if rows else None
    return {
        "model": model or "embedded default", "prompt_seed": PROBE_SEED, "steps": steps, "guidance": guidance,
        "failures": {"prompts": n, **dict(kinds),
                     "relation_right_given_both_found": round(kinds["correct"] / both, 3) if both else None},
        "order_sensitivity": {"pairs": len(rows), "seeds_per_pair": seeds, "mean_diff_swapped": d_swap,
                              "mean_diff_other": d_ref,
                              "ratio": round(d_swap / d_ref, 3) if rows and d_ref > 0 else None, "rows": rows},
        "first_step_layout": first_step_layout(pipe, prompts[:layout], max(seeds, 8)) if layout > 0 else None,
        "binding_at_noise": binding_at_noise(pipe, prompts[:layout], max(seeds, 8), binding_sigma)
        if layout > 0 else None,
        "caption_sensitivity": caption_sensitivity(pipe, prompts[:sensitivity], seeds) if sensitivity > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=60, help="position prompts for the failure breakdown (0: skip)")
    p.add_argument("--pairs", type=int, default=8, help="caption / swapped-caption pairs")
    p.add_argument("--seeds", type=int, default=4, help="images per caption of a pair (the layout check uses at least 8 noises)")
    p.add_argument("--layout", type=int, default=40, help="captions for the first-step layout check (0: skip)")
    p.add_argument("--binding-sigma", type=float, default=0.9, help="noise level of the binding check (default 0.9)")
    p.add_argument("--sensitivity", type=int, default=24, help="captions for the caption-sensitivity check (0: skip)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    a = p.parse_args(argv)
    if not 0 < a.binding_sigma < 1:
        p.error(f"--binding-sigma must be in (0, 1), got {a.binding_sigma}")
    result = probe(a.model, a.n, a.pairs, a.seeds, a.steps, a.guidance, a.device, layout=a.layout,
                   binding_sigma=a.binding_sigma, sensitivity=a.sensitivity)
    text = json.dumps(result, indent=1)
    if a.out:
        from sanaflow.utils import atomic_write_text

        atomic_write_text(a.out, text + "\n")
    f, o = result["failures"], result["order_sensitivity"]
    print(f"position prompts: {f}", file=sys.stderr)
    print(f"word-order sensitivity: swapped {o['mean_diff_swapped']}, other caption {o['mean_diff_other']}, "
          f"ratio {o['ratio']}", file=sys.stderr)
    if result["first_step_layout"]:
        fl = result["first_step_layout"]
        print(f"first-step layout: right {fl['right']}, mean displacement {fl['mean_displacement']}", file=sys.stderr)
        bd = result["binding_at_noise"]
        print(f"binding at sigma {bd['sigma']}: follows caption {bd['follows_caption']}, displacement "
              f"{bd['mean_displacement']} (caption) vs {bd['mean_displacement_twin']} (mirrored twin)", file=sys.stderr)
    if result["caption_sensitivity"]:
        for sigma, row in result["caption_sensitivity"]["by_sigma"].items():
            print(f"caption sensitivity at sigma {sigma}: {row}", file=sys.stderr)
    if not a.out:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
