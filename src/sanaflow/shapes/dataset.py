"""The training stream: (image, caption) pairs drawn from the shapes world, endless and resumable.

Sample k of a run is fully determined by (seed, k): its scene is `sample_scene(derive_seed(seed, k),
split)`. Global index k belongs to rank ``k % world_size``; within a rank, DataLoader workers take
whole batches in turn (worker w renders the rank's local batches w, w + W, w + 2W, ...), which is
exactly the order in which a DataLoader collects them, so the batches a rank sees do not depend on
the number of workers, no two workers or ranks ever render the same sample, and resuming needs only
the number of samples a rank has consumed (`start_index`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InputError, unknown_choice
from .render import render, to_tensor
from .scene import SPLITS, Scene, derive_seed, sample_scene


class ShapesDataset(IterableDataset):
    """Endless (image (3, H, W) float in [-1, 1], caption) stream; with `return_scene`, also the scene JSON.

    With `uint8=True` images are uint8 (3, H, W) tensors (convert with ``x.float() / 127.5 - 1``).
    """

    def __init__(
        self,
        size: int = 256,
        seed: int = 0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        start_index: int = 0,
        num_samples: int | None = None,
        return_scene: bool = False,
        uint8: bool = False,
    ):
        if split not in ("train", "eval"):
            raise unknown_choice("split", split, ("train", "eval"))
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size < 1 or start_index < 0 or seed < 0:
            raise InputError(
                f"batch_size must be >= 1, start_index and seed >= 0; got {batch_size}, {start_index}, {seed}"
            )
        if num_samples is not None and num_samples < 0:
            raise InputError(f"num_samples must be >= 0, got {num_samples}")
        self.size = size
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.start_index = start_index
        self.num_samples = num_samples
        self.return_scene = return_scene
        self.uint8 = uint8

    # -- positions ----------------------------------------------------------------------------

    def global_index(self, local_index: int) -> int:
        """The run-wide sample index of this rank's `local_index`-th sample."""
        return local_index * self.world_size + self.rank

    def scene_at(self, local_index: int) -> Scene:
        """The scene of this rank's `local_index`-th sample (no rendering)."""
        return sample_scene(
            derive_seed(self.seed, SPLITS[self.split], self.global_index(local_index)), self.split
        )

    def local_indices(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The local indices worker `worker` of `num_workers` yields, in order (whole batches in turn)."""
        end = None if self.num_samples is None else self.start_index + self.num_samples
        b = self.batch_size
        i = self.start_index + worker * b
        while end is None or i < end:
            yield from range(i, i + b if end is None else min(i + b, end))
            i += num_workers * b

    def state_dict(self, consumed: int = 0) -> dict:
        """The position after this rank has consumed `consumed` more samples (resume with `load_state_dict`)."""
        return {
            "seed": self.seed,
            "split": self.split,
            "world_size": self.world_size,
            "rank": self.rank,
            "index": self.start_index + consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` position; seed, split and world size must match."""
        for key in ("seed", "split", "world_size", "rank"):
            if state.get(key) != getattr(self, key):
                raise InputError(
                    f"shapes stream state has {key}={state.get(key)!r}, this stream has {getattr(self, key)!r}"
                )
        self.start_index = int(state["index"])

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in self.local_indices(worker, num_workers):
            scene = self.scene_at(i)
            pixels = render(scene, self.size)  # (H, W, 3) uint8
            # uint8 moves 4x fewer bytes between processes; scale to [-1, 1] on the GPU then.
            image = (
                torch.from_numpy(pixels).permute(2, 0, 1) if self.uint8 else to_tensor(pixels)
            )  # (3, H, W)
            if self.return_scene:
                yield image, scene.caption(), scene.to_json()
            else:
                yield image, scene.caption()

    def batch(self, local_start: int, count: int) -> tuple[np.ndarray, list[str]]:
        """Render `count` consecutive samples of this rank at once -> (uint8 (B, H, W, 3), captions)."""
        from .render import render_batch

        scenes = [self.scene_at(i) for i in range(local_start, local_start + count)]
        return render_batch(scenes, self.size), [s.caption() for s in scenes]
