"""Concept images for training: read a folder, fit every image (and mask) to one square size or to
its aspect-ratio bucket, and read each image's caption.

Images are float tensors [3, H, W] / batches [N, 3, H, W] in [0, 1]; masks [H, W] / [N, H, W] in
[0, 1] (1 = the concept, where the loss counts). Plain torch and PIL.

- ``read_image``: EXIF orientation applied, alpha composited on white (what viewers show) and
  returned separately so it can serve as the mask; 16-bit and float grayscale kept at full range
  (Pillow's ``convert("RGB")`` would clip them to white);
- ``fit``: "crop" (shortest side to ``size``, centre crop; the usual textual-inversion
  preprocessing), "pad" (longest side to ``size``, white borders that the mask excludes) or
  "stretch", or "bucket" (each image to the bucket closest to its aspect ratio among ``buckets(size)``:
  about size*size pixels, sides a multiple of ``bucket_step(size)``, aspect ratio within 1:2..2:1;
  kohya's aspect-ratio bucketing, so a tall or wide image keeps most of its content);
- captions: ``image.txt`` beside ``image.png`` (kohya's and A1111's convention), the whole file with
  newlines as spaces; ``[name]`` or ``{}`` marks where the concept goes (``prompts.caption_for``);
- ``load_concept_folder``: every readable image of a folder, fitted; an unreadable or (almost)
  fully transparent file is skipped with a warning that names it, and listed in
  ``ConceptImages.skipped`` so a UI can tell the user; an empty result is an error that names the
  folder and why each file was skipped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .prompts import caption_for, has_marker

__all__ = ["FIT_MODES", "SQUARE_MODES", "ConceptImages", "read_image", "read_caption", "fit", "fit_batch", "load_concept_folder",
           "list_images", "buckets", "bucket_for", "bucket_step"]

log = logging.getLogger(__name__)

SQUARE_MODES = ("crop", "pad", "stretch")  # every image to size x size: the images make one batch
FIT_MODES = (*SQUARE_MODES, "bucket")  # bucket: each image to its aspect-ratio bucket (``buckets``)
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# An image keeps at least this many pixels more than half opaque (after fitting) or it is skipped:
# one latent cell (the VAE downsamples 8x8), so less is invisible to the model, and the image would
# train as a plain white square (no mask) or as an empty mask (the trainer's error).
MIN_VISIBLE_PIXELS = 64


@dataclass
class ConceptImages:
    """A concept's images. Square fit modes give one batch; "bucket" gives one tensor per image."""

    images: torch.Tensor | list[torch.Tensor]  # [N, 3, S, S], or (fit "bucket") N tensors [3, H_i, W_i]; in [0, 1]
    masks: torch.Tensor | list[torch.Tensor] | None  # [N, S, S] / N tensors [H_i, W_i]; None when no image had one
    names: list[str]  # file names (or "image i")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason) of files left out
    captions: list[str | None] = field(default_factory=list)  # per image, as written (markers kept); None = no .txt
    notes: list[str] = field(default_factory=list)  # for the user: captions without a marker, orphan .txt files

    def __post_init__(self):
        if not self.captions:
            self.captions = [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of each image."""
        return [tuple(img.shape[-2:]) for img in self.images]

    def captions_for(self, placeholder: str) -> list[str | None] | None:
        """Each caption with the concept's ``placeholder`` in place (``prompts.caption_for``); None if none has one."""
        if all(c is None for c in self.captions):
            return None
        return [None if c is None else caption_for(c, placeholder) for c in self.captions]

    def pixels(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """What ``prepare_concept`` takes: one RGB tensor [3, H_i, W_i] per image (any bucket) and one mask
        per image, or None when every mask is all ones (an image without transparency masks nothing)."""
        images = [img[:3].float().cpu() for img in self.images]
        masks = None if self.masks is None else [m.float().cpu() for m in self.masks]
        if masks is not None and all(bool((m >= 0.999).all()) for m in masks):
            masks = None
        return images, masks

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images [N, 3, H, W], masks [N, H, W] or None) when every image has one size; else a ValueError."""
        if isinstance(self.images, torch.Tensor):
            return self.images, self.masks
        if len(set(self.sizes())) != 1:
            raise ValueError(f"images: {len(set(self.sizes()))} different sizes (aspect buckets) cannot be one batch; "
                             "use the dataset output, or fit = crop")
        masks = None if self.masks is None else torch.stack(list(self.masks))
        return torch.stack(list(self.images)), masks


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


def bucket_step(size: int) -> int:
    """Bucket sides are multiples of this: 64 (kohya's step) from size 512 up; below, size/8 rounded
    down to a multiple of 8 (the VAE's factor), so small training sizes still get several buckets."""
    return max(8, min(64, size // 64 * 8))


@lru_cache(maxsize=64)
def buckets(size: int) -> tuple[tuple[int, int], ...]:
    """The aspect-ratio buckets (H, W) for training ``size``, widest last.

    Each has about ``size * size`` pixels (within 10 %), sides a multiple of ``bucket_step(size)``
    and an aspect ratio between 1:2 and 2:1 (kohya's defaults at 512: sides 256..1024; the ratio
    bound keeps them within size/sqrt(2)..size*sqrt(2)). At 512: 704x384 .. 512x512 .. 384x704.
    """
    step, area = bucket_step(size), size * size
    out = {(size // step * step,) * 2}
    for w in range(step, 2 * size + 1, step):
        h = max(step, round(area / w / step) * step)
        if abs(w * h / area - 1) <= 0.1 and 0.5 <= w / h <= 2:
            out |= {(h, w), (w, h)}
    return tuple(sorted(out, key=lambda hw: (hw[1] / hw[0], hw[1])))


def bucket_for(h: int, w: int, size: int) -> tuple[int, int]:
    """The bucket (H, W) of ``buckets(size)`` closest to an h x w image's aspect ratio (in log ratio)."""
    r = math.log(w / h)
    return min(buckets(size), key=lambda hw: (abs(math.log(hw[1] / hw[0]) - r), -hw[0] * hw[1]))


def _crop_to(image: torch.Tensor, m: torch.Tensor | None, th: int, tw: int):
    """Scale so the image covers th x tw, then centre crop (the least cut for that aspect ratio)."""
    h, w = image.shape[-2:]
    s = max(th / h, tw / w)
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    top, left = (nh - th) // 2, (nw - tw) // 2
    out = _resize(image, nh, nw, "bicubic")[:, top:top + th, left:left + tw]
    mo = None if m is None else _resize(m, nh, nw, "bilinear")[:, top:top + th, left:left + tw]
    return out, mo


def fit(image: torch.Tensor, size: int, mode: str = "crop",
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``image`` [3, H, W] (and ``mask`` [H, W]) to [3, size, size] (and [size, size]).

    With "bucket" the result is [3, bh, bw] with (bh, bw) = ``bucket_for(H, W, size)``. With "pad" the border is white and, when a mask is returned, 0 there; without a mask "pad"
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
        out, mo = _crop_to(image, m, size, size)
    elif mode == "bucket":
        out, mo = _crop_to(image, m, *bucket_for(h, w, size))
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
        [m if m is not None else torch.ones(o.shape[-2:]) for o, m in zip(outs, ms)])
    return torch.stack(outs), mask_out  # one batch: images of one size share one bucket


def read_caption(path: str | os.PathLike) -> str | None:
    """An image's caption file as kohya reads it: the whole text (UTF-8, BOM allowed), newlines as
    spaces, stripped; None when the file is empty."""
    text = " ".join(line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()).strip()
    return " ".join(text.split(" ")) or None


def _caption_notes(folder, names: list[str], captions: list[str | None], files: list[Path]) -> list[str]:
    """What the user should know about the captions: unmarked ones (the concept goes first), orphan files."""
    notes = []
    unmarked = [n for n, c in zip(names, captions) if c is not None and not has_marker(c)]
    if unmarked:
        shown = ", ".join(Path(n).stem + ".txt" for n in unmarked[:3]) + (" ..." if len(unmarked) > 3 else "")
        notes.append(f"{len(unmarked)} caption(s) have no [name] or {{}} marker for the concept ({shown}); the concept "
                     "is put first (\"<concept>, caption\"). Write [name] where it belongs to place it yourself")
    stems = {p.stem for p in files}
    orphans = sorted(p.name for p in Path(folder).glob("*.txt") if p.is_file() and p.stem not in stems)
    if orphans:
        notes.append(f"{len(orphans)} caption file(s) have no image beside them and are unused: "
                     + ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    return notes


def load_concept_folder(folder: str | os.PathLike, size: int, mode: str = "crop",
                        alpha_as_mask: bool = True) -> ConceptImages:
    """Every readable image of ``folder`` fitted to ``size`` (with its caption, if any); alpha becomes
    the mask if asked. ``images`` is a batch [N, 3, S, S], or for ``mode="bucket"`` a list of [3, H, W]."""
    files = list_images(folder)
    images, masks, names, skipped, captions = [], [], [], [], []
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
        txt = p.with_suffix(".txt")
        try:
            cap = read_caption(txt) if txt.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            cap = None
            skipped.append((txt.name, f"caption unreadable ({type(e).__name__}: {e}); the image trains with templates"))
            log.warning("unreadable caption %s: %s", txt, e)
        images.append(img)
        masks.append(m)
        names.append(p.name)
        captions.append(cap)
    if not images:
        why = "; ".join(f"{n}: {r}" for n, r in skipped)
        raise ValueError(f"no readable images in folder {str(folder)!r} (looked for {', '.join(SUFFIXES)}); "
                         + (f"every image was skipped: {why}" if skipped else "put the concept's images there"))
    notes = _caption_notes(folder, names, captions, files)
    for n in notes:
        log.info("%s: %s", folder, n)
    mask_out = None
    if any(m is not None for m in masks):
        mask_out = [m if m is not None else torch.ones(img.shape[-2:]) for img, m in zip(images, masks)]
    if mode != "bucket":
        images, mask_out = torch.stack(images), None if mask_out is None else torch.stack(mask_out)
    return ConceptImages(images, mask_out, names, skipped, captions, notes)
