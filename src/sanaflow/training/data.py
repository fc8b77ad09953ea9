"""Training data: the shapes stream and an image folder with .txt captions (aspect-ratio buckets).

Every source is indexed: sample (or batch) number k is a pure function of (seed, k). A run's data
position is therefore just the number of micro-batches consumed, and a resumed run sees exactly
the batches an uninterrupted run would have seen, whatever the number of DataLoader workers.
With several processes, micro-batch k of rank r is global batch k * world + r.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..errors import InputError
from ..utils import IMAGE_SUFFIXES

# --------------------------------------------------------------------------------------------
# Sources: global batch number -> list of items
# --------------------------------------------------------------------------------------------


class ShapesSource(Dataset):
    """The procedural shapes world ("train" split): item i is the scene of seed derive_seed(seed, i).

    The train split never draws a held-out colour-shape pair or states a held-out relation, and its
    seeds are mixed with the split id, so they never coincide with evaluation or video seeds.
    `category_weights` (see `DataConfig`) draws item i's caption category from its own seed first;
    without it the scene seed alone decides, every category equally often.
    """

    def __init__(self, resolution: int, seed: int = 0, batch_size: int = 1,
                 category_weights: dict[str, float] | None = None):
        from ..shapes.scene import CATEGORIES
        from .config import category_probabilities

        self.resolution, self.seed, self.batch_size = resolution, seed, batch_size
        self.category_probs = None if category_weights is None else category_probabilities(category_weights)
        # cumulative weights once, not per item (random.choices would rebuild them on every call)
        self._categories = CATEGORIES
        self._cum_probs = None if self.category_probs is None else list(itertools.accumulate(self.category_probs))

    def __len__(self) -> int:  # an endless stream; DataLoader only needs a length for len()
        return 2**62

    def batch_indices(self, batch: int) -> list[int]:
        """Item numbers of global batch `batch`."""
        return list(range(batch * self.batch_size, (batch + 1) * self.batch_size))

    def category(self, index: int) -> str | None:
        """Item `index`'s caption category under `category_weights` (None: left to the scene seed)."""
        if self._cum_probs is None:
            return None
        from ..shapes.scene import derive_seed

        # A stream of its own (salt 1), so the category does not correlate with the scene's draws.
        rng = random.Random(derive_seed(self.seed, index, 1))
        return rng.choices(self._categories, cum_weights=self._cum_probs)[0]

    def __getitem__(self, index: int) -> dict:
        from ..shapes.render import render
        from ..shapes.scene import derive_seed, sample_scene

        scene = sample_scene(derive_seed(self.seed, index), "train", category=self.category(index))
        image = render(scene, self.resolution)  # (H, W, 3) uint8
        return {"image": torch.from_numpy(image).permute(2, 0, 1), "caption": scene.caption()}


