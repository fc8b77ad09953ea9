"""Resolve model references and load / save models in the diffusers folder layout.

A model reference is, in this order: a local folder, a built-in name (the embedded default model),
or a Hugging Face hub repo id (downloaded through huggingface_hub when online). Weights are
safetensors, one file or sharded with an index; pickle checkpoints are refused unless the caller
passes ``allow_pickle=True``. Models are built on the meta device and filled with
``load_state_dict(assign=True)``, so loading never allocates random weights first.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, InputError, suggest
from .utils import atomic_path, atomic_write_text, check_folder_writable, staged_files

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers version whose folder layout we write
# config.json entry of a quantized model folder (written by sanaflow.quant.save_quantized)
QUANTIZATION_KEY = "_sanaflow_quantization"

# Built-in model names -> folder inside the installed package (see sanaflow/assets/).
BUILTIN_MODELS: dict[str, str] = {
    "sanaflow/shapes-tiny": "shapes-tiny",
}
DEFAULT_MODEL = "sanaflow/shapes-tiny"
# Files of a hub repo that loading never reads (sample images and videos of model cards).
_MEDIA_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".webm", ".mov")

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="ModelMixin")


# --------------------------------------------------------------------------------------------
# Reference resolution
# --------------------------------------------------------------------------------------------


def builtin_path(name: str) -> Path | None:
    """Folder of a built-in model (installed with the package), or None for other names."""
    folder = BUILTIN_MODELS.get(name)
    if folder is None:
        return None
    return Path(str(resources.files("sanaflow") / "assets" / folder))


def resolve_model_path(ref: str | os.PathLike | None, subfolder: str | None = None,
                       variant: str | None = None) -> Path:
    """Return the local folder holding model `ref` (local path, built-in name, or hub repo id).

    `None` means the embedded default model. Hub repos are downloaded with huggingface_hub;
    when that is impossible (offline, unknown repo) a `CheckpointError` says so. A download
    fetches one set of weights per folder (`variant`'s where the folder has them, else the
    default ones; see `select_repo_files`), not every precision a repo offers.
    """
    variant = check_variant(variant)
    ref = DEFAULT_MODEL if ref is None else ref
    if not isinstance(ref, (str, os.PathLike)) or not str(ref).strip():
        raise InputError(f"a model reference is a folder path, a built-in name or a hub repo id (a non-empty "
                         f"string or path), got {type(ref).__name__} {ref!r}")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model reference {str(ref)!r} is a file; expected a folder in diffusers layout")
        root = path
    elif (builtin := builtin_path(str(ref))) is not None:
        if not builtin.is_dir():
            raise CheckpointError(f"built-in model {str(ref)!r} is not installed (missing {builtin})")
        root = builtin
    elif (spec_ref := _spec_reference(str(ref))) is not None:
        return resolve_model_path(spec_ref, subfolder, variant)
    else:
        root = _download(str(ref), subfolder, variant)
    if subfolder:
        sub = root / subfolder
        if not sub.is_dir():
            raise CheckpointError(f"{root} has no subfolder {subfolder!r}")
        return sub
    return root


def _spec_reference(name: str) -> str | None:
    """The model a shipped model-spec name stands for (`sana-600m-1024` -> its hub repo), or None."""
    if "/" in name or name.startswith((".", "~")):
        return None
    from .config import config_names, model_spec

    if name not in config_names("models"):
        return None
    spec = model_spec(name)
    if spec.repo is not None:
        return spec.repo
    return DEFAULT_MODEL if name == "shapes-tiny" else None


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~"))


def select_repo_files(files: list[str], subfolder: str | None = None, variant: str | None = None) -> list[str]:
    """The files of a hub repo listing (paths with '/') that loading reads, for `allow_patterns`.

    Everything but weights and media files, plus in each folder one set of safetensors weights:
    `variant`'s when the folder has them, else the default (variant-less) ones, else the only
    variant there is. Pickle checkpoints are fetched only for a model folder (config.json) without
    safetensors, never for loose checkpoint folders.
    With `subfolder`, only that folder (and model_index.json).
    """
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(posixpath.dirname(f), []).append(f)
    keep: list[str] = []
    for folder, names in sorted(folders.items()):
        if subfolder and not (folder == subfolder or folder.startswith(subfolder.rstrip("/") + "/")):
            keep += [f for f in names if f == "model_index.json"]
            continue
        weights = {f: v for f in names if (v := weight_file_variant(posixpath.basename(f))) is not None}
        pickles = [f for f in names if f.endswith(PICKLE_SUFFIXES) or ".bin.index" in f]
        keep += [f for f in names if f not in weights and f not in pickles and not f.lower().endswith(_MEDIA_SUFFIXES)]
        present = set(weights.values())
        if variant is not None and variant in present:
            chosen = {variant}
        elif _NO_VARIANT in present:
            chosen = {_NO_VARIANT}
        else:
            chosen = present  # one variant, or several for the loader to ask which
        keep += [f for f, v in weights.items() if v in chosen]
        if not weights and posixpath.join(folder, CONFIG_NAME).lstrip("/") in names:
            keep += pickles  # a model folder with pickle weights only (loading says whether it may read them)
    return sorted(keep)


def _download(ref: str, subfolder: str | None, variant: str | None = None) -> Path:
    if not _looks_like_repo_id(ref):
        from .config import model_specs

        specs = model_specs()
        raise CheckpointError(
            f"model {ref!r} not found{suggest(ref, specs)}: it is not a local folder, not a built-in model "
            f"({', '.join(BUILTIN_MODELS)}), not a model spec ({', '.join(specs)}) and not a hub repo id "
            "of the form 'owner/name'"
        )
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a hard dependency
        raise CheckpointError(f"cannot download {ref!r}: huggingface_hub is not installed") from e
    patterns = None
    if subfolder:
        patterns = [f"{subfolder}/*", "model_index.json"]
    # Read the switch now, not at huggingface_hub's import: a caller (or a test) may set it later.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        if not offline:  # fetch one precision per folder, not all of them (offline: whatever is cached)
            patterns = select_repo_files(HfApi().list_repo_files(ref), subfolder, variant)
        return Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # huggingface_hub raises many types: offline, 404, gated, auth
        if offline:
            raise CheckpointError(
                f"model {ref!r} is not a local folder and is not in the hub cache, and the hub is offline "
                "(HF_HUB_OFFLINE is set); pass a local diffusers-format folder, or unset HF_HUB_OFFLINE "
                "on a machine with network access"
            ) from e
        raise CheckpointError(
            f"model {ref!r} is not a local folder and could not be downloaded from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); "
            "pass a local diffusers-format folder or connect to the network"
        ) from e


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, raising `CheckpointError` when missing or malformed."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected the JSON file {path.name}")
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


class FrozenConfig(Mapping[str, Any]):
    """Read-only constructor arguments of a model, reachable as keys and as attributes."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, name: str) -> Any:
        # Private and dunder names are never config keys. Refusing them also keeps copy / pickle
        # (which probe __deepcopy__, __setstate__ ... on an instance whose _data is not set yet)
        # from recursing through self._data.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("model configs are read-only; build a new model instead")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict copy, JSON-serialisable."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._data.items()}

    def __repr__(self) -> str:
        return f"FrozenConfig({self._data!r})"

    def __reduce__(self):
        # copy.deepcopy and pickle rebuild through __init__ (__setattr__ refuses plain state restoring).
        return (type(self), (self._data,))


