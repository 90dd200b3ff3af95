"""Image grids as PNG with PIL only (no torchvision, no matplotlib)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from ..data import imageprep
from ..charts import font

__all__ = ["to_pil", "image_grid"]


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """[3, H, W] in [0, 1] -> an RGB image, enlarged ``scale`` times with nearest-neighbour."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil: expected an image [3, H, W], got {tuple(image.shape)}")
    im = imageprep.to_pil(image)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) if scale > 1 else im


def image_grid(rows: Sequence[torch.Tensor], labels: Sequence[str] | None = None, scale: int = 3,
               pad: int = 4, label_width: int = 0) -> Image.Image:
    """One row per tensor [N_i, 3, H, W]; an optional text label left of each row."""
    if not rows:
        raise ValueError("image_grid: no rows given")
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    ncol = max(r.shape[0] for r in rows)
    label_font = font(13)
    if labels is not None and not label_width:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = int(max(probe.textlength(s, font=label_font) for s in labels)) + 3 * pad
    W = label_width + ncol * (w + pad) + pad
    H = len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (h + pad)
        if labels is not None:
            draw.text((pad, y + h // 2 - 7), labels[r], fill=(0, 0, 0), font=label_font)
        for c in range(row.shape[0]):
            canvas.paste(to_pil(row[c], scale), (label_width + pad + c * (w + pad), y))
    return canvas