def bucket_sizes(resolution: int, multiple: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution**2 pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    out = set()
    h = multiple
    while h <= resolution * max_ratio:
        w = max(multiple, int(round(area / h / multiple)) * multiple)
        if max(h / w, w / h) <= max_ratio:
            out.add((h, w))
        h += multiple
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to height / width."""
    r = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - r))


def resize_crop(image, height: int, width: int) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, height, width): resize to cover, then centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W)


@dataclass
class FolderItem:
    """One image of a folder dataset."""

    path: Path
    caption: str
    bucket: tuple[int, int]


def scan_folder(root: str | os.PathLike, caption_ext: str = ".txt") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder tree; every image needs a caption file beside it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"dataset folder {str(root)!r} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    missing = [p for p in images if not p.with_suffix(caption_ext).is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise InputError(
            f"{len(missing)} of {len(images)} images in {root} have no caption file: {shown}"
            f"{' ...' if len(missing) > 3 else ''}; each image needs a same-named {caption_ext} file beside it"
        )
    pairs = []
    for p in images:
        caption = p.with_suffix(caption_ext).read_text(encoding="utf-8").strip()
        if not caption:
            raise InputError(f"caption file {p.with_suffix(caption_ext)} is empty")
        pairs.append((p, caption))
    return pairs


class FolderSource(Dataset):
    """Images with .txt captions, batched by aspect-ratio bucket.

    Each epoch shuffles the images of every bucket with a seeded RNG, cuts them into full batches
    (an incomplete tail is dropped), and shuffles the batch order; global batch k is batch
    k mod n of epoch k // n. With ``buckets=False`` every image is cropped to a square.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, batch_size: int, seed: int = 0,
                 caption_ext: str = ".txt", buckets: bool = True, multiple: int = 32,
                 cache_dir: str | os.PathLike | None = None, pairs: list[tuple[Path, str]] | None = None):
        # `pairs`: the result of scan_folder(root, caption_ext) when the caller has already scanned it.
        from PIL import Image

        self.root = Path(root).expanduser()
        self.resolution, self.batch_size, self.seed = resolution, batch_size, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.buckets = bucket_sizes(resolution, multiple) if buckets else [(resolution, resolution)]
        self.items: list[FolderItem] = []
        for path, caption in scan_folder(self.root, caption_ext) if pairs is None else pairs:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except OSError as e:
                raise InputError(f"cannot read image {path}: {e}") from e
            self.items.append(FolderItem(path, caption, nearest_bucket(h, w, self.buckets)))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).append(i)
        self.by_bucket = dict(sorted(by_bucket.items()))
        self.batches_per_epoch = sum(len(v) // batch_size for v in self.by_bucket.values())
        if self.batches_per_epoch == 0:
            sizes = {f"{h}x{w}": len(v) for (h, w), v in self.by_bucket.items()}
            raise InputError(
                f"{self.root}: no aspect-ratio bucket holds a full batch of {batch_size} images (bucket sizes: {sizes}); "
                "lower train.batch_size or set data.buckets false"
            )
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of item indices, one bucket each) of `epoch`, in order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = []
        for idx in self.by_bucket.values():
            idx = list(idx)
            rng.shuffle(idx)
            batches += [idx[i:i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    def batch_indices(self, batch: int) -> list[int]:
        """Item indices of global batch `batch`."""
        epoch, k = divmod(batch, self.batches_per_epoch)
        return self.epoch_batches(epoch)[k]

    def cache_path(self, index: int) -> Path:
        """Where the cached latents / text features of item `index` live."""
        assert self.cache_dir is not None
        rel = self.items[index].path.relative_to(self.root)
        return self.cache_dir / rel.with_suffix(".safetensors")

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.cache_dir is not None and self.cache_path(index).is_file():
            from safetensors.torch import load_file

            cached = load_file(str(self.cache_path(index)))
            return {"latents": cached["latents"], "hidden": cached["hidden"], "mask": cached["mask"],
                    "caption": item.caption}
        from PIL import Image

        with Image.open(item.path) as im:
            image = resize_crop(im, *item.bucket)
        return {"image": image, "caption": item.caption}


# --------------------------------------------------------------------------------------------
# Sampler and loader
# --------------------------------------------------------------------------------------------


class BatchPositionSampler(Sampler[list[int]]):
    """Yields the item indices of micro-batches start, start + 1, ... for one rank (endless)."""

    def __init__(self, source, start: int = 0, rank: int = 0, world: int = 1):
        self.source, self.start, self.rank, self.world = source, start, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            yield self.source.batch_indices(k * self.world + self.rank)
            k += 1

    def __len__(self) -> int:  # endless; a large number keeps DataLoader's len() working
        return 2**62


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    # default_collate stacks straight into shared memory inside a worker (no second copy when the
    # batch is sent to the main process). Images (3, H, W) that are views of (H, W, 3) renders are
    # stacked in their HWC memory, a plain copy, and returned as a (B, 3, H, W) channels-last view,
    # which is the layout the DC-AE's convolutions want on the GPU (stacking the strided views
    # into NCHW costs ~3x more here, and the GPU would transpose them back).
    first = tensors[0]
    if first.dim() == 3 and first.permute(1, 2, 0).is_contiguous() and not first.is_contiguous():
        return default_collate([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return default_collate(tensors)


def collate(items: list[dict]) -> dict:
    """Stack tensors (images channels-last), keep captions as a list."""
    out: dict = {"caption": [it["caption"] for it in items]}
    for key in items[0]:
        if key != "caption":
            out[key] = _stack([it[key] for it in items])
    return out


def _worker_init(_: int) -> None:
    # One thread per worker: the workers already use every core, and OpenCV's / torch's own thread
    # pools inside each of them would oversubscribe the CPU (renders are small). 0, not 1: 0 turns
    # OpenCV's threading off (its functions run sequentially), while 1 rebuilds its pthreads pool,
    # which deadlocks inside a DataLoader worker (opencv-python 5.x: the first batch never came).
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(source, start: int, rank: int, world: int, num_workers: int) -> DataLoader:
    """A DataLoader over `source` from micro-batch `start` for this rank."""
    sampler = BatchPositionSampler(source, start, rank, world)
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": 4, "persistent_workers": False, "worker_init_fn": _worker_init}
    # A private generator: creating the loader's iterator must not consume the global RNG, whose
    # state a resumed run restores exactly (items are pure functions of their index anyway).
    generator = torch.Generator().manual_seed(start * max(1, world) + rank)
    return DataLoader(source, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), generator=generator, **kwargs)
