"""The ComfyUI node layer: the only package here that imports ComfyUI.

``NODES`` lists every ``io.ComfyNode`` class the pack registers (see the top-level ``__init__``).
"""

from __future__ import annotations

import importlib

NODES: list = []

# one module per theme, each exposing NODES
for _name in ("image_nodes", "training_nodes", "concept_nodes", "options_nodes", "lora_nodes", "pair_nodes", "preview_nodes", "embedding_nodes", "caption_nodes", "ovi_nodes"):
    NODES.extend(importlib.import_module(f".{_name}", __name__).NODES)
