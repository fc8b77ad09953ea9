"""TokenFlow video editing: the backbone protocol, inversion cache, attention processors, the edit loop."""

from .attention import (
    Pass,
    TokenFlowAttnProcessor,
    TokenFlowState,
    extended_attention,
    nearest_tokens,
    propagate,
)
from .backbones import (
    Backbone,
    SanaBackbone,
    StableDiffusionBackbone,
    TextCond,
    canny_edges,
    load_backbone,
    tokenflow_hooks,
)
from .correspondence import CORRESPONDENCES, FlowCorrespondence
from .cross_attention import CrossAttentionControl, align_tokens, controlled_cross_attention, edited_positions
from .editor import MODES, EditSettings, edit_latents
from .inversion import InversionKey, LatentCache, default_cache_dir, invert_latents, sample_plain

__all__ = [
    "CORRESPONDENCES",
    "MODES",
    "Backbone",
    "CrossAttentionControl",
    "EditSettings",
    "FlowCorrespondence",
    "InversionKey",
    "LatentCache",
    "Pass",
    "SanaBackbone",
    "StableDiffusionBackbone",
    "TextCond",
    "TokenFlowAttnProcessor",
    "TokenFlowState",
    "align_tokens",
    "canny_edges",
    "controlled_cross_attention",
    "edited_positions",
    "default_cache_dir",
    "edit_latents",
    "extended_attention",
    "invert_latents",
    "load_backbone",
    "nearest_tokens",
    "propagate",
    "sample_plain",
    "tokenflow_hooks",
]
