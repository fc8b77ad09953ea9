"""Small shared helpers: atomic file output, output-folder checks."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Image files sanaflow reads (frame folders, training folders): PIL / OpenCV open all of them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The seeds torch.Generator.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A Python or NumPy real number (NaN and infinities included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def json_ready(value: object) -> object:
    """`value` with every NaN or infinite float (in dicts, lists, tuples) replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def dumps_json(value: object, **kwargs) -> str:
    """`json.dumps` that writes valid JSON: NaN / infinities become null (an empty group's accuracy, a
    diverged loss), and `allow_nan=False` makes any that slip through (a numpy scalar) an error, not NaN."""
    return json.dumps(json_ready(value), allow_nan=False, **kwargs)


def check_folder_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a `folder` files cannot be written into, without creating it.

    A missing folder is judged by its first existing ancestor, where the missing folders would be
    made: it must be a folder and take a (removed at once) probe file. `what` names the output in
    the message: "cannot write {what}: ...".
    """
    from .errors import InputError

    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {what}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write {what}: {existing}: {e.strerror or e}") from e


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it before Python 3.13 (os.getumask)
    os.umask(mask)
    return mask


def _normal_permissions(path: Path) -> None:
    """Give the files at `path` (a file, or every file under a folder) the mode a plain open() gives.

    Some writers (safetensors, anything built on mkstemp) create their files 0600; an output
    should be readable as the user's umask allows, like any other file they write.
    """
    mask = _umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    for f in files:
        mode = f.stat().st_mode & 0o7777
        wanted = (mode | 0o666) & ~mask & 0o7777  # keep execute bits, add read/write as the umask allows
        if wanted != mode:
            os.chmod(f, wanted)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield a staging folder beside `folder`; on success move its files into `folder`, `last` last.

    For outputs that add files to a folder that may hold others (a model saved into a folder, a
    dataset): the slow writing happens in the staging folder, so a failure leaves `folder` as it was
    (and no empty `folder` when this made it); the files then arrive by rename, the one named `last`
    (the file that says the set is complete: config.json, prompts.jsonl) after all the others.
    The yielded folder must hold plain files only.
    """
    folder = Path(folder)
    parent = folder.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    made = not folder.exists()
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        for f in sorted(staging.iterdir(), key=lambda f: f.name == last):
            _normal_permissions(f)
            os.replace(f, folder / f.name)
    except BaseException:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    Works for files and for folders: whatever the body writes at the temporary path replaces
    `path` in one rename, so an interrupted run never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _normal_permissions(tmp_path)
        if tmp_path.is_dir() and path.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
