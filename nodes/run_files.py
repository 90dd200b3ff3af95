"""Where a training run keeps its files in ComfyUI's folders; the rules are the library's.

``inversion.files.runs`` decides when a run may replace an embedding, how it resumes, what a cancelled
run keeps (``RunFiles``, one type for one concept or several). This module gives it ComfyUI's folders
(``models/embeddings`` and the pack's ``models/inversion_runs``), ComfyUI's toast for warnings and its
Cancel as the stop from outside (``run_files``, ``open_run``).

Older versions wrote ``<name>.state.safetensors`` beside the embedding; ``migrate_side_files``
moves those (only files whose header is a training state) into the runs folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import comfy.model_management
import folder_paths

from ..inversion.embedding import validate_name
from ..inversion.files.checkpoint import STATE_SUFFIX, is_state_file
from ..inversion.files.runs import IF_EXISTS, ConceptFiles, RunFiles, check_names
from .comfy_run import embeddings_dir, warn_user
from .folders import RUNS  # registered with folder_paths there, with the pack's other model folders

__all__ = ["RUNS", "IF_EXISTS", "RunFiles", "ConceptFiles", "runs_dir", "migrate_side_files", "check_names",
           "run_files", "open_run"]

log = logging.getLogger(__name__)


def runs_dir() -> Path:
    """``models/inversion_runs`` (the first folder registered under that name)."""
    return Path(folder_paths.get_folder_paths(RUNS)[0])


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another file system
        shutil.move(str(src), str(dst))


def migrate_side_files(name: str | None = None) -> list[tuple[Path, Path]]:
    """Move old ``<stem>.state.safetensors`` side files out of the embeddings folders.

    Only files whose header is a training state are moved (an embedding someone named
    ``x.state`` stays); a run folder that already has a state gets the old one as
    ``legacy.state.safetensors``. ``name`` limits the sweep to that concept.
    """
    moved = []
    for folder in folder_paths.get_folder_paths("embeddings"):
        root = Path(folder)
        if not root.is_dir():
            continue
        pattern = f"{name}{STATE_SUFFIX}" if name else f"*{STATE_SUFFIX}"
        for src in sorted(root.glob(pattern)):
            if not src.is_file() or not is_state_file(src):
                continue
            stem = src.name[: -len(STATE_SUFFIX)]
            try:
                validate_name(stem)
            except ValueError:
                continue
            dst = runs_dir() / stem / "state.safetensors"
            if dst.exists():
                dst = dst.with_name("legacy.state.safetensors")
            try:
                _move(src, dst)
            except OSError as e:
                log.warning("could not move the training-state file %s to %s: %s", src, dst, e)
                continue
            log.info("moved the training-state file %s to %s (kept out of models/embeddings)", src, dst)
            moved.append((src, dst))
    return moved


def run_files(names: str | Sequence[str], node: str | None = None) -> RunFiles:
    """The files of a run of ``names`` in ComfyUI's folders (``models/embeddings``, ``models/inversion_runs``):
    warnings as toasts on ``node``, ComfyUI's Cancel as the stop from outside."""
    return RunFiles.at(names, Path(embeddings_dir()), runs_dir(), **_comfy(node))


def open_run(names: str | Sequence[str], if_exists: str, node: str | None = None):
    """``RunFiles.open`` in ComfyUI's folders, after moving the concepts' old side files out of models/embeddings."""
    for n in [names] if isinstance(names, str) else names:
        migrate_side_files(n)
    return RunFiles.open(names, if_exists, Path(embeddings_dir()), runs_dir(), **_comfy(node))


def _comfy(node: str | None) -> dict:
    return {"warn": lambda message: warn_user(node, message),
            "interrupted": (comfy.model_management.InterruptProcessingException,),
            "check_cancel": comfy.model_management.throw_exception_if_processing_interrupted}
