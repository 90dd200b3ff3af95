"""The models the vision-language nodes load, kept between runs, and where they run.

Nodes keep no instance state (V3 clones the class per run, ../shared/COMFYUI_NOTES.md section 1),
so loaded models live here: one of each kind (a captioner, an open_clip model, the transformers
copy of a CLIP_VISION model, the text features of the last label list), parked on the offload
device between runs. ``on_compute_device`` moves one to the compute device for a block.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

import comfy.model_management

from ..inversion.vision_language import caption as captioning
from ..inversion import ovi
from ..inversion.vision_language import classify
from .folders import CAPTIONERS, OPEN_CLIP, folder_mtime, installed_models, model_dirs
from .vision_adapters import comfy_vision_tower

__all__ = ["compute_device_dtype", "offload_device", "on_compute_device", "load_captioner", "load_open_clip",
           "label_features", "vision_tower"]

T = TypeVar("T")

_lock = threading.Lock()
_cache: dict[str, tuple[tuple, object]] = {}
_label_cache: dict[tuple, torch.Tensor] = {}
_towers: "weakref.WeakKeyDictionary[object, tuple[torch.dtype, ovi.HFVisionTower]]" = weakref.WeakKeyDictionary()


def compute_device_dtype() -> tuple[torch.device, torch.dtype]:
    """ComfyUI's compute device, and fp16 there when ComfyUI would use it (fp32 on the CPU)."""
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        return device, torch.float32
    return device, (torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32)


def offload_device() -> torch.device:
    return torch.device(comfy.model_management.text_encoder_offload_device())


@contextmanager
def on_compute_device(module: torch.nn.Module, holder=None) -> Iterator[torch.device]:
    """Run the block with ``module`` on the compute device, then park it back on the offload device
    (and free the cache), even when the block raises. ``holder.device`` (a ``Captioner``'s, an
    ``OpenClip``'s), when a holder is given, follows the module."""
    device, _ = compute_device_dtype()
    module.to(device)
    if holder is not None:
        holder.device = device
    try:
        yield device
    finally:
        module.to(comfy.model_management.text_encoder_offload_device())
        comfy.model_management.soft_empty_cache()
        if holder is not None:
            holder.device = offload_device()


def _cached(kind: str, key: tuple, load: Callable[[], T]) -> T:
    """The cached model of ``kind`` if it was loaded under ``key``, else ``load()`` (replacing it)."""
    with _lock:
        hit = _cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        _cache.pop(kind, None)
        value = load()
        _cache[kind] = (key, value)
        return value


def load_captioner(name: str) -> captioning.Captioner:
    """Captioner ``name`` from models/captioners (on the CPU; reloaded when its files change)."""
    folder = installed_models(CAPTIONERS).get(name)
    _, dtype = compute_device_dtype()
    return _cached("captioner", (name, str(folder), folder_mtime(folder), dtype),
                   lambda: captioning.load_captioner(name, model_dirs(CAPTIONERS), "cpu", dtype))


def load_open_clip(name: str) -> classify.OpenClip:
    """open_clip model ``name`` from models/open_clip (on the CPU; reloaded when its files change)."""
    path = installed_models(OPEN_CLIP).get(name)
    _, dtype = compute_device_dtype()
    return _cached("open_clip", (name, str(path), folder_mtime(path), dtype),
                   lambda: classify.load_open_clip(name, model_dirs(OPEN_CLIP), device="cpu", dtype=dtype))


def label_features(clip: classify.OpenClip, labels: list[str]) -> torch.Tensor:
    """The text features of ``labels`` under ``clip`` (the last list's are kept: 1000 ImageNet prompts)."""
    key = (clip.name, id(clip.model), tuple(labels), classify.DEFAULT_TEMPLATES)
    feats = _label_cache.get(key)
    if feats is None:
        _label_cache.clear()
        feats = classify.label_features(clip, labels).cpu()
        _label_cache[key] = feats
    return feats


def vision_tower(clip_vision) -> ovi.HFVisionTower:
    """The converted copy of ``clip_vision`` (cached, parked on the offload device between runs)."""
    _, dtype = compute_device_dtype()
    hit = _towers.get(clip_vision)
    if hit is not None and hit[0] == dtype:
        return hit[1]
    _towers.clear()  # one converted copy at a time: a ViT-H is 1.2 GB
    tower = comfy_vision_tower(clip_vision, offload_device(), dtype)
    _towers[clip_vision] = (dtype, tower)
    return tower
