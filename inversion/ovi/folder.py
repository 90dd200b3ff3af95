"""Images of a folder, read lazily in batches, for statistics of a large image set (seeds/004).

seeds/004 holds OVI to the statistics of a large set of real image embeddings (its Mahalanobis
collapse at lambda_M >= 0.05 goes toward "likely the mean of the COCO embedding space", Fig. 5). A
set that size does not fit in memory as pixels, but its embeddings do (D floats per image), so the
images are listed first and decoded ``batch_size`` at a time, each centre-cropped to the encoder's
input size; only the current batch is ever held. Unreadable files are reported and skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.dataset import SUFFIXES, fit, read_image

__all__ = ["ImageBatch", "image_files", "image_batches"]

log = logging.getLogger(__name__)

ImageBatch = tuple[torch.Tensor, list[Path]]  # ([B, 3, S, S] in [0, 1], the files it came from)


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (and its sub-folders when ``recursive``), sorted, hidden ones left out."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} does not exist or is not a folder; give an absolute path or a "
                         "folder under ComfyUI's input directory")
    walk = root.rglob("*") if recursive else root.iterdir()
    files = [p for p in walk if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)


def image_batches(files: list[Path], size: int, batch_size: int = 16,
                  on_skip: Callable[[Path, str], object] | None = None) -> Iterator[ImageBatch]:
    """Decode ``files`` ``batch_size`` at a time, each centre-cropped to ``size`` x ``size``.

    Yields ([B, 3, size, size] in [0, 1], their files); a file that cannot be decoded is passed to
    ``on_skip(path, reason)`` and left out. Transparent pixels are composited on white.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images: list[torch.Tensor] = []
    names: list[Path] = []
    for path in files:
        try:
            rgb, _ = read_image(path)
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
            log.warning("skipping unreadable image %s: %s", path, e)
            if on_skip is not None:
                on_skip(path, f"unreadable ({type(e).__name__}: {e})")
            continue
        images.append(fit(rgb, size, "crop")[0])
        names.append(path)
        if len(images) == batch_size:
            yield torch.stack(images), names
            images, names = [], []
    if images:
        yield torch.stack(images), names
