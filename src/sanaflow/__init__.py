"""sanaflow: fast SANA text-to-image and TokenFlow video editing.

Heavy submodules are imported lazily, so ``import sanaflow`` costs little.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SanaflowError

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "sanaflow.pipelines",
    "TextToImagePipeline": "sanaflow.pipelines",
    "VideoEditPipeline": "sanaflow.pipelines",
}

__all__ = ["SanaflowError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sanaflow' has no attribute {name!r}")