def register_to_config(init: Callable) -> Callable:
    """Decorate a model's ``__init__`` so that its bound arguments become ``self.config``."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        init(self, *args, **kwargs)
        object.__setattr__(self, "_config", FrozenConfig(values))

    return wrapper


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
        raise CheckpointError(f"cannot read weights file {path} (truncated or corrupt?): {e}") from e


# Weight file names: "<base>[.<variant>][-00001-of-00002].safetensors" and the shard index
# "<base>.safetensors.index[.<variant>].json" (diffusers' and transformers' variant naming, e.g.
# diffusion_pytorch_model.fp16.safetensors, model.safetensors.index.bf16.json).
_VARIANT = r"[A-Za-z0-9_]+"
_WEIGHT_FILE = re.compile(rf"^(?P<base>[^.]+?)(?:\.(?P<variant>{_VARIANT}))?(?:-\d{{5}}-of-\d{{5}})?\.safetensors$")
_INDEX_FILE = re.compile(rf"^(?P<base>[^.]+)\.safetensors\.index(?:\.(?P<variant>{_VARIANT}))?\.json$")
_NO_VARIANT = ""  # the variant of the default (variant-less) weight files


def weight_file_variant(name: str) -> str | None:
    """The variant of a safetensors weight or index file name ("" for the default files); None if not one."""
    m = _WEIGHT_FILE.match(name) or _INDEX_FILE.match(name)
    return None if m is None else (m.group("variant") or _NO_VARIANT)


def weight_variants(folder: Path) -> set[str]:
    """The variants of the safetensors weights in `folder` ("" stands for the default, variant-less files)."""
    if not folder.is_dir():
        return set()
    return {v for p in folder.iterdir() if p.is_file() and (v := weight_file_variant(p.name)) is not None}


def check_variant(variant: Any) -> str | None:
    """`variant` (e.g. "fp16", "bf16") checked: None or a name of letters, digits and underscores."""
    if variant is None:
        return None
    if not isinstance(variant, str) or not re.fullmatch(_VARIANT, variant):
        raise InputError(f"variant must be a weight-file variant name such as 'fp16' or 'bf16' (letters, digits, "
                         f"underscores), got {variant!r}")
    return variant


def component_variant(folder: Path, variant: str | None) -> str | None:
    """The variant to load a pipeline component's weights with: `variant` where `folder` has it, else
    None (the default weights; a warning when `variant` was asked for), or the folder's only variant
    when it holds no default weights. diffusers' pipelines treat components saved without a variant alike."""
    present = weight_variants(folder)
    if variant is not None and variant in present:
        return variant
    if variant is not None and present:
        logger.warning("%s has no %r variant weights; loading its %s weights", folder, variant,
                       "default" if _NO_VARIANT in present else "only")
    return _sole_variant(present)


