"""The caption cross-attention alone: SDPA (each backend) vs our Triton kernel (issue 7).

SANA's cross-attention at the official sizes: CFG batch 2, 300 caption tokens (the first caption
120 tokens long, the rest padding, as `bench_sana.py` builds it), 600M heads 16 x 72 and 1600M
20 x 112, image tokens (px / 32)^2. Times (CUDA events around 10 calls, median of --repeats after a
warm-up): `sdpa` (torch's own choice), `sdpa-cudnn`, `sdpa-efficient`, `sdpa-flash` where it runs,
`sdpa-rows` (each CFG row alone over its valid caption tokens, unmasked: what trimming the padding
would buy), our kernel with each block config of `_CONFIGS` and the autotuned one (`triton`), each
with the padding mask and without a mask. The relative error of every output against float64 is in
the record.

    python benchmarks/bench_cross_attention.py --out benchmarks/results/cross_attention_speed.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import cuda_event_seconds  # noqa: E402  (a sibling of this script: on sys.path when it runs)

MODELS = {"600M": (16, 72), "1600M": (20, 112)}
CAPTION_TOKENS = 300


def inputs(model: str, px: int, dtype: torch.dtype, device: str, seed: int = 0, tokens: int = CAPTION_TOKENS,
           short: int = 120):
    heads, d = MODELS[model]
    n = (px // 32) ** 2
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(2, n, heads * d, device=device, generator=g).to(dtype).view(2, n, heads, d).transpose(1, 2)
    k = torch.randn(2, heads, tokens, d, device=device, generator=g).to(dtype)
    v = torch.randn(2, heads, tokens, d, device=device, generator=g).to(dtype)
    mask = torch.ones(2, tokens, device=device)
    mask[0, short:] = 0
    bias = ((1 - mask) * -1e4).to(dtype)[:, None, None, :]
    return q, k, v, bias


def _sdpa(q, k, v, bb, backend=None):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bb).transpose(1, 2).flatten(2)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bb).transpose(1, 2).flatten(2)


def _sdpa_rows(q, k, v, bb, lengths):
    """Each batch row alone over its valid caption tokens, no mask (lengths known on the host)."""
    if bb is None:
        return _sdpa(q, k, v, None)
    rows = [F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
            for b, n in enumerate(lengths)]
    return torch.cat(rows).transpose(1, 2).flatten(2)


def cases(tca, lengths) -> dict:
    """impl name -> fn(q, k, v, bias) -> (B, N, h * d); `lengths`: each row's valid caption tokens."""
    from torch.nn.attention import SDPBackend

    out = {"sdpa": _sdpa, "sdpa-rows": functools.partial(_sdpa_rows, lengths=lengths),
           "triton": tca.cross_attention_triton}
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        out[name] = functools.partial(_sdpa, backend=backend)
    for m, n, w, st in tca._CONFIGS:
        meta = {"BLOCK_M": m, "BLOCK_L": n, "num_warps": w, "num_stages": st}
        out[f"triton-{m}x{n}-w{w}-s{st}"] = functools.partial(tca.cross_attention_triton, meta=meta)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="600M,1600M")
    p.add_argument("--px", default="1024,2048,4096")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--caption-tokens", type=int, default=CAPTION_TOKENS,
                   help="caption length (300 as SANA pads; 128 = a trimmed caption, see trim_caption_padding)")
    p.add_argument("--short", type=int, default=120, help="valid tokens of the first caption")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    from sanaflow.ops import triton_cross_attention as tca

    records = []
    gpu = torch.cuda.get_device_name()
    # settle the clocks
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        a @ a
    torch.cuda.synchronize()
    for model in args.models.split(","):
        for px in (int(x) for x in args.px.split(",")):
            q, k, v, bias = inputs(model, px, torch.bfloat16, "cuda", tokens=args.caption_tokens,
                                   short=min(args.short, args.caption_tokens))
            ref = {}
            for masked in (True, False):
                bb = bias if masked else None
                s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
                if bb is not None:
                    s = s + bb.double()
                ref[masked] = (s.softmax(-1) @ v.double()).transpose(1, 2).flatten(2)
                del s
            for masked in (True, False):
                bb = bias if masked else None
                lengths = (bias[:, 0, 0, :] > -5000).sum(-1).tolist()  # padding at the end, as tokenizers put it
                for name, fn in cases(tca, lengths).items():
                    rec = {"model": model, "px": px, "caption_tokens": args.caption_tokens, "masked": masked,
                           "impl": name, "gpu": gpu,
                           "torch": torch.__version__}
                    call = functools.partial(fn, q, k, v, bb)
                    try:
                        out = call()
                        rec["rel_err"] = ((out.double() - ref[masked]).norm() / ref[masked].norm()).item()
                        rec["seconds"], rec["seconds_min"] = cuda_event_seconds(call, args.repeats)
                        if name == "triton":
                            rec["config"] = tca.tuned_config(q, k)
                    except Exception as err:  # a backend that does not take the shape
                        rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    records.append(rec)
                    ms = f"{rec['seconds'] * 1e3:.3f} ms" if "seconds" in rec else rec["error"][:60]
                    print(f"{model:5s} {px:4d} mask={int(masked)} {name:28s} {ms}  err {rec.get('rel_err', '-')}"
                          f"  {rec.get('config', '')}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
