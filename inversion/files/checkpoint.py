"""Checkpoints on disk: embeddings other UIs load, plus a state file to continue the run exactly.

A checkpoint of a run at step s is
- ``<stem>.safetensors`` per concept: the embedding as any UI loads it (``save_embedding``), and
- a state file: the learned vectors, the optimiser's and the timestep sampler's state, the history,
  the step, and any further parameter group's parameters and state (``grp.<name>.*``), so ``Trainer(..., resume=load_state(path))`` continues as if never stopped (every
  random draw of step s depends only on (seed, s)). Give it a folder of its own (``state_path``):
  beside the embedding (``<stem>.state.safetensors``, the default) it is listed by every UI that
  scans the embeddings folder, which ComfyUI offers as ``embedding:<stem>.state`` and A1111 logs
  as "multiple terms" (issue 17). The ComfyUI nodes keep it in ``models/inversion_runs/<name>/``.
  Its header says whether the embedding files were written with it (``embeddings_written``), so a
  resume can tell the run's own embedding from one it must not replace yet.
A plain embedding file also resumes (``state_from_embedding``): the vectors and the step count
come back, the optimiser starts fresh. The state file is a safetensors file (tensors plus string
metadata), written atomically by ``save_train_state`` and read by ``load_train_state`` (``safefile``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..embedding import LearnedEmbedding
from .formats import load_embedding, save_embedding
from .safefile import atomic_save_safetensors, read_safetensors, read_safetensors_header
from ..trainer import TrainHistory, Trainer, TrainState

__all__ = ["save_checkpoint", "load_state", "read_state_meta", "is_state_file", "state_from_embedding",
           "state_path_for", "StateFileError", "save_train_state", "load_train_state"]

STATE_SUFFIX = ".state.safetensors"


def state_path_for(embedding_path: str | os.PathLike) -> Path:
    """The side file that belongs to an embedding file (``x.safetensors`` -> ``x.state.safetensors``)."""
    p = Path(embedding_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + STATE_SUFFIX)


def save_train_state(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    overwrite: bool = True,
) -> Path:
    """Write a trainer checkpoint's tensors and string metadata (JSON the trainer made) atomically."""
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_train_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read back ``save_train_state``'s tensors (on the CPU, as saved) and metadata strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train state file {path} does not exist")
    return read_safetensors(path, what="the checkpoint")


def _split(prefix: str, d: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        else:
            meta[f"{prefix}.{k}"] = v


class StateFileError(ValueError):
    """A training-state file that cannot be used; the message says what to do."""


def save_checkpoint(trainer: Trainer, paths: Sequence[str | os.PathLike], *, overwrite: bool = True,
                    state_path: str | os.PathLike | None = None, write_embeddings: bool = True) -> list[Path]:
    """Write each concept's embedding to ``paths[i]`` and the run state to ``state_path``.

    ``state_path`` defaults to ``state_path_for(paths[0])`` (beside the first embedding).
    ``write_embeddings=False`` writes the state alone (its vectors resume the run), for a run that
    must not replace the embedding files yet; the returned list is then empty.
    """
    embs = trainer.embeddings()
    if len(paths) != len(embs):
        raise ValueError(f"need one path per concept ({len(embs)}), got {len(paths)}")
    written = [save_embedding(e, p, overwrite=overwrite) for e, p in zip(embs, paths)] if write_embeddings else []
    st = trainer.state()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    _split("vec", st.vectors, tensors, extra)
    _split("opt", st.optimizer, tensors, extra)
    _split("smp", st.sampler, tensors, extra)
    for name, entries in st.groups.items():  # further parameter groups: grp.<name>.param.* / grp.<name>.state.*
        _split(f"grp.{name}", entries, tensors, extra)
    meta = {
        "step": str(st.step),
        "history": json.dumps(st.history.to_dict()),
        "extra": json.dumps(extra),
        "concepts": json.dumps([{"name": e.name, "placeholder": e.placeholder, "k": e.num_vectors} for e in embs]),
        "sampler": trainer.sampler.describe(),
        "optimizer": type(trainer.optimizer).__name__,
        "embeddings_written": "1" if write_embeddings else "0",
    }
    target = Path(state_path) if state_path is not None else state_path_for(paths[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_train_state(target, tensors, meta, overwrite=True)
    return written


_STATE_KEYS = ("step", "history", "concepts")


def read_state_meta(path: str | os.PathLike) -> dict[str, str] | None:
    """The header of a training-state file, or None if ``path`` is not one (read without the tensors)."""
    try:
        meta, _ = read_safetensors_header(path)
    except ValueError:  # unreadable means "not a state file we can use"
        return None
    return meta if all(k in meta for k in _STATE_KEYS) else None


def is_state_file(path: str | os.PathLike) -> bool:
    """True for a file ``save_checkpoint`` wrote as a run state (not an embedding)."""
    return read_state_meta(path) is not None


def _unusable(p: Path, why: str) -> StateFileError:
    return StateFileError(f"the training-state file {p} cannot be used: {why}. Delete it to resume from the "
                          "embedding alone (the optimiser restarts), or train with if_exists = overwrite")


def load_state(path: str | os.PathLike) -> TrainState:
    """Read a run state written by ``save_checkpoint`` (the state file, or an embedding beside its state file).

    A file that is unreadable or not a state raises ``StateFileError``, which says what to do.
    """
    p = Path(path)
    if not p.name.endswith(STATE_SUFFIX) and (state_path_for(p).exists() or not p.exists()):
        p = state_path_for(p)  # given the embedding beside its state file
    if not p.exists():
        raise FileNotFoundError(f"no training-state file {p}; resume from the embedding alone with "
                                "state_from_embedding (the optimiser then starts fresh)")
    try:
        tensors, meta = load_train_state(p)
    except ValueError as e:
        raise _unusable(p, str(e)) from None
    try:
        extra = json.loads(meta.get("extra", "{}"))
        parts: dict[str, dict[str, Any]] = {"vec": {}, "opt": {}, "smp": {}}
        groups: dict[str, dict[str, Any]] = {}
        for k, v in list(tensors.items()) + list(extra.items()):
            prefix, _, name = k.partition(".")
            if prefix in parts:
                parts[prefix][name] = v
            elif prefix == "grp":
                group, _, key = name.partition(".")
                groups.setdefault(group, {})[key] = v
        if "step" not in meta or not parts["vec"]:
            raise KeyError("step" if "step" not in meta else "vectors")
        return TrainState(int(meta["step"]), parts["vec"], parts["opt"], parts["smp"],
                          TrainHistory.from_dict(json.loads(meta.get("history", "{}"))), groups)
    except (KeyError, ValueError, TypeError) as e:
        raise _unusable(p, f"it is not a state this trainer wrote (missing or bad {e})") from None


def state_from_embedding(emb: LearnedEmbedding | str | os.PathLike) -> TrainState:
    """Resume from an embedding file alone: its vectors and its recorded step count."""
    if not isinstance(emb, LearnedEmbedding):
        emb = load_embedding(emb)
    step = int(emb.metadata.get("steps", "0") or 0)
    return TrainState(step, {k: v.clone() for k, v in emb.vectors.items()}, {}, {}, TrainHistory())