def _sole_variant(present: set[str]) -> str | None:
    # The variant a folder's weights must be read with when none is asked for: its only one, if it has
    # no default (variant-less) weights; else None.
    return next(iter(present)) if len(present) == 1 and _NO_VARIANT not in present else None


def _index_shards(index: Path) -> list[Path]:
    """The shard files a *.safetensors.index*.json names (all present in its folder)."""
    folder = index.parent
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map'")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v or Path(v).name != v]
    if bad:
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names in the "
                              f"folder; bad entries: {_abbrev([f'{k}: {weight_map[k]!r}' for k in bad])}")
    shards = sorted({folder / v for v in weight_map.values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
    return shards


def _variant_weight_files(folder: Path, variant: str) -> list[Path] | None:
    # The files of one variant under the standard names, or None when the folder has none.
    for name in WEIGHTS_NAMES:
        stem = name[: -len(".safetensors")]
        index = folder / f"{name}.index.{variant}.json"
        if index.is_file():
            return _index_shards(index)
        if (folder / f"{stem}.{variant}.safetensors").is_file():
            return [folder / f"{stem}.{variant}.safetensors"]
    return None


def find_weight_files(folder: Path, allow_pickle: bool = False, variant: str | None = None) -> list[Path]:
    """The weight files of a model folder: one safetensors file, or the shards of an index.

    `variant` ("fp16", "bf16", ...) picks diffusers' variant files (``<name>.<variant>.safetensors`` or
    ``<name>.safetensors.index.<variant>.json``) instead of the default ones. Without it, a folder that
    holds only the files of a single variant loads those.
    """
    variant = check_variant(variant)
    if variant is not None:
        files = _variant_weight_files(folder, variant)
        if files is not None:
            return files
        present = sorted(v or "(default)" for v in weight_variants(folder))
        raise CheckpointError(
            f"no {variant!r} variant weights in {folder}: expected diffusion_pytorch_model.{variant}.safetensors "
            f"or a sharded *.safetensors.index.{variant}.json; the folder holds "
            + (f"these variants: {', '.join(present)}" if present else "no safetensors weights")
        )
    for name in WEIGHTS_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            return _index_shards(index)
        if (folder / name).is_file():
            return [folder / name]
    weights = sorted(p for p in folder.glob("*.safetensors"))
    default = [p for p in weights if weight_file_variant(p.name) in (_NO_VARIANT, None)]
    if len(default) == 1:
        return default
    if len(default) > 1:
        raise CheckpointError(
            f"{folder} holds several safetensors files ({', '.join(p.name for p in default)}) but no "
            f"*.safetensors.index.json saying how they combine; expected {' or '.join(WEIGHTS_NAMES)}"
        )
    variants = sorted(weight_variants(folder) - {_NO_VARIANT})
    if (sole := _sole_variant(set(variants))) is not None:
        files = _variant_weight_files(folder, sole)
        if files is not None:
            return files
        if len(weights) == 1:  # one file of an unusual name, e.g. weights.ema.safetensors
            return weights
    elif variants:
        raise CheckpointError(
            f"{folder} holds only variant weights ({', '.join(variants)}) and no default ones; pick one with "
            f"variant= (--variant on the command line)"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        if allow_pickle:
            return pickles[:1]
        raise CheckpointError(
            f"{folder} holds only pickle checkpoint(s) ({', '.join(p.name for p in pickles)}), which can run "
            "arbitrary code when loaded; convert them to safetensors or pass allow_pickle=True"
        )
    raise CheckpointError(
        f"no weights in {folder}: expected {' or '.join(WEIGHTS_NAMES)} (or a sharded *.safetensors.index.json)"
    )


def load_state_dict_files(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read and merge the tensors of safetensors files (or one pickle file, when allowed)."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = _safetensors_load(f)
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot read pickle checkpoint {f}: {e}") from e
            part = part.get("state_dict", part) if isinstance(part, dict) else part
            if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
                raise CheckpointError(f"pickle checkpoint {f} does not hold a state dict of tensors "
                                      f"(got {type(part).__name__})")
        state.update(part)
    return state


def save_state_dict(state: Mapping[str, torch.Tensor], folder: Path, name: str, max_shard_bytes: int | None) -> None:
    """Write `state` as `name` (one file) or as shards with an index when above `max_shard_bytes`."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    stem, ext = name.rsplit(".", 1)
    # Files of an earlier save into the same folder: a leftover index would shadow a new single
    # file (the index is looked up first), and leftover shards would mix two checkpoints.
    stale = _weight_files(folder, name)
    if max_shard_bytes is None or total <= max_shard_bytes:
        with atomic_path(folder / name) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        _remove(stale - {folder / name})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        shard_name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        with atomic_path(folder / shard_name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: shard_name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(folder / f"{name}.index.json", json.dumps(index, indent=2))
    _remove(stale - {folder / f"{name}.index.json"} - {folder / n for n in weight_map.values()})


def _weight_files(folder: Path, name: str) -> set[Path]:
    """The weights files of model `name` (single file, shards and shard index) in `folder`."""
    stem, ext = name.rsplit(".", 1)
    return {p for p in {*folder.glob(f"{stem}-*-of-*.{ext}"), folder / f"{name}.index.json", folder / name}
            if p.is_file()}


def _remove(paths: set[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def wrap_output(value: torch.Tensor, return_dict: bool | None, output_cls: Callable[[torch.Tensor], Any]) -> Any:
    """A model's result as its caller asked: the tensor (None, sanaflow's default), diffusers' output
    object (True: `output_cls(value)`) or the tuple ``(value,)`` (False), as diffusers' ``return_dict``."""
    if return_dict is None:
        return value
    return output_cls(value) if return_dict else (value,)


# --------------------------------------------------------------------------------------------
# The model mixin
# --------------------------------------------------------------------------------------------


def check_load_arguments(torch_dtype: Any, device: Any) -> tuple[torch.dtype | None, torch.device | None]:
    """`torch_dtype` and `device` of a load, checked before any file is read: (dtype, torch.device or None)."""
    if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
        raise ConfigError(f"torch_dtype must be a floating-point torch.dtype such as torch.bfloat16, got {torch_dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
        if device.type not in ("cpu", "cuda", "mps"):  # meta holds no weights; xla, ... are not built in
            raise ConfigError(f"unsupported device {str(device)!r}; use cpu, cuda, cuda:N or mps")
        # checked here, before any weights load: `model.to` would fail with torch's driver error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} requested but CUDA is not available "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise InputError(f"device {str(device)!r} requested but only {n} CUDA device(s) are visible; "
                             f"use cuda:0 to cuda:{n - 1}, or device='cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"device {str(device)!r} requested but MPS is not available "
                             "(torch.backends.mps.is_available() is False); use device='cpu'")
    return torch_dtype, device


class ModelMixin(nn.Module):
    """Config, ``from_pretrained`` and ``save_pretrained`` in diffusers' folder layout.

    Subclasses decorate ``__init__`` with `register_to_config` and set ``diffusers_class_name``
    (written as ``_class_name`` in config.json) and ``weights_name``.
    """

    diffusers_class_name: str = ""
    weights_name: str = "diffusion_pytorch_model.safetensors"

    @property
    def config(self) -> FrozenConfig:
        """The constructor arguments (diffusers' config.json keys)."""
        return self._config

    @classmethod
    def config_keys(cls) -> list[str]:
        """The keys a config.json for this class may hold (its constructor arguments)."""
        init = inspect.unwrap(cls.__init__)
        return [p for p in inspect.signature(init).parameters if p != "self"]

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
        """Drop diffusers' bookkeeping keys (``_class_name`` ...), reject unknown keys by name."""
        if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
            raise ConfigError(f"{source}: a {cls.__name__} config must be a mapping of key names (str) to values, "
                              f"got {type(config).__name__}")
        valid = cls.config_keys()
        clean = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = [k for k in clean if k not in valid]
        if unknown:
            hints = "; ".join(f"{k!r}{suggest(k, valid)}" for k in unknown)
            raise ConfigError(
                f"{source}: unknown key(s) for {cls.__name__}: {hints}; valid keys: {', '.join(valid)}"
            )
        params = inspect.signature(inspect.unwrap(cls.__init__)).parameters
        required = [
            k for k in valid
            if params[k].default is inspect.Parameter.empty
            and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and k not in clean
        ]
        if required:
            raise ConfigError(f"{source}: missing required key(s) for {cls.__name__}: {', '.join(map(repr, required))}")
        wrong = [f"{k}={clean[k]!r} ({params[k].annotation} expected)" for k in clean
                 if not _matches_annotation(clean[k], params[k].annotation)]
        if wrong:
            raise ConfigError(f"{source}: wrong value type for {cls.__name__}: {'; '.join(wrong)}")
        # Sizes, counts and factors: no model key takes a negative or non-finite number.
        bad = [f"{k}={v!r}" for k, v in clean.items() if not _non_negative(v)]
        if bad:
            raise ConfigError(f"{source}: {cls.__name__} takes no negative or non-finite numbers: {'; '.join(bad)}")
        zero = [f"{k}={v!r}" for k, v in clean.items() if is_model_size_key(k) and not _at_least_one(v)]
        zero += [f"{k}={v!r}" for k, v in clean.items() if k in MODEL_POSITIVE and v is not None and v == 0]
        if zero:
            raise ConfigError(f"{source}: {cls.__name__} sizes and counts must be >= 1 and its factors "
                              f"({', '.join(MODEL_POSITIVE)}) > 0: {'; '.join(zero)}")
        return clean

    @classmethod
    def _build(cls: type[T], config: Mapping[str, Any], source: str) -> T:
        """`cls(**config)`, with the constructor's own refusals of a value turned into a `ConfigError`."""
        try:
            return cls(**config)
        except (TypeError, ValueError, ZeroDivisionError, AssertionError, RuntimeError) as e:
            raise ConfigError(f"{source}: invalid config for {cls.__name__}: {e}") from e

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any], source: str = "config") -> T:
        """Build a randomly initialised model from a config mapping (validated)."""
        return cls._build(cls.validate_config(config, source), source)

    def _init_computed_buffers(self) -> None:
        """Recompute buffers that are not stored in checkpoints (after loading on meta)."""

    @classmethod
    def from_pretrained(
        cls: type[T],
        ref: str | os.PathLike | None,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
        variant: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> T:
        """Load a model from a diffusers-format folder, a built-in name or a hub repo id.

        `variant` ("fp16", "bf16", ...) loads diffusers' variant weight files, as diffusers'
        ``from_pretrained(variant=...)`` does; the model is cast to `torch_dtype` (default float32) either way.
        `dtype` is another name for `torch_dtype` (diffusers' newer spelling).
        """
        if dtype is not None:
            if torch_dtype is not None and torch_dtype != dtype:
                raise InputError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; pass one of them")
            torch_dtype = dtype
        torch_dtype, device = check_load_arguments(torch_dtype, device)
        folder = resolve_model_path(ref, subfolder, variant)  # checks `variant`
        config_path = folder / CONFIG_NAME
        raw_config = read_json(config_path)
        named = raw_config.get("_class_name") if isinstance(raw_config, Mapping) else None
        accepted = {cls.__name__, cls.diffusers_class_name} - {None, ""}
        if isinstance(named, str) and accepted and named not in accepted:
            raise CheckpointError(f"{config_path} describes a {named}, not a {' / '.join(sorted(accepted))}: "
                                  "is this the right folder (or subfolder) for this model?")
        if QUANTIZATION_KEY in raw_config:  # int8 / fp8 weights: the quantized layers are rebuilt first
            from .quant import load_quantized

            if variant is not None:
                raise CheckpointError(f"{folder} holds quantized sanaflow weights, which have no variants; "
                                      f"load it without variant={variant!r}")

            return load_quantized(cls, folder, torch_dtype=torch_dtype, device=device)
        config = cls.validate_config(raw_config, source=str(config_path))
        state = load_state_dict_files(find_weight_files(folder, allow_pickle=allow_pickle, variant=variant))
        dtype = torch_dtype or torch.float32
        with torch.device("meta"):
            model = cls._build(config, str(config_path))
        model.load_weights(state, dtype=dtype, source=str(folder))
        if device is not None:
            model.to(device)
        return model.eval()

    def load_weights(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, source: str = "") -> None:
        """Assign a full state dict (strict), checking keys and shapes with readable errors."""
        expected = self.state_dict(keep_vars=True)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        where = f" in {source}" if source else ""
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {_abbrev(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_abbrev(unexpected)}")
            raise CheckpointError(
                f"checkpoint{where} does not match {type(self).__name__} (another architecture or config?): "
                + "; ".join(parts)
            )
        wrong = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(state[k].shape) != tuple(v.shape)
        ]
        if wrong:
            raise CheckpointError(f"checkpoint{where} has tensors of the wrong shape: {_abbrev(wrong)}")
        not_float = [f"{k} ({state[k].dtype})" for k, v in expected.items()
                     if v.is_floating_point() and not state[k].is_floating_point()]
        if not_float:
            raise CheckpointError(f"checkpoint{where} holds non-floating-point tensors where the model has "
                                  f"weights: {_abbrev(not_float)}")
        cast = {}
        for k, v in state.items():
            ref = expected[k]
            target = dtype if (dtype is not None and v.is_floating_point()) else None
            if target is None and ref.is_floating_point() and v.is_floating_point() and ref.device.type != "meta":
                target = ref.dtype
            cast[k] = v.to(target) if target is not None else v
        self.load_state_dict(cast, strict=True, assign=True)
        leftovers = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftovers:
            self._init_computed_buffers()
            leftovers = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftovers:
            raise CheckpointError(f"checkpoint{where} left tensors uninitialised: {_abbrev(leftovers)}")

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | None = 5 * 2**30) -> Path:
        """Write ``config.json`` and safetensors weights (sharded above `max_shard_size`: bytes or "5GB").

        Everything is written into a staging folder beside `path` first and then moved in (config.json
        last), so a failed save leaves `path` as it was: no empty folder, no weights without a config.
        Other files in `path` stay; the weights of an earlier save there are replaced.
        """
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise InputError(f"save_pretrained needs a folder path, got {path!r}")
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"cannot save a model into {folder}: it is a file, not a folder")
        max_shard_size = parse_size_bytes(max_shard_size)
        check_folder_writable(folder, f"a model into {folder}")
        state = self.state_dict()
        if any(t.is_meta for t in state.values()):
            raise InputError(f"cannot save {type(self).__name__}: its weights are on the meta device (no data); "
                             "load or initialise them first")
        config = {"_class_name": self.diffusers_class_name or type(self).__name__,
                  "_diffusers_version": DIFFUSERS_VERSION}
        config.update(_jsonable(self.config.to_dict()))
        with staged_files(folder, last=CONFIG_NAME) as staging:
            save_state_dict(state, staging, self.weights_name, max_shard_size)
            atomic_write_text(staging / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=False) + "\n")
            # an earlier save's weights that the new files do not replace: a leftover index would
            # shadow a new single file, leftover shards would mix two checkpoints
            stale = _weight_files(folder, self.weights_name) - {folder / f.name for f in staging.iterdir()}
        _remove(stale)
        return folder

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (or buffer), as in diffusers."""
        for t in [*self.parameters(), *self.buffers()]:
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's first floating-point parameter (or buffer), as in diffusers."""
        for t in [*self.parameters(), *self.buffers()]:
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size_bytes(size: int | str | None) -> int | None:
    """A shard size in bytes: an int > 0, a string such as "5GB" / "500MB" / "2GiB" (as diffusers takes), or None."""
    if size is None:
        return None
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
        if m is None:
            raise InputError(f"max_shard_size {size!r} is not a size; use bytes (an int) or e.g. '5GB', '500MB'")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"max_shard_size must be a positive number of bytes (or None: one file), got {size!r}")
    return size


