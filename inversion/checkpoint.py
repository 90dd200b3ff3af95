"""Checkpoints on disk: embeddings other UIs load, plus a side file to continue the run exactly.

A checkpoint of a run at step s is
- ``<stem>.safetensors`` per concept: the embedding as any UI loads it (``save_embedding``), and
- ``<stem>.state.safetensors``: the learned vectors, the optimiser's and the timestep sampler's
  state, the history and the step, so ``Trainer(..., resume=load_state(path))`` continues as if
  never stopped (every random draw of step s depends only on (seed, s)).
A plain embedding file also resumes (``state_from_embedding``): the vectors and the step count
come back, the optimiser starts fresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .embedding import LearnedEmbedding
from .formats import load_embedding, load_train_state, save_embedding, save_train_state
from .trainer import TrainHistory, Trainer, TrainState

__all__ = ["save_checkpoint", "load_state", "state_from_embedding", "state_path_for"]

STATE_SUFFIX = ".state.safetensors"


def state_path_for(embedding_path: str | os.PathLike) -> Path:
    """The side file that belongs to an embedding file (``x.safetensors`` -> ``x.state.safetensors``)."""
    p = Path(embedding_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + STATE_SUFFIX)


def _split(prefix: str, d: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        else:
            meta[f"{prefix}.{k}"] = v


def save_checkpoint(trainer: Trainer, paths: Sequence[str | os.PathLike], *, overwrite: bool = True) -> list[Path]:
    """Write each concept's embedding to ``paths[i]`` and the run state beside the first one."""
    embs = trainer.embeddings()
    if len(paths) != len(embs):
        raise ValueError(f"need one path per concept ({len(embs)}), got {len(paths)}")
    written = [save_embedding(e, p, overwrite=overwrite) for e, p in zip(embs, paths)]
    st = trainer.state()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    _split("vec", st.vectors, tensors, extra)
    _split("opt", st.optimizer, tensors, extra)
    _split("smp", st.sampler, tensors, extra)
    meta = {
        "step": str(st.step),
        "history": json.dumps(st.history.to_dict()),
        "extra": json.dumps(extra),
        "concepts": json.dumps([{"name": e.name, "placeholder": e.placeholder, "k": e.num_vectors} for e in embs]),
        "sampler": trainer.sampler.describe(),
        "optimizer": type(trainer.optimizer).__name__,
    }
    save_train_state(state_path_for(written[0]), tensors, meta, overwrite=True)
    return written


def load_state(path: str | os.PathLike) -> TrainState:
    """Read a run state written by ``save_checkpoint`` (give the state file or its embedding file)."""
    p = Path(path)
    if not p.name.endswith(STATE_SUFFIX):
        p = state_path_for(p)
    if not p.exists():
        raise FileNotFoundError(f"no training-state file {p}; resume from the embedding alone with "
                                "state_from_embedding (the optimiser then starts fresh)")
    tensors, meta = load_train_state(p)
    extra = json.loads(meta.get("extra", "{}"))
    parts: dict[str, dict[str, Any]] = {"vec": {}, "opt": {}, "smp": {}}
    for k, v in list(tensors.items()) + list(extra.items()):
        prefix, _, name = k.partition(".")
        if prefix in parts:
            parts[prefix][name] = v
    return TrainState(int(meta["step"]), parts["vec"], parts["opt"], parts["smp"],
                      TrainHistory.from_dict(json.loads(meta.get("history", "{}"))))


def state_from_embedding(emb: LearnedEmbedding | str | os.PathLike) -> TrainState:
    """Resume from an embedding file alone: its vectors and its recorded step count."""
    if not isinstance(emb, LearnedEmbedding):
        emb = load_embedding(emb)
    step = int(emb.metadata.get("steps", "0") or 0)
    return TrainState(step, {k: v.clone() for k, v in emb.vectors.items()}, {}, {}, TrainHistory())
