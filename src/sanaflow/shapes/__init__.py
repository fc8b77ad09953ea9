"""The shapes world: procedural captioned images and videos with exact ground truth, and the
classical-vision detector that scores generated images and edited videos (see docs/shapes.md).

    scene = sample_scene(7)                 # deterministic by seed; split="train" | "eval"
    image = render(scene, 256)              # uint8 (256, 256, 3), anti-aliased
    score(image, scene)                     # {"category": ..., "correct": True, "reason": "", "detected": [...]}
    video = random_video(3, frames=16)      # frames, masks, exact forward flow, valid mask
"""

from .dataset import ShapesDataset
from .detect import Detection, detect, exact_match, format_table, score, segment, summarize
from .motion import (
    ShapesVideo,
    dis_flow,
    edit_valid_mask,
    load_video,
    random_track,
    random_video,
    render_track,
    save_video,
    video_caption,
    video_metrics,
    warp_error,
)
from .render import render, render_batch, to_tensor
from .scene import (
    BACKGROUNDS,
    CATEGORIES,
    HELD_OUT_PAIRS,
    HELD_OUT_RELATIONS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SIZES,
    EvalPrompt,
    Scene,
    ShapeObject,
    eval_prompts,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CATEGORIES",
    "Detection",
    "EvalPrompt",
    "HELD_OUT_PAIRS",
    "HELD_OUT_RELATIONS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "ShapesVideo",
    "detect",
    "dis_flow",
    "eval_prompts",
    "exact_match",
    "format_table",
    "load_video",
    "random_track",
    "random_video",
    "render",
    "render_batch",
    "render_track",
    "sample_scene",
    "save_video",
    "score",
    "segment",
    "summarize",
    "to_tensor",
    "video_caption",
    "video_metrics",
    "edit_valid_mask",
    "warp_error",
]