_KINDS = {"None": (type(None),), "bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
          "tuple": (list, tuple), "list": (list, tuple)}


def _matches_annotation(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a constructor annotation such as "int | None" or "str | tuple[str, ...]".

    Only the outer type is checked (the constructor checks the rest); unknown annotations accept anything.
    """
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    outer = [part.strip().split("[", 1)[0] for part in _split_union(text)]
    if not outer or any(o not in _KINDS for o in outer):
        return True
    if isinstance(value, bool):
        return "bool" in outer
    return any(isinstance(value, _KINDS[o]) for o in outer)


# Model config keys (diffusers names, every model) that are sizes or counts, matched by how the name
# ends: each integer in them (in lists too) must be >= 1; 0 would fail deep inside a constructor
# ("integer modulo by zero") or build an empty network. Keys where 0 is valid do not match
# (encoder/decoder_layers_per_block: 0 is an empty stage, as in DC-AE f64) or are exempt
# (out_channels: 0 or null = in_channels).
MODEL_SIZE_ENDINGS = ("channels", "heads", "head_dim", "attention_dim", "layers", "patch_size", "sample_size",
                      "multiscales")
MODEL_SIZE_EXEMPT = ("out_channels",)
# Model config keys that are real factors: finite and > 0 (0 divides by zero or gives width 0).
MODEL_POSITIVE = ("scaling_factor", "mlp_ratio", "interpolation_scale", "timestep_scale")


def is_model_size_key(key: str) -> bool:
    """True for a model config key holding sizes / counts (each integer >= 1)."""
    return key.endswith(MODEL_SIZE_ENDINGS) and key not in MODEL_SIZE_EXEMPT


def _at_least_one(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_at_least_one(v) for v in value)
    return not isinstance(value, int) or isinstance(value, bool) or value >= 1


def _non_negative(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return 0 <= value < float("inf")
    if isinstance(value, (list, tuple)):
        return all(_non_negative(v) for v in value)
    return True


def _split_union(text: str) -> list[str]:
    """'a | tuple[b | c, ...] | None' -> ['a', 'tuple[b | c, ...]', 'None'] (only top-level bars)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur] if cur.strip() else parts


def _abbrev(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... (+{len(items) - n} more)" if len(items) > n else "")
