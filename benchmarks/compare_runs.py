"""Compare the loss curves of training runs: N processes vs 1 process at the same global batch, against noise.

Reads each run's ``metrics.jsonl`` (the trainer's log records: step, loss, samples, img_per_s), aligns
the runs on their common logged steps, smooths each loss curve by a moving average over ``window``
log points, and reports the mean |difference| of two smoothed curves. The reference run ``a`` (one
process) is compared with ``b`` (several processes, same global batch, same data) and with ``c`` (one
process, another seed: run-to-run noise; optionally more of them, ``c2``, ``c3`` ..., whose gaps to
``a`` are averaged with a-vs-c). The multi-process run passes when its gap to ``a`` is at most
``tolerance`` times that noise gap, and when it trained on the same number of samples per
step (the global batch). Throughput is the median img/s over the log windows after the first
``skip_windows`` (start-up: cuDNN autotuning, loader warm-up, text-cache misses).

    python benchmarks/compare_runs.py --run a=DIR --run b=DIR --run c=DIR --out multigpu_loss.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sanaflow.errors import InputError
from sanaflow.utils import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The training records of a run folder (or a metrics.jsonl file), evaluation records left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"no training log at {path} (the trainer writes <output_dir>/metrics.jsonl)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "img_per_s" in r]


def loss_curve(records: list[dict[str, Any]], key: str = "loss") -> dict[int, float]:
    """step -> logged value of `key` (the mean over its log window)."""
    return {int(r["step"]): float(r[key]) for r in records if key in r}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over `window` consecutive points (no padding: len - window + 1 points)."""
    window = max(1, min(int(window), len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def curve_gap(a: dict[int, float], b: dict[int, float], window: int = 5) -> dict[str, float]:
    """Mean |a - b| and mean (b - a) of the smoothed curves over their common steps."""
    steps = sorted(set(a) & set(b))
    if len(steps) < 2:
        raise InputError(f"the runs share {len(steps)} logged step(s); need at least 2 to compare curves")
    va = smooth(np.array([a[s] for s in steps]), window)
    vb = smooth(np.array([b[s] for s in steps]), window)
    return {"mean_abs": float(np.abs(vb - va).mean()), "mean_signed": float((vb - va).mean()),
            "max_abs": float(np.abs(vb - va).max()), "points": len(steps), "first_step": steps[0],
            "last_step": steps[-1]}


def offset_test(a: dict[int, float], b: dict[int, float], block: int = 5) -> dict[str, float] | None:
    """Is b's curve offset from a's? Mean (b - a) over common steps, with a standard error from block means.

    Consecutive log points are correlated (the two runs drift apart slowly), so the error is taken
    from the means of blocks of `block` points: |t| well above 2 means a systematic difference.
    Also the scatter of the difference (how noisy the pair is point to point). None when the runs
    share fewer than two blocks of log points.
    """
    steps = sorted(set(a) & set(b))
    d = np.array([b[s] - a[s] for s in steps])
    n_blocks = len(d) // max(1, block)
    if n_blocks < 2:
        return None
    means = d[: n_blocks * block].reshape(n_blocks, block).mean(axis=1)
    se = float(means.std(ddof=1) / np.sqrt(n_blocks))
    mean = float(d.mean())
    t = mean / se if se > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
    return {"mean": mean, "stderr": se, "t": t,
            "blocks": n_blocks, "point_sd": float(d.std(ddof=1))}


def throughput(records: list[dict[str, Any]], skip_windows: int = 2) -> float:
    """Median images/s over the log windows after the first `skip_windows` (all of them if too few)."""
    rates = [float(r["img_per_s"]) for r in records]
    if not rates:
        raise InputError("no training records with img_per_s")
    steady = rates[skip_windows:] or rates
    return float(statistics.median(steady))


def samples_per_step(records: list[dict[str, Any]]) -> float | None:
    """The global batch the log implies (samples / step at the last record)."""
    last = records[-1] if records else None
    return last["samples"] / last["step"] if last and "samples" in last and last["step"] else None


def compare(runs: dict[str, list[dict[str, Any]]], reference: str = "a", multi: str = "b", noise: str = "c",
            window: int = 5, tolerance: float = 1.5, skip_windows: int = 2) -> dict[str, Any]:
    """The summary: per-run curves and img/s, the gaps a-vs-b and a-vs-c, the verdict and the scaling."""
    for name in (reference, multi, noise):
        if name not in runs:
            raise InputError(f"compare needs runs named {reference!r}, {multi!r} and {noise!r}; got {sorted(runs)}")
    curves = {name: loss_curve(recs) for name, recs in runs.items()}
    gap = curve_gap(curves[reference], curves[multi], window)
    noise_gap = curve_gap(curves[reference], curves[noise], window)
    other = curve_gap(curves[multi], curves[noise], window)
    # More noise runs (c2, c3, ...: 1 process, other seeds) make the noise level a mean over several
    # pairs with the reference; with c alone it is the a-c gap.
    extra = sorted((n for n in runs if n.startswith(noise) and n[len(noise):].isdigit()), key=lambda n: int(n[len(noise):]))
    extra_gaps = {n: curve_gap(curves[reference], curves[n], window) for n in extra}
    noise_level = float(np.mean([noise_gap["mean_abs"], *(g["mean_abs"] for g in extra_gaps.values())]))
    offsets = {f"{x}_{y}": offset_test(curves[y], curves[x], window)
               for x, y in ((multi, reference), (multi, noise), (noise, reference))}
    batches = {name: samples_per_step(recs) for name, recs in runs.items()}
    same_batch = batches[reference] is not None and all(
        batches[n] == batches[reference] for n in (multi, noise, *extra))
    # Identical curves have no noise; then only an identical multi-process curve passes.
    ratio = gap["mean_abs"] / noise_level if noise_level > 0 else (
        0.0 if gap["mean_abs"] == 0 else float("inf"))
    rates = {name: throughput(recs, skip_windows) for name, recs in runs.items()}
    final = {name: float(np.mean([v for _, v in sorted(c.items())[-window:]])) for name, c in curves.items()}
    return {
        "pass": bool(same_batch and ratio <= tolerance),
        "criterion": f"mean |smoothed loss {multi} - {reference}| <= {tolerance} x mean |smoothed loss {noise} - "
                     f"{reference}| (moving average over {window} log points, common steps; with more noise runs "
                     f"{noise}2, {noise}3 ... the mean of their gaps to {reference}), same global batch",
        "noise_level": noise_level,
        "gap_ratio": ratio,
        "tolerance": tolerance,
        "window": window,
        f"gap_{reference}_{multi}": gap,
        f"noise_{reference}_{noise}": noise_gap,
        f"gap_{multi}_{noise}": other,
        **{f"noise_{reference}_{n}": g for n, g in extra_gaps.items()},
        "offset_test": offsets,
        "offset_note": f"informational, not part of the verdict: mean (x - y) of the raw logged losses over common "
                       f"steps, stderr from means of blocks of {window} log points; |t| > 2: systematic",
        "same_global_batch": same_batch,
        "global_batch": batches,
        "final_loss": final,
        "img_per_s": rates,
        "scaling": rates[multi] / rates[reference] if rates[reference] > 0 else None,
        "throughput_note": f"median img/s over log windows after the first {skip_windows}",
        "curves": {name: {str(s): round(v, 6) for s, v in sorted(c.items())} for name, c in curves.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: compare run folders and write the summary JSON (exit 1 on a failed check with --strict)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a run folder (with metrics.jsonl); names a (1 process), b (N processes), c (1 process, "
                        "other seed)")
    p.add_argument("--out", required=True, help="summary JSON to write")
    p.add_argument("--window", type=int, default=5, help="moving-average window in log points (default 5)")
    p.add_argument("--tolerance", type=float, default=1.5, help="allowed gap / noise ratio (default 1.5)")
    p.add_argument("--skip-windows", type=int, default=2, help="log windows left out of img/s (default 2)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="extra facts for the summary (device, command, wall seconds ...)")
    p.add_argument("--run-info", action="append", default=[], metavar="NAME=JSON",
                   help="a JSON file of facts about run NAME (processes, wall_s ...), stored under runs.NAME")
    p.add_argument("--strict", action="store_true", help="exit 1 when the check fails")
    args = p.parse_args(argv)
    try:
        dirs = dict(_pair(r, "--run") for r in args.run)
        runs = {name: read_metrics(d) for name, d in dirs.items()}
        summary = compare(runs, window=args.window, tolerance=args.tolerance, skip_windows=args.skip_windows)
        info: dict[str, Any] = {name: {"dir": str(d)} for name, d in dirs.items()}
        for item in args.run_info:
            name, path = _pair(item, "--run-info")
            info.setdefault(name, {}).update(json.loads(Path(path).read_text(encoding="utf-8")))
        summary = {"meta": dict(_pair(m, "--meta") for m in args.meta), "runs": info, **summary}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(Path(args.out), json.dumps(summary, indent=2) + "\n")
    g, n = summary["gap_a_b"], summary["noise_a_c"]
    print(f"loss gap a-b {g['mean_abs']:.5f} vs noise {summary['noise_level']:.5f} (a-c {n['mean_abs']:.5f}) (ratio {summary['gap_ratio']:.2f}, "
          f"tolerance {args.tolerance}) over {g['points']} log points; same global batch: "
          f"{summary['same_global_batch']}; {'PASS' if summary['pass'] else 'FAIL'}")
    for pair, o in summary["offset_test"].items():
        x, _, y = pair.partition("_")
        if o is None:
            continue
        print(f"offset {x}-{y}: {o['mean']:+.5f} +- {o['stderr']:.5f} (t {o['t']:+.2f}), point sd {o['point_sd']:.5f}")
    rates = summary["img_per_s"]
    print("img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
          + (f"; scaling b/a {summary['scaling']:.2f}x" if summary["scaling"] else ""))
    return 1 if args.strict and not summary["pass"] else 0


def _pair(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise InputError(f"{flag} takes NAME=VALUE, got {text!r}")
    return name, value


if __name__ == "__main__":
    sys.exit(main())
