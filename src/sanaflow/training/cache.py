"""Device-side caches of the training step: text features per caption, and a pool of prepared samples.

- `TextFeatureCache`: the frozen text encoder's features of every caption seen, in one table on the
  training device. A caption is tokenized and encoded once; later batches only gather rows. The
  shapes grammar repeats its captions (a few hundred distinct ones per 1,000 scenes), so after the
  first few thousand steps nearly every caption is a hit and no tokenizer or encoder runs.
- `SamplePool`: a sliding window of prepared samples (latents + text features) on the device. Each
  step draws a batch from the window at random and replaces its oldest chunk by fresh samples of
  the stream, so a rendered + DC-AE-encoded scene is trained on ``reuse`` times on average (each
  time with new noise, timestep and caption dropout) while the data still streams.

Both are exact under resume: the cache encodes misses in blocks of a fixed size (so a caption's
features do not depend on which other captions shared its block), and the pool's content at
micro-batch k is a pure function of k (chunks k .. k + M - 1 of the stream, chunk c in slot c mod M),
drawn with the global torch RNG that checkpoints save.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: a plain copy of a pageable CPU tensor waits for the whole CUDA stream,
    # which would stall the host once per step and stop it from running ahead of the GPU.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TextFeatureCache:
    """Text features (hidden (L, C) float32, mask (L,)) per caption, kept on the device and reused.

    At most ``max_entries`` captions are kept (the first ones seen, which in a stream are also
    the frequent ones); beyond that, misses are encoded each time. Misses are encoded in blocks
    of exactly ``block`` captions (padded with the empty prompt): with one fixed batch shape the
    encoder's kernels, and so its rounding, are the same whichever captions share a block.
    """

    def __init__(self, encoder, device: torch.device | str, max_entries: int = 65536, block: int = 64):
        self.encoder = encoder
        self.device = torch.device(device)
        self.max_entries, self.block = int(max_entries), int(block)
        self.rows: dict[str, int] = {}
        self.hidden: torch.Tensor | None = None  # (capacity, L, C) float32
        self.mask: torch.Tensor | None = None  # (capacity, L) long
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _encode_block(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        padded = texts + [""] * (self.block - len(texts))
        ids, mask = self.encoder.tokenize(padded)  # (block, L) each
        ids, mask = _to_device(ids, self.device), _to_device(mask, self.device)
        hidden = self.encoder._hidden_states(ids, mask)  # (block, L_all, C), inference tensor
        hidden, mask = self.encoder._select_tokens(hidden, mask)  # (block, L, C), (block, L)
        return hidden[: len(texts)].float(), mask[: len(texts)].long()

    def _store(self, hidden: torch.Tensor, mask: torch.Tensor) -> int:
        """Append rows (n, L, C) / (n, L); return the first row index."""
        n, start = hidden.shape[0], len(self.rows)
        if self.hidden is None:
            cap = max(self.block, 1)
            self.hidden = torch.empty((cap, *hidden.shape[1:]), dtype=torch.float32, device=self.device)
            self.mask = torch.empty((cap, mask.shape[1]), dtype=torch.long, device=self.device)
        if start + n > self.hidden.shape[0]:  # grow by doubling (amortised O(1) per row)
            cap = min(max(2 * self.hidden.shape[0], start + n), max(self.max_entries, start + n))
            grown = torch.empty((cap, *self.hidden.shape[1:]), dtype=torch.float32, device=self.device)
            grown_mask = torch.empty((cap, self.mask.shape[1]), dtype=torch.long, device=self.device)
            grown[:start], grown_mask[:start] = self.hidden[:start], self.mask[:start]
            self.hidden, self.mask = grown, grown_mask
        self.hidden[start:start + n] = hidden
        self.mask[start:start + n] = mask
        return start

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (hidden (B, L, C) float32, mask (B, L) long) on the device, ordinary tensors."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.rows))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # misses beyond max_entries
        for i in range(0, len(missing), self.block):
            texts = missing[i:i + self.block]
            hidden, mask = self._encode_block(texts)  # (n, L, C), (n, L)
            room = max(0, self.max_entries - len(self.rows))
            if room:
                start = self._store(hidden[:room], mask[:room])
                for j, text in enumerate(texts[:room]):
                    self.rows[text] = start + j
            for j, text in enumerate(texts[room:], start=room):
                extra[text] = (hidden[j], mask[j])
        if not extra:
            idx = _to_device(torch.tensor([self.rows[c] for c in captions], dtype=torch.long), self.device)
            return self.hidden.index_select(0, idx), self.mask.index_select(0, idx)  # (B, L, C), (B, L)
        hid = [self.hidden[self.rows[c]] if c in self.rows else extra[c][0] for c in captions]
        msk = [self.mask[self.rows[c]] if c in self.rows else extra[c][1] for c in captions]
        return torch.stack(hid), torch.stack(msk)


class SamplePool:
    """A device-resident window of prepared samples: draw a batch at random, then refresh one chunk.

    ``next_chunk()`` returns the next prepared micro-batch of the stream (a dict of tensors with a
    leading batch dimension of ``chunk``); ``size`` is a multiple of ``chunk``. Built at micro-batch
    ``start``, the pool holds stream chunks start .. start + M - 1 (M = size / chunk), chunk c in
    slots [(c mod M) chunk, (c mod M + 1) chunk), which is what an uninterrupted run holds there.
    """

    def __init__(self, next_chunk: Callable[[], dict[str, torch.Tensor]], size: int, chunk: int,
                 batch_size: int, start: int = 0):
        if size % chunk or size < batch_size:
            raise ValueError(f"pool size {size} must be a multiple of the chunk {chunk} and >= the batch {batch_size}")
        self.next_chunk, self.size, self.chunk, self.batch_size = next_chunk, size, chunk, batch_size
        self.num_chunks = size // chunk
        self.store: dict[str, torch.Tensor] = {}
        self.position = start  # stream chunk whose slots are refreshed next
        order = [(start + j) % self.num_chunks for j in range(self.num_chunks)]
        for slot in order:
            self._write(slot, next_chunk())

    def _write(self, slot: int, chunk: dict[str, torch.Tensor]) -> None:
        lo = slot * self.chunk
        for key, value in chunk.items():
            if value.shape[0] != self.chunk:
                raise ValueError(f"chunk {key!r} has {value.shape[0]} samples, the pool expects {self.chunk}")
            if key not in self.store:
                self.store[key] = torch.empty((self.size, *value.shape[1:]), dtype=value.dtype, device=value.device)
            self.store[key][lo:lo + self.chunk] = value

    def next_batch(self) -> dict[str, torch.Tensor]:
        """A random batch of the current window (global torch RNG), then the oldest chunk is replaced."""
        device = next(iter(self.store.values())).device
        idx = torch.randint(self.size, (self.batch_size,), device=device)  # (B,)
        batch = {k: v.index_select(0, idx) for k, v in self.store.items()}
        self._write(self.position % self.num_chunks, self.next_chunk())
        self.position += 1
        return batch
