"""The "(download)" entries of the model combos, and fetching one the first time it runs.

Each combo of a model folder (``captioners``, ``open_clip``) lists "none", the installed models and
a few "<name> (download)" entries (``inversion.vision_language.download``'s curated lists). Picked and run, an entry
is fetched once into the folder's first location, with a toast, a log line and a byte progress bar;
after that it is an ordinary installed model. Nothing is downloaded unless the user picks such an
entry; ``HF_HUB_OFFLINE=1`` refuses even that, ``HF_ENDPOINT`` names a mirror.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.utils

from ..inversion.vision_language import download
from .comfy_run import warn_user
from .folders import CAPTIONERS, OPEN_CLIP, installed_models, model_dirs

__all__ = ["NONE", "installed_names", "captioner_names", "open_clip_names", "download_sizes", "model_name", "fetch"]

log = logging.getLogger(__name__)

NONE = "none"

# The downloadable models of each folder: combo label -> hub model (inversion.vision_language.download's curated lists).
_DOWNLOADS = {CAPTIONERS: {m.label: m for m in download.CAPTIONERS},
              OPEN_CLIP: {m.label: m for m in download.OPEN_CLIP}}


def installed_names(kind: str) -> list[str]:
    """The models of ``kind`` on disk (a download in progress, <folder>.partial, is not a model yet)."""
    return sorted(n for n in installed_models(kind) if not n.split("/")[-1].endswith(download.PARTIAL_SUFFIX))


def captioner_names() -> list[str]:
    # "none" stays first whatever is installed: saved manual-mode workflows hold it
    return [NONE, *installed_names(CAPTIONERS), *_DOWNLOADS[CAPTIONERS]]


def open_clip_names() -> list[str]:
    return [NONE, *installed_names(OPEN_CLIP), *_DOWNLOADS[OPEN_CLIP]]


def download_sizes(kind: str) -> str:
    """The downloadable models of ``kind`` for a tooltip: "folder: repo, about size, ..."."""
    return ", ".join(f"{m.folder}: {m.repo}, about {m.size}" for m in _DOWNLOADS[kind].values())


def model_name(kind: str, name: str) -> str:
    """The on-disk name a combo entry stands for ("x (download)" -> "x"), without downloading."""
    entry = _DOWNLOADS[kind].get(name)
    return name if entry is None else entry.folder


def fetch(kind: str, name: str, node_id: str | None) -> str:
    """The on-disk name of combo entry ``name``, downloading a "(download)" entry that is not installed yet."""
    entry = _DOWNLOADS[kind].get(name)
    if entry is None:
        return name
    if entry.folder in installed_models(kind):
        return entry.folder
    parent = Path(model_dirs(kind)[0])
    if (parent / entry.folder).exists():  # complete: used as is; incomplete: an error that says so
        download.download(entry, parent)
        return entry.folder
    files = download.plan(entry, parent)
    size = sum(f.size or 0 for f in files) or None
    warn_user(node_id, f"Downloading {entry.repo} ({len(files)} files, {download.format_size(size)}) from "
                       f"{download.endpoint()} to {parent / entry.folder}; this happens once.")
    dest = download.download(entry, parent, _byte_progress(size, node_id), files=files)
    log.info("downloaded %s to %s", entry.repo, dest)
    return entry.folder


def _byte_progress(size: int | None, node_id: str | None):
    """A download callback: ComfyUI's progress bar in bytes (~200 updates) and its cancel check."""
    bar = comfy.utils.ProgressBar(max(1, size or 1), node_id=node_id)
    shown = [0]

    def progress(p) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if p.step - shown[0] >= p.total // 200 or p.step >= p.total:  # ~200 bar updates, not one per MiB
            shown[0] = p.step
            bar.update_absolute(p.step, max(1, p.total))

    return progress
