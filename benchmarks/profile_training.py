"""Where the time of one text-to-image training step goes: ms per stage and the end-to-end rate.

    python benchmarks/profile_training.py --tiny                       # CPU check of the script (seconds)
    python benchmarks/profile_training.py --batch 1024 --out benchmarks/results/train_profile.json   # GPU

Stages, each timed alone (CUDA synchronised around it, median of --steps runs):
  data        the DataLoader: one batch of rendered scenes (uint8, channels-last) + captions, with
              --workers workers, steady state (loader rate = batch / this, when the GPU never waits)
  h2d         pinned host -> device copy of the images
  tokenize    the tokenizer alone on the host (the uncached text path runs it every step)
  text        the text encoder on the batch's captions, uncached (tokenizer + MiniLM)
  text_cache  the same captions through a warm `TextFeatureCache` (gathers rows)
  vae_encode  the frozen DC-AE encode of the batch (bf16, channels-last on GPU)
  pool_draw   a batch drawn from a `SamplePool` (index_select of latents + features)
  fwd_bwd     the loss forward + backward under autocast (the trained DiT)
  clip        gradient-norm clipping
  optimizer   AdamW step + zero_grad (fused on CUDA)
  ema         the EMA update
  log_sync    float(loss): one host <-> device sync (the old trainer paid it every step)
Then two loops without per-stage syncs, as the trainer runs them: `stream` (every sample rendered,
encoded: data + vae_encode + text + step) and `pool` (draws from a pool refreshed by batch/reuse
fresh samples per step), reported as images/s. The defaults are the embedded model's recipe
(train/shapes-tiny-dit, the shipped DC-AE and transformer); --tiny swaps in the test-sized networks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parents[1] / "src" / "sanaflow" / "assets" / "shapes-tiny"
TINY = [
    "data.resolution=32", "model.text_max_length=16", "model.vae_path=null", "model.init_from=null",
    'model.vae={"latent_channels": 4, "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock", '
    '"encoder_block_out_channels": [8, 8, 8], "decoder_block_out_channels": [8, 8, 8], '
    '"encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1], '
    '"encoder_qkv_multiscales": [[], [], []], "decoder_qkv_multiscales": [[], [], []], '
    '"upsample_block_type": "interpolate", "downsample_block_type": "Conv"}',
    'model.transformer={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, '
    '"num_layers": 1, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16, '
    '"caption_channels": 384, "sample_size": 8, "patch_size": 2, "interpolation_scale": 1}',
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, steps: int, warmup: int = 2) -> float:
    """Median ms of fn() over `steps` runs, synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="train/shapes-tiny-dit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batch", type=int, default=None, help="train.batch_size (default: the config's)")
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
    parser.add_argument("--reuse", type=int, default=4, help="pool loop: fresh samples per step = batch / reuse")
    parser.add_argument("--pool", type=int, default=None, help="pool loop: pool size (default 32 x batch)")
    parser.add_argument("--steps", type=int, default=10, help="timed runs per stage / loop steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT (train.compile)")
    parser.add_argument("--tiny", action="store_true", help="test-sized networks at 32 px (a CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from sanaflow.config import load_config
    from sanaflow.training import TrainConfig, build_task
    from sanaflow.training.cache import SamplePool, TextFeatureCache
    from sanaflow.training.data import make_loader
    from sanaflow.training.optim import EMA, build_optimizer

    overrides = [f"model.vae_path={ASSET / 'vae'}", f"model.init_from={ASSET / 'transformer'}"]
    overrides += TINY if args.tiny else []
    # The stages and the stream loop see whole batches; the pool loop below builds its own pool.
    overrides += ["eval.every=0", "data.pool_size=0", "data.reuse=1", *args.set]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = load_config(args.config, TrainConfig, overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    task = build_task(cfg)
    b = cfg.train.batch_size
    loss, prepare = task.loss.to(device), task.prepare
    net = loss.net
    if args.compile:
        net.compile(fullgraph=True, dynamic=False)
    prepare._to(device)
    ema = EMA(net, cfg.train.ema_decay)
    ema.model.to(device)
    optimizer = build_optimizer(loss.parameters(), cfg.optim, fused=device.type == "cuda")
    params = [p for p in loss.parameters() if p.requires_grad]
    amp = cfg.train.mixed_precision != "fp32"
    amp_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float16

    loader = iter(make_loader(task.source, 0, 0, 1, cfg.data.num_workers))
    raw = next(loader)
    ms: dict[str, float] = {}
    # Loader in steady state: workers render ahead, so time a run of batches, not one.
    for _ in range(min(4, cfg.data.num_workers)):
        next(loader)
    n_data = max(args.steps, 3 * cfg.data.num_workers)  # beyond what the workers had prefetched
    t0 = time.perf_counter()
    for _ in range(n_data):
        next(loader)
    ms["data"] = (time.perf_counter() - t0) * 1e3 / n_data
    images, captions = raw["image"], raw["caption"]
    if device.type == "cuda":
        images = images.pin_memory()
    ms["h2d"] = _time(lambda: images.to(device, non_blocking=True), device, args.steps)
    te = prepare.text_encoder
    ms["tokenize"] = _time(lambda: te.tokenize(captions), device, args.steps)
    ms["text"] = _time(lambda: te.encode(captions, device=device, dtype=torch.float32), device, args.steps)
    cache = TextFeatureCache(te, device)
    cache.encode(captions)
    ms["text_cache"] = _time(lambda: cache.encode(captions), device, args.steps)
    ms["vae_encode"] = _time(lambda: prepare.encode_images(images, device), device, args.steps)
    batch = prepare(raw, device)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            value, _ = loss(batch)
        value.backward()
        return value

    loss.train()
    ms["fwd_bwd"] = _time(fwd_bwd, device, args.steps)
    ms["clip"] = _time(lambda: torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip), device, args.steps)

    def opt_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    ms["optimizer"] = _time(opt_step, device, args.steps)
    ms["ema"] = _time(lambda: ema.update(net, 100), device, args.steps)
    value = fwd_bwd()
    ms["log_sync"] = _time(lambda: float(value.detach()), device, args.steps)

    def train_step(batch):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            value, _ = loss(batch)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        ema.update(net, 100)

    def rate(next_batch) -> float:
        for _ in range(2):
            train_step(next_batch())
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(next_batch())
        _sync(device)
        return b * args.steps / (time.perf_counter() - t0)

    ms["pool_draw"] = float("nan")
    rates = {"stream": rate(lambda: prepare(next(loader), device))}
    # The pool loop streams chunks of batch / reuse, as the trainer does with data.pool_size.
    chunk = b // args.reuse
    cfg_chunk = load_config(args.config, TrainConfig, overrides + [f"train.batch_size={chunk}"])
    from sanaflow.training.tasks import _source

    src = _source(cfg_chunk, 1)
    chunks = iter(make_loader(src, 0, 0, 1, cfg.data.num_workers))
    size = args.pool or 32 * b
    size -= size % chunk
    t0 = time.perf_counter()
    pool = SamplePool(lambda: prepare(next(chunks), device), size, chunk, b)
    fill_s = time.perf_counter() - t0
    ms["pool_draw"] = _time(lambda: {k: v.index_select(0, torch.randint(size, (b,), device=device))
                                     for k, v in pool.store.items()}, device, args.steps)
    rates["pool"] = rate(pool.next_batch)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": b, "workers": cfg.data.num_workers, "mixed_precision": cfg.train.mixed_precision,
        "compile": args.compile, "tiny": args.tiny, "reuse": args.reuse, "pool_size": size,
        "pool_fill_s": round(fill_s, 2), "ms": {k: round(v, 3) for k, v in ms.items()},
        "img_per_s": {k: round(v, 1) for k, v in rates.items()},
        "loader_img_per_s": round(b / (ms["data"] / 1e3), 1) if ms["data"] > 0 else None,
        "text_cache_entries": len(cache),
    }
    for k, v in ms.items():
        print(f"{k:>11}: {v:9.2f} ms   ({b / max(v, 1e-9) * 1e3:12,.0f} img/s if alone)")
    print(f"loops: stream {rates['stream']:,.0f} img/s, pool (reuse {args.reuse}) {rates['pool']:,.0f} img/s; "
          f"pool of {size} filled in {fill_s:.1f} s")
    if args.out:
        from sanaflow.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
