"""LoRA files in kohya's layout: ``<kohya key>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` per
adapted layer, which ComfyUI's LoraLoader and A1111/Forge read, with kohya's ``ss_*`` metadata so tools
that list a LoRA's rank and alpha find them. Written atomically; an existing file is replaced only when
asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from .safefile import atomic_save_safetensors, read_safetensors

__all__ = ["save_lora", "load_lora", "lora_layers"]

_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")


def lora_layers(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The layer keys of a kohya-layout state dict (``lora_unet_..._to_q``), in file order."""
    return list(dict.fromkeys(k[:-len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")))


def _check(tensors: Mapping[str, torch.Tensor]) -> None:
    layers = lora_layers(tensors)
    if not layers:
        raise ValueError("a LoRA file needs at least one <layer>.lora_down.weight")
    for layer in layers:
        missing = [p for p in _PARTS if layer + p not in tensors]
        if missing:
            raise ValueError(f"LoRA layer {layer} lacks {', '.join(layer + p for p in missing)}")
        down, up = tensors[layer + ".lora_down.weight"], tensors[layer + ".lora_up.weight"]
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"LoRA layer {layer}: lora_down has rank {down.shape[0]} but lora_up {up.shape[1]}")


def save_lora(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
              overwrite: bool = False) -> Path:
    """Write a kohya-layout LoRA (``LoraGroup.kohya_state_dict()``) to ``path``; ``ss_network_dim`` and
    ``ss_network_alpha`` are filled in from the tensors (the first layer's rank and alpha)."""
    _check(tensors)
    first = lora_layers(tensors)[0]
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(int(tensors[first + ".lora_down.weight"].shape[0])),
            "ss_network_alpha": f"{float(tensors[first + '.alpha']):g}", **(metadata or {})}
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya-layout LoRA file's tensors and metadata; a file that is not one says what it lacks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no LoRA file {p}")
    tensors, meta = read_safetensors(p, what="the LoRA file")
    _check(tensors)
    return tensors, meta
