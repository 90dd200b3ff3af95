"""Concept images for training: read a folder, fit every image (and mask) to one square size.

Images are float tensors [3, H, W] / batches [N, 3, H, W] in [0, 1]; masks [H, W] / [N, H, W] in
[0, 1] (1 = the concept, where the loss counts). Plain torch and PIL.

- ``read_image``: EXIF orientation applied, alpha composited on white (what viewers show) and
  returned separately so it can serve as the mask; 16-bit and float grayscale kept at full range
  (Pillow's ``convert("RGB")`` would clip them to white);
- ``fit``: "crop" (shortest side to ``size``, centre crop; the usual textual-inversion
  preprocessing), "pad" (longest side to ``size``, white borders that the mask excludes) or
  "stretch";
- ``load_concept_folder``: every readable image of a folder, fitted; an unreadable or (almost)
  fully transparent file is skipped with a warning that names it, and listed in
  ``ConceptImages.skipped`` so a UI can tell the user; an empty result is an error that names the
  folder and why each file was skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["FIT_MODES", "ConceptImages", "read_image", "fit", "fit_batch", "load_concept_folder", "list_images"]

log = logging.getLogger(__name__)

FIT_MODES = ("crop", "pad", "stretch")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# An image keeps at least this many pixels more than half opaque (after fitting) or it is skipped:
# one latent cell (the VAE downsamples 8x8), so less is invisible to the model, and the image would
# train as a plain white square (no mask) or as an empty mask (the trainer's error).
MIN_VISIBLE_PIXELS = 64


@dataclass
class ConceptImages:
    images: torch.Tensor  # [N, 3, S, S] in [0, 1]
    masks: torch.Tensor | None  # [N, S, S] in [0, 1], or None when no image had a mask
    names: list[str]  # file names (or "image i")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason) of files left out


def list_images(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} does not exist or is not a folder; give an absolute path or a "
                         "folder under ComfyUI's input directory")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(RGB [3, H, W] composited on white, alpha [H, W] or None) of an image file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        alpha = None
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            a = torch.frombuffer(bytearray(rgba.getchannel("A").tobytes()), dtype=torch.uint8)
            alpha = a.view(rgba.height, rgba.width).float() / 255.0
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        elif im.mode in ("F", "I") or im.mode.startswith("I;16"):
            return _gray_to_rgb(im), None
        else:
            im = im.convert("RGB")
        rgb = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return rgb.permute(2, 0, 1).float() / 255.0, alpha


def _gray_to_rgb(im) -> torch.Tensor:
    """A 16-bit ("I;16*", "I") or float ("F") grayscale image as [3, H, W] in [0, 1].

    Integer modes hold 0..65535 (16-bit PNG/TIFF). Float images are usually 0..1, but some tools
    write 0..255 or 0..65535: the range is taken from the largest value.
    """
    f = im.convert("F")
    x = torch.frombuffer(bytearray(f.tobytes()), dtype=torch.float32).view(f.height, f.width)
    if im.mode == "F":
        hi = float(x.max()) if x.numel() else 0.0
        scale = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0
    else:
        scale = 65535.0
    return (x / scale).clamp(0, 1)[None].expand(3, -1, -1).contiguous()


def _transparency_problem(alpha: torch.Tensor, fitted: torch.Tensor, mode: str) -> str | None:
    """Why an image's alpha [H, W] (``fitted`` to [S, S]) leaves too little visible to train on, or None."""
    visible = int((fitted > 0.5).sum())
    if visible >= MIN_VISIBLE_PIXELS:
        return None
    hint = ""
    if not bool((alpha > 0.5).any()):
        what = "fully transparent (no pixel is more than half opaque)"
    else:
        what = (f"almost fully transparent: {visible} pixel(s) more than half opaque after fit={mode}, "
                f"fewer than {MIN_VISIBLE_PIXELS} (one 8x8 latent cell)")
        hint = " (or use fit=pad if the visible part is near an edge)" if mode == "crop" else ""
    return (f"{what}; it would train as a plain white image. Re-export it with the concept opaque{hint}, "
            "or remove it from the folder")


