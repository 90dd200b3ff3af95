"""Images for the vision-language models: region crops, PIL conversion, CLIP preprocessing.

Plain torch and PIL (no torchvision; see ``.ci/torchvision_stub``). Images are float tensors
[B, 3, H, W] (or [3, H, W]) in [0, 1], the library's convention; masks are [B, H, W] or [H, W]
in [0, 1] (ComfyUI's MASK layout).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "as_image_list",
    "clip_preprocess",
    "crop_to_masks",
    "mask_box",
    "to_pil",
]

log = logging.getLogger(__name__)

# The normalisation CLIP (and OpenCLIP's ViT-H/bigG) were trained with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_image_list(images: torch.Tensor | Sequence[torch.Tensor], what: str = "images") -> list[torch.Tensor]:
    """``images`` ([B, 3, H, W], [3, H, W] or a list of [3, H, W]) as a list of float [3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"{what} must be [B, 3, H, W] or [3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        items = list(images.unbind(0))
    else:
        items = list(images)
    if not items:
        raise ValueError(f"{what} is empty; give at least one image")
    out = []
    for i, img in enumerate(items):
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] not in (1, 3, 4):
            raise ValueError(f"{what}[{i}] must be a [3, H, W] tensor in [0, 1], got {getattr(img, 'shape', type(img))}")
        img = img.float()
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        elif img.shape[0] == 4:  # alpha: composite on white, as image viewers show it
            img = img[:3] * img[3:] + (1.0 - img[3:])
        out.append(img.clamp(0.0, 1.0))
    return out


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Bounding box (top, left, bottom, right; bottom/right exclusive) of ``mask > threshold``, or None if empty."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    on = mask > threshold
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _masks_for(masks: torch.Tensor, n: int) -> list[torch.Tensor]:
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise ValueError(f"mask must be [B, H, W] or [H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 1:
        return [masks[0]] * n
    if masks.shape[0] != n:
        raise ValueError(f"mask batch has {masks.shape[0]} masks for {n} images; give one mask, or one per image")
    return list(masks.unbind(0))


def crop_to_masks(
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | None,
    margin: float = 0.1,
    threshold: float = 0.5,
) -> list[torch.Tensor]:
    """Crop each image to the bounding box of its mask, grown by ``margin`` x the box size per side.

    The region-of-interest step of seeds/001 ("click on the object" before captioning). A mask of
    another resolution is resized to its image (nearest); an empty mask keeps the whole image.
    One mask may serve every image. Returns a list, since crops differ in size.
    """
    items = as_image_list(images)
    if masks is None:
        return items
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0 (a fraction of the box size), got {margin}")
    out = []
    for i, (img, m) in enumerate(zip(items, _masks_for(masks.float(), len(items)))):
        h, w = img.shape[-2:]
        if tuple(m.shape) != (h, w):
            m = F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0]
        box = mask_box(m.cpu(), threshold)
        if box is None:
            log.warning("mask %d is empty (nothing above %.2f): using the whole image", i, threshold)
            out.append(img)
            continue
        top, left, bottom, right = box
        dy, dx = round((bottom - top) * margin), round((right - left) * margin)
        top, left = max(0, top - dy), max(0, left - dx)
        bottom, right = min(h, bottom + dy), min(w, right + dx)
        out.append(img[:, top:bottom, left:right])
    return out


def to_pil(image: torch.Tensor):
    """A [3, H, W] tensor in [0, 1] as an RGB ``PIL.Image``."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)  # uint8 [H, W, 3] is RGB


def clip_preprocess(
    images: torch.Tensor | Sequence[torch.Tensor],
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP's evaluation transform: shortest side to ``size`` (bicubic, antialiased), centre crop, normalise.

    Returns [B, 3, size, size]; the same steps as open_clip's and ComfyUI's ``clip_preprocess``.
    """
    out = []
    for img in as_image_list(images):
        h, w = img.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = img.unsqueeze(0)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[:, :, top:top + size, left:left + size].clamp(0, 1))
    batch = torch.cat(out, 0)
    m = torch.tensor(mean, dtype=batch.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - m) / s
