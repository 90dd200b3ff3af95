"""The pack's model folders, registered with ComfyUI's ``folder_paths`` in one place, and the
helpers that resolve what a user types into a path.

| folder name       | default location             | holds                                              |
|-------------------|------------------------------|----------------------------------------------------|
| ``captioners``    | ``models/captioners``        | transformers captioning model folders (CaptionInit) |
| ``open_clip``     | ``models/open_clip``         | open_clip hub folders or weight files (CaptionInit, OVIPrior) |
| ``ovi_stats``     | ``models/ovi_stats``         | image statistics from BuildImageStats (OVIPrior)   |
| ``inversion_runs``| ``models/inversion_runs``    | a training run's state and unfinished embedding (``run_files``) |

Registering them with ``folder_paths`` lets ``extra_model_paths.yaml`` add more locations; the
first folder of each name is where the pack writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..inversion.vision_language import caption as captioning
from ..inversion.vision_language import classify

__all__ = ["CAPTIONERS", "OPEN_CLIP", "OVI_STATS", "RUNS", "model_dirs", "installed_models", "mtime",
           "folder_mtime", "resolve_folder", "safe_file_name"]

CAPTIONERS, OPEN_CLIP, OVI_STATS, RUNS = "captioners", "open_clip", "ovi_stats", "inversion_runs"

# folder name -> the file extensions ComfyUI lists in it (empty: the pack lists that folder itself)
_EXTENSIONS = {CAPTIONERS: set(), OPEN_CLIP: set(classify.WEIGHT_SUFFIXES), OVI_STATS: {".safetensors"}}


def _register() -> None:
    for name, exts in _EXTENSIONS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        folder_paths.folder_names_and_paths[name][1].update(exts)
    folder_paths.add_model_folder_path(RUNS, os.path.join(folder_paths.models_dir, RUNS), is_default=True)


_register()


def model_dirs(name: str) -> list[str]:
    """Every folder registered under ``name``; the first is the default one."""
    return folder_paths.get_folder_paths(name)


def installed_models(kind: str) -> dict[str, Path]:
    """The captioners (``kind`` = CAPTIONERS) or open_clip models (OPEN_CLIP) on disk: name -> path."""
    find = captioning.find_captioners if kind == CAPTIONERS else classify.find_open_clip_models
    return find(model_dirs(kind))


def mtime(path: str | os.PathLike | None) -> float:
    try:
        return os.path.getmtime(path) if path else 0.0
    except OSError:
        return 0.0


def folder_mtime(folder: str | os.PathLike | None) -> float:
    """Newest modification time of the files in a model folder (a changed model re-runs the node)."""
    if not folder or not os.path.isdir(folder):
        return mtime(folder)
    return max((mtime(p) for p in Path(folder).iterdir() if p.is_file()), default=0.0)


def resolve_folder(folder: str) -> str:
    """An absolute folder as is; a relative one under ComfyUI's input directory."""
    folder = os.path.expanduser(folder.strip().strip('"'))
    return folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)


def safe_file_name(name: str | None, input_name: str = "name") -> str:
    """``name`` stripped, if it names a file inside a folder (no separators, not hidden)."""
    name = (name or "").strip()
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"{input_name}: {name!r} is not a file name; use letters, digits, '_' or '-'")
    return name