def _resize(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if mode == "bicubic":
        return F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def fit(image: torch.Tensor, size: int, mode: str = "crop",
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``image`` [3, H, W] (and ``mask`` [H, W]) to [3, size, size] (and [size, size]).

    With "pad" the border is white and, when a mask is returned, 0 there; without a mask "pad"
    returns one (1 on the image, 0 on the border), since the border is not the concept.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    h, w = image.shape[-2:]
    m = None if mask is None else mask.float()[None]
    if m is not None and tuple(m.shape[-2:]) != (h, w):
        m = F.interpolate(m[None], size=(h, w), mode="nearest")[0]
    if mode == "stretch":
        out, mo = _resize(image, size, size, "bicubic"), None if m is None else _resize(m, size, size, "bilinear")
    elif mode == "crop":
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        top, left = (nh - size) // 2, (nw - size) // 2
        out = _resize(image, nh, nw, "bicubic")[:, top:top + size, left:left + size]
        mo = None if m is None else _resize(m, nh, nw, "bilinear")[:, top:top + size, left:left + size]
    else:
        s = size / max(h, w)
        nh, nw = min(size, max(1, round(h * s))), min(size, max(1, round(w * s)))
        top, left = (size - nh) // 2, (size - nw) // 2
        out = torch.ones(3, size, size)
        out[:, top:top + nh, left:left + nw] = _resize(image, nh, nw, "bicubic")
        mo = torch.zeros(1, size, size)
        mo[:, top:top + nh, left:left + nw] = 1.0 if m is None else _resize(m, nh, nw, "bilinear")
    return out.contiguous(), None if mo is None else mo[0].contiguous()


def fit_batch(images: torch.Tensor, size: int, mode: str = "crop",
              masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` [N, 3, H, W] and optional ``masks`` ([N, H, W] or one [H, W]) fitted to ``size``."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    if masks is not None:
        masks = masks[None] if masks.ndim == 2 else masks
        if masks.shape[0] == 1 and n > 1:
            masks = masks.expand(n, -1, -1)
        if masks.shape[0] != n:
            raise ValueError(f"masks: got {masks.shape[0]} masks for {n} images; give one mask, or one per image")
    outs, ms = [], []
    for i in range(n):
        o, m = fit(images[i, :3].float(), size, mode, None if masks is None else masks[i])
        outs.append(o)
        ms.append(m)
    mask_out = None if all(m is None for m in ms) else torch.stack(
        [m if m is not None else torch.ones(size, size) for m in ms])
    return torch.stack(outs), mask_out


def load_concept_folder(folder: str | os.PathLike, size: int, mode: str = "crop",
                        alpha_as_mask: bool = True) -> ConceptImages:
    """Every readable image of ``folder`` fitted to ``size``; alpha becomes the mask if asked."""
    files = list_images(folder)
    images, masks, names, skipped = [], [], [], []
    for p in files:
        try:
            rgb, alpha = read_image(p)
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
            skipped.append((p.name, f"unreadable ({type(e).__name__}: {e})"))
            log.warning("skipping unreadable image %s: %s", p, e)
            continue
        img, m = fit(rgb, size, mode, alpha if alpha_as_mask else None)
        if alpha is not None:  # checked after fitting: a centre crop can cut away all that is visible
            problem = _transparency_problem(alpha, m if alpha_as_mask else fit(rgb, size, mode, alpha)[1], mode)
            if problem is not None:
                skipped.append((p.name, problem))
                log.warning("skipping image %s: %s", p, problem)
                continue
        images.append(img)
        masks.append(m)
        names.append(p.name)
    if not images:
        why = "; ".join(f"{n}: {r}" for n, r in skipped)
        raise ValueError(f"no readable images in folder {str(folder)!r} (looked for {', '.join(SUFFIXES)}); "
                         + (f"every image was skipped: {why}" if skipped else "put the concept's images there"))
    mask_out = None
    if any(m is not None for m in masks):
        mask_out = torch.stack([m if m is not None else torch.ones(size, size) for m in masks])
    return ConceptImages(torch.stack(images), mask_out, names, skipped)
