"""Typed configs: YAML files with `base:` inheritance, dotted overrides, validation against dataclass schemas.

A config file is a YAML mapping. `base: other.yaml` (or a list of them) names files it inherits
from, resolved relative to the including file (or, failing that, a config shipped with sanaflow by
name); the bases are deep-merged in order, then the file's own keys on top (mappings merge
recursively, everything else replaces). Overrides such as `sampling.steps=30` are applied to the
merged tree, their values parsed as YAML. The tree is then validated against a schema: any
dataclass whose fields are typed with bool / int / float / str / Literal / Optional / unions /
list / tuple / dict / Any / nested dataclasses. Validation names the bad key, suggests the closest
valid one and lists the valid ones; a dataclass may check values in `__post_init__` by raising
ConfigError. The machinery is generic: other modules define their own schemas (e.g. training
configs) and call `load_config(path, TheirSchema, overrides)`.

Shipped configs live in `sanaflow/configs/` (installed with the package) and are found by name:
`model_spec("sana-600m-1024")`, `load_config("generate", GenerateConfig)`. Files whose name starts
with `_` are bases, not named configs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .errors import ConfigError, suggest, unknown_choice
from .utils import SEED_MAX, SEED_MIN, atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"
BASE_KEY = "base"
# Exponent notation without a dot ("1e-6"), which YAML 1.1 (PyYAML) reads as a string.
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")


# ---------------------------------------------------------------- schemas


@dataclass
class SamplingConfig:
    """How to sample: solver, steps, guidance, schedule shift, seed."""

    sampler: Literal["euler", "dpm++2m", "scm"] = "dpm++2m"
    steps: int = 20
    guidance_scale: float = 4.5
    pag_scale: float = 0.0
    # Transformer blocks whose self-attention becomes identity on PAG's perturbed branch.
    pag_layers: list[int] | None = None  # None: the middle block
    # None: the shift of the checkpoint's scheduler_config.json.
    flow_shift: float | None = None
    seed: int | None = None
    # SANA-Sprint (sampler "scm") only: TrigFlow angle of pure noise, and of the middle of a 2-step run.
    max_timestep: float = 1.5708
    intermediate_timestep: float | None = 1.3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        # `not x >= 0` (rather than `x < 0`) also refuses NaN; infinities are refused too.
        for name in ("guidance_scale", "pag_scale"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.flow_shift is not None:  # the samplers' range, before any model loads
            from .sampling.schedules import check_flow_shift

            check_flow_shift(self.flow_shift, "flow_shift", ConfigError)


@dataclass
class TextEncoderSpec:
    """Which text encoder conditions the transformer, and how prompts are prepared for it."""

    type: Literal["gemma2", "minilm"] = "gemma2"
    max_sequence_length: int = 300
    # Prefix prompts with SANA's complex-human-instruction lines (Gemma only; the negative prompt never).
    complex_human_instruction: bool = True
    # The encoder's own config.json keys (e.g. transformers' Gemma2Config), for building it without weights.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerSpec:
    """The sampling schedule a model was trained for (written as the checkpoint's scheduler_config.json)."""

    type: Literal["flow-dpm-solver", "flow-euler", "scm"] = "flow-dpm-solver"
    flow_shift: float = 3.0
    num_train_timesteps: int = 1000
    sigma_data: float = 0.5  # scm only

    def diffusers_config(self) -> dict[str, Any]:
        """The scheduler_config.json dict diffusers (and sanaflow.sampling) read for this schedule."""
        if self.type == "scm":
            return {
                "_class_name": "SCMScheduler",
                "num_train_timesteps": self.num_train_timesteps,
                "prediction_type": "trigflow",
                "sigma_data": self.sigma_data,
            }
        if self.type == "flow-euler":
            return {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": self.num_train_timesteps,
                "shift": self.flow_shift,
            }
        return {
            "_class_name": "DPMSolverMultistepScheduler",
            "algorithm_type": "dpmsolver++",
            "final_sigmas_type": "zero",
            "flow_shift": self.flow_shift,
            "lower_order_final": True,
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": "flow_prediction",
            "solver_order": 2,
            "use_flow_sigmas": True,
        }


@dataclass
class ModelSpec:
    """A named model: its transformer, VAE and text-encoder configs, schedule and sampling defaults."""

    name: str
    description: str = ""
    # Official diffusers-format repository id, where one exists.
    repo: str | None = None
    # Base resolution in pixels: default size and the aspect-ratio bins of resolution binning.
    resolution: int = 1024
    # config.json keys of sanaflow.models.SanaTransformer (= diffusers' SanaTransformer2DModel).
    transformer: dict[str, Any] = field(default_factory=dict)
    # config.json keys of sanaflow.models.DCAE (= diffusers' AutoencoderDC), scaling_factor included.
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 32:
            raise ConfigError(f"resolution must be a positive multiple of 32, got {self.resolution}")


@dataclass
class GenerateConfig:
    """One text-to-image run: model, prompts, size, sampling and where the images go."""

    # Model reference: a diffusers folder, a hub repo id or a model spec name; None: the embedded default.
    model: str | None = None
    # Weight-file variant to read where the model has it ("fp16", "bf16": the official repos' half-size
    # files); None: the default weights.
    variant: str | None = None
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_images_per_prompt: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_dir: str = "outputs"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    use_resolution_binning: bool = True
    # torch.compile the transformer: faster steps; the first call at each image size compiles (slow).
    compile: bool = False
    # With compile (or alone): compile one transformer-block graph that every block reuses (seconds to
    # compile instead of a minute; as fast as the whole-model graph at 4096 px and with cuda_graphs).
    compile_regional: bool = False
    # Replay each sampling step from a captured CUDA graph (CUDA only).
    cuda_graphs: bool = False
    # Keep the text encoder on the CPU except while encoding (less GPU memory, e.g. for 4K).
    offload_text_encoder: bool = False
    # Quantize the transformer after loading: int8 weight-only (CPU and GPU) or fp8 (H100-class GPUs).
    quantize: Literal["int8", "fp8"] | None = None

    def __post_init__(self) -> None:
        if self.num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt must be >= 1, got {self.num_images_per_prompt}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")


# ---------------------------------------------------------------- YAML trees


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config {path} is not a UTF-8 YAML file (byte {e.start} is not UTF-8 text); pass a YAML config"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
            raise ConfigError(f"invalid YAML in {path} line {e.problem_mark.line + 1}: {e.problem}") from None
        raise ConfigError(f"invalid YAML in {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into `base` recursively (mappings merge, other values replace); inputs are not modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_base(ref: Any, including: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{including}: `{BASE_KEY}` must be a file name or a list of them, got {ref!r}")
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute():
        candidate = including.parent / candidate
    for path in (candidate, candidate.with_name(candidate.name + ".yaml")):
        if path.is_file():
            return path.resolve()
    names = config_names()
    if ref in names:
        return names[ref].resolve()
    raise ConfigError(
        f"{including}: base {ref!r} not found (looked for {candidate}); "
        f"shipped configs: {', '.join(sorted(names))}"
    )


def load_yaml_tree(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything it inherits through `base:`, merged into one plain dict."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for ref in bases if isinstance(bases, list) else [bases]:
        merged = deep_merge(merged, load_yaml_tree(_resolve_base(ref, path), (*_stack, path)))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. sampling.steps=30")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced quote): keep the text
    if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-6" as a string
    return parts, value


def apply_overrides(tree: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `tree` with dotted `KEY=VALUE` overrides applied (validation comes later)."""
    out = dict(tree)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            node = node.get(part)
            if node is None:
                break
            if not isinstance(node, Mapping):
                raise ConfigError(
                    f"bad override {item!r}: {'.'.join(parts[: i + 1])} is a {type(node).__name__}, not a section"
                )
        out = _set_path(out, parts, value)
    return out


def _set_path(tree: Mapping[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    out = dict(tree)
    if len(parts) == 1:
        out[parts[0]] = value
        return out
    child = out.get(parts[0])
    out[parts[0]] = _set_path(child if isinstance(child, Mapping) else {}, parts[1:], value)
    return out


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return tp.__name__ if isinstance(tp, type) else str(tp)


class _Mismatch(Exception):
    """Internal: a value does not have the expected type (turned into a ConfigError by the caller)."""


def _convert(value: Any, tp: Any, where: str, source: str, partial: bool) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        errors: list[ConfigError] = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, where, source, partial)
            except _Mismatch:
                continue
            except ConfigError as e:  # the arm matched structurally but something inside is wrong
                errors.append(e)
        if errors:
            raise errors[0]
        raise _Mismatch
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        if isinstance(value, str):
            raise ConfigError(
                f"{source}: {where}: unknown value {value!r}{suggest(value, [str(a) for a in args])}; "
                f"choose from: {', '.join(str(a) for a in args)}"
            )
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, where, source, partial)
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        item = args[0] if args else Any
        return [_checked(v, item, f"{where}[{i}]", source, partial) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_checked(v, item, f"{where}[{i}]", source, partial) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_checked(v, a, f"{where}[{i}]", source, partial) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        val_tp = args[1] if args else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{source}: {where}: keys must be strings, got {k!r}")
            out[k] = _checked(v, val_tp, f"{where}.{k}", source, partial)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return float(value)  # "1e-6" in a YAML file: a number YAML 1.1 did not recognise
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise ConfigError(f"{source}: {where}: unsupported schema type {tp!r}")


def _checked(value: Any, tp: Any, where: str, source: str, partial: bool) -> Any:
    try:
        return _convert(value, tp, where, source, partial)
    except _Mismatch:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(
            f"{source}: {where}: expected {_type_name(tp)}, got {type(value).__name__} {shown}"
        ) from None


def _build(schema: type[T], data: Mapping[str, Any], where: str, source: str, partial: bool) -> Any:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            section = f"in {where!r}" if where else "at top level"
            raise ConfigError(
                f"{source}: unknown key {prefix + str(key)!r}{suggest(str(key), fields)}; "
                f"valid keys {section}: {', '.join(fields)}"
            )
    kwargs = {k: _checked(v, hints[k], prefix + k, source, partial) for k, v in data.items()}
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        if partial:
            return kwargs  # a base file: checked key by key, completed by the files that inherit it
        raise ConfigError(f"{source}: missing required key(s): {', '.join(prefix + m for m in missing)}")
    try:
        return schema(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {where or schema.__name__}: {e}") from None


def from_dict(schema: type[T], data: Mapping[str, Any], source: str = "config", partial: bool = False) -> T:
    """Validate a plain dict against a dataclass schema and build it; errors name the key and the valid ones.

    With `partial=True` missing required keys are allowed (for base files) and a dict may come back.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    return _build(schema, data, "", source, partial)


def to_dict(cfg: Any) -> Any:
    """Plain YAML-friendly data (dicts, lists, scalars) from a config dataclass (or any nesting of them)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


# ---------------------------------------------------------------- named configs, load, dump


def config_names(subdir: str | None = None) -> dict[str, Path]:
    """Shipped configs by name: `models/sana-600m-1024` and, where unique, the short `sana-600m-1024`."""
    root = CONFIG_DIR if subdir is None else CONFIG_DIR / subdir
    if not root.is_dir():
        return {}
    names: dict[str, Path] = {}
    stems: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        names[path.relative_to(CONFIG_DIR).with_suffix("").as_posix()] = path
        stems.setdefault(path.stem, []).append(path)
    for stem, paths in stems.items():
        if len(paths) == 1:
            names.setdefault(stem, paths[0])
    return names


def find_config(ref: str | os.PathLike, subdir: str | None = None) -> Path:
    """A config file from a path, or from the name of a shipped config (unknown names list the choices)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    names = config_names(subdir)
    if str(ref) in names:
        return names[str(ref)]
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a YAML file; pass a .yaml file or a shipped config name")
    if path.suffix in (".yaml", ".yml") or os.sep in str(ref):
        raise ConfigError(f"config file {path} not found")
    short = sorted(n for n in names if "/" not in n) or sorted(names)
    raise unknown_choice("config", str(ref), short)


def load_config(ref: str | os.PathLike, schema: type[T], overrides: Iterable[str] = ()) -> T:
    """Load a YAML config (path or shipped name) with its bases, apply dotted overrides, validate into `schema`."""
    path = find_config(ref)
    overrides = list(overrides or ())
    tree = apply_overrides(load_yaml_tree(path), overrides)
    source = f"{path} with the options given" if overrides else str(path)
    return from_dict(schema, tree, source=source)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a (resolved) config as YAML, atomically, e.g. beside a run's outputs."""
    data = to_dict(cfg)
    header = f"# resolved {type(cfg).__name__} written by sanaflow\n" if dataclasses.is_dataclass(cfg) else ""
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def model_specs() -> list[str]:
    """Names of the model specs shipped in sanaflow/configs/models."""
    return sorted(n for n in config_names("models") if "/" not in n)


def model_spec(name: str, overrides: Iterable[str] = ()) -> ModelSpec:
    """The named model spec (or a spec YAML file's path); unknown names raise a ConfigError listing them."""
    path = Path(name).expanduser()
    if not path.is_file():
        names = config_names("models")
        if name not in names:
            raise unknown_choice("model spec", name, model_specs())
        path = names[name]
    tree = apply_overrides(load_yaml_tree(path), overrides)
    return from_dict(ModelSpec, tree, source=str(path))
