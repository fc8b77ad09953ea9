"""Host issue time of the 600M 1024 px eager step, ours vs diffusers interleaved in one process, and the host
microseconds of one block's parts (issue 7). CUDA and diffusers needed.

    PYTHONPATH=src python benchmarks/eager_host_probe.py --out OUT.json     # ~1 min on an H200
"""
import argparse
import json
import statistics
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
import torch
import torch.nn.functional as F
from _common import host_microseconds
from bench_sana import TRANSFORMERS
from profile_step import build_models, make_inputs, step_fn

from sanaflow.ops import norm as norm_ops
from sanaflow.ops.linear_attention import linear_attention

ap = argparse.ArgumentParser()
ap.add_argument("--out")
ap.add_argument("--rounds", type=int, default=5)
a = ap.parse_args()
dev = torch.device("cuda")
dt = torch.bfloat16
args = argparse.Namespace(impl="both", model="600M", tiny=False, quantize=None, compile=False, regional=False,
                          px=1024, batch=2)
torch.set_grad_enabled(False)
models = build_models(args, dev, dt)
inputs = make_inputs(TRANSFORMERS["600M"], args, dev, dt)
fns = {k: step_fn(k, m, inputs) for k, m in models.items()}
res = {k: {"host_ms": [], "event_ms": []} for k in fns}
for f in fns.values():
    for _ in range(10):
        f()
torch.cuda.synchronize()
for r in range(a.rounds):
    # interleaved: each round times both impls, 20 steps each
    for k, f in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
        torch.cuda.synchronize()
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            f()
            e.record()
            t1 = time.perf_counter()
            e.synchronize()
            res[k]["host_ms"].append((t1 - t0) * 1e3)
            res[k]["event_ms"].append(s.elapsed_time(e))
summary = {k: {m: round(statistics.median(v), 3) for m, v in d.items()} for k, d in res.items()}
print("interleaved medians", summary)
# per-op host launch cost (many calls, no sync between)
x = torch.randn(2, 1024, 1152, device=dev, dtype=dt)
sh = torch.randn(2, 1, 1152, device=dev, dtype=dt)
ln = torch.nn.LayerNorm(1152, elementwise_affine=False, eps=1e-6).to(dev)
w = torch.randn(1152, 1152, device=dev, dtype=dt)
q = torch.randn(2, 1024, 36, 32, device=dev, dtype=dt).transpose(1, 2)
blk = models["ours"].transformer_blocks[0]
def cost(name, fn, n=300):
    host, wall = host_microseconds(fn, n)
    summary[name] = {"host_us": round(host, 2), "wall_us": round(wall, 2)}
    print(name, summary[name], flush=True)
cost("F.linear 2048x1152x1152", lambda: F.linear(x, w))
cost("addcmul", lambda: torch.addcmul(x, sh, x))
cost("norm_modulate (ours)", lambda: norm_ops.norm_modulate(ln, x, sh, sh))
cost("layer_norm + addcmul (torch)", lambda: torch.addcmul(sh, F.layer_norm(x, (1152,), eps=1e-6), 1 + sh))
cost("linear_attention (ours)", lambda: linear_attention(q, q, q))
cost("mixffn block.ff (ours)", lambda: blk.ff(x, 32, 32))
cost("self-attn block.attn1 (ours)", lambda: blk.attn1(x, 32, 32))
c = torch.randn(2, 300, 1152, device=dev, dtype=dt)
cost("cross-attn block.attn2 (ours)", lambda: blk.attn2(x, c, None))
mod = torch.randn(2, 6 * 1152, device=dev, dtype=dt)
cost("block (ours)", lambda: blk(x, c, None, mod, 32, 32))
dblk = models["diffusers"].transformer_blocks[0]
cost("block (diffusers)", lambda: dblk(x, None, c, None, mod, 32, 32))
if a.out:
    json.dump(summary, open(a.out, "w"), indent=1)
