"""Pipelines: text-to-image and video editing, built from model references."""

from __future__ import annotations

import importlib
from typing import Any

from .text_to_image import ImageOutput, TextToImagePipeline, load_pipeline

__all__ = ["ImageOutput", "TextToImagePipeline", "VideoEditPipeline", "load_pipeline"]


def __getattr__(name: str) -> Any:
    if name == "VideoEditPipeline":  # imported lazily: it pulls in the video stack
        return importlib.import_module(".video_edit", __name__).VideoEditPipeline
    raise AttributeError(name)
