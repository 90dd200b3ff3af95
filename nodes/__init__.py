"""The ComfyUI node layer: the only package here that imports ComfyUI.

``NODES`` lists every ``io.ComfyNode`` class the pack registers (see the top-level ``__init__``).
"""

from __future__ import annotations

import importlib
import logging

NODES: list = []

for _name in ("image_nodes", "training_nodes", "embedding_nodes"):  # each exposes NODES
    NODES.extend(importlib.import_module(f".{_name}", __name__).NODES)

try:  # written separately (vision-language issue); optional until it exists
    from .vision_language import NODES as _VL_NODES
except ModuleNotFoundError as _e:
    if _e.name != f"{__name__}.vision_language":
        raise
    logging.getLogger(__name__).debug("nodes.vision_language not present")
else:
    NODES.extend(_VL_NODES)
