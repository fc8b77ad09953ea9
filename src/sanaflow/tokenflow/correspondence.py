"""Token correspondences between frames: feature nearest neighbours (default) or optical flow.

The feature matcher is `attention.nearest_tokens` on the source branch's normalised self-attention
inputs. `FlowCorrespondence` is the alternative: OpenCV DIS optical flow between *source* frames,
resampled to each attention site's token grid, so frame i's token at p copies the keyframe token at
p + flow(p).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .attention import Matcher

CORRESPONDENCES = ("features", "flow")
FLOWS_CACHED = 32  # raw flows kept: a chunk of 8 frames x 2 anchors is 16 pairs


def _cached(store: OrderedDict, key: Any, limit: int, build: Callable[[], Any]) -> Any:
    """`store[key]`, built on a miss; least recently used entries go beyond `limit`."""
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = store[key] = build()
    if len(store) > limit:
        store.popitem(last=False)
    return value


class FlowCorrespondence:
    """DIS optical flow between source frames, as token indices on any token grid."""

    def __init__(self, frames: np.ndarray, max_cached: int = 4096):
        import cv2

        self.gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]  # T x (H, W) uint8
        self.height, self.width = frames.shape[1:3]
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.max_cached = max_cached
        # Token indices per (frame, target frame, grid height, grid width); small (N int64 each).
        self._index: OrderedDict[tuple[int, int, int, int], torch.Tensor] = OrderedDict()
        # Sampling grids per (frame, target frame, height, width) (2 x h x w floats each).
        self._grids: OrderedDict[tuple[int, int, int, int], torch.Tensor] = OrderedDict()
        # The last few raw flows (H x W x 2 floats each): one chunk's frame-anchor pairs, so the token
        # grids of every site and the output sampling grid of a pair share one DIS computation.
        self._flows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.max_flows = FLOWS_CACHED

    def flow(self, i: int, j: int) -> np.ndarray:
        """Flow (H, W, 2) in pixels: pixel p of frame i is at p + flow[p] in frame j."""
        if i == j:
            return np.zeros((self.height, self.width, 2), np.float32)
        return _cached(self._flows, (i, j), self.max_flows, lambda: self.dis.calc(self.gray[i], self.gray[j], None))

    def grid(self, tokens: int) -> tuple[int, int]:
        """Token grid (gh, gw) with gh * gw == tokens and the frames' aspect ratio."""
        # Downsampling rounds odd sides up, so pick the factorisation closest to the frames' aspect.
        aspect = math.log(self.height / self.width)
        divisors = [g for g in range(1, tokens + 1) if tokens % g == 0]
        gh = min(divisors, key=lambda g: abs(math.log(g * g / tokens) - aspect))
        gw = tokens // gh
        if abs(math.log(gh / gw) - aspect) > 0.5:
            raise ConfigError(f"{tokens} tokens do not form a grid with the frames' aspect ratio {self.width}x{self.height}")
        return gh, gw

    def token_index(self, i: int, j: int, tokens: int) -> torch.Tensor:
        """For each token of frame i (row-major grid of `tokens`), the index of its token in frame j."""
        gh, gw = self.grid(tokens)

        def build() -> torch.Tensor:
            flow = self._resized_flow(i, j, gh, gw)  # (gh, gw, 2) pixels
            ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
            tx = np.clip(np.round(xs + flow[..., 0] * gw / self.width), 0, gw - 1)
            ty = np.clip(np.round(ys + flow[..., 1] * gh / self.height), 0, gh - 1)
            return torch.from_numpy((ty * gw + tx).astype(np.int64).reshape(-1))  # (N,)

        return _cached(self._index, (i, j, gh, gw), self.max_cached, build)

    def sample_grid(self, i: int, j: int, height: int, width: int) -> torch.Tensor:
        """(height, width, 2) `grid_sample` coordinates (x, y in [-1, 1], align_corners=False): where each
        pixel of frame i's (height, width) latent grid lies in frame j, at sub-pixel precision."""

        def build() -> torch.Tensor:
            flow = self._resized_flow(i, j, height, width)  # (h, w, 2) pixels
            xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5 + flow[..., 0] * width / self.width) / width
            ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5 + flow[..., 1] * height / self.height) / height
            return torch.from_numpy(np.stack([xs * 2 - 1, ys * 2 - 1], axis=-1).astype(np.float32))

        return _cached(self._grids, (i, j, height, width), self.max_cached, build)

    def _resized_flow(self, i: int, j: int, height: int, width: int) -> np.ndarray:
        """The flow of frame i to j averaged onto a (height, width) grid, still in source pixels."""
        import cv2

        return cv2.resize(self.flow(i, j), (width, height), interpolation=cv2.INTER_AREA)

    def matcher(self, frames: Sequence[int], anchors: Sequence[int]) -> Matcher:
        """A propagation matcher for source frames `frames` copying from keyframes `anchors`."""

        def match(site: str, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            tokens = queries.shape[1]
            index = torch.stack(
                [torch.stack([self.token_index(f, a, tokens) for f in frames]) for a in anchors]
            )  # (A, n, N)
            return index.to(queries.device, non_blocking=True)  # a fresh host tensor: no sync needed

        return match
