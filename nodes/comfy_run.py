"""A long job inside a ComfyUI prompt: progress bar, Cancel, live chart events, embedding files.

The library reports each training step through one callback with plain data (``StepInfo``);
``TrainReporter`` turns it into ComfyUI's progress bar, the Cancel check and the
``inversion.progress`` websocket event that ``web/js/inversion_charts.js`` draws live. Cancel is
ComfyUI's ``InterruptProcessingException`` (raised once, after the step in progress): the caller
saves the last good vectors before letting it propagate, because a node that returns normally
would have its partial result cached as if complete (../shared/COMFYUI_NOTES.md section 4).

A run of several concepts adds, to every event and to the final chart, ``concepts`` (the names in
the run's order) and per concept its mean vector norm (``concept_vector_norm``) and the mean loss
of its samples in the step (``concept_loss``, null for a step that drew none of it): a curve each.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths

from ..inversion.embedding import validate_name

__all__ = ["EVENT", "WARNING_EVENT", "UI_KEY", "TrainReporter", "send_event", "warn_user", "check_cancel",
           "progress_callback",
           "embeddings_dir", "embedding_path", "history_payload"]

log = logging.getLogger(__name__)

EVENT = "inversion.progress"  # read by web/js/inversion_charts.js
WARNING_EVENT = "inversion.warning"  # shown as a toast by web/js/inversion_warnings.js
UI_KEY = "inversion_chart"  # the node's final UI output the chart widget restores from


def check_cancel() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _send(event: str, payload: dict[str, Any]) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, payload)


def send_event(node_id: str | None, payload: dict[str, Any]) -> None:
    """Broadcast an ``inversion.progress`` event for node ``node_id`` (no-op without a server)."""
    if node_id is None:
        return
    _send(EVENT, {"node": str(node_id), **payload})


def warn_user(node_id: str | None, message: str) -> None:
    """Tell the user something went wrong but the run goes on: the server log, and a toast in the browser.

    Console-only warnings go unseen by most users (the probe's finding); ``inversion.warning`` is
    shown by ``web/js/inversion_warnings.js`` as ComfyUI's toast, naming the node.
    """
    log.warning("%s", message)
    _send(WARNING_EVENT, {"node": None if node_id is None else str(node_id), "message": str(message)})


def progress_callback(total: int, node_id: str | None = None):
    """A library progress callback (any ``inversion.progress.Progress``): ComfyUI's progress bar, and
    its Cancel check after every report."""
    bar = comfy.utils.ProgressBar(max(1, total), node_id=node_id)

    def callback(p) -> None:
        check_cancel()
        bar.update_absolute(p.step, max(1, p.total or total))

    return callback


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


class TrainReporter:
    """The trainer's callback: progress bar, Cancel check, live chart event. Returns None (go on)."""

    def __init__(self, node_id: str | None, total: int, method: str, num_timesteps: int, start: int = 0,
                 concepts: list[str] | None = None):
        self.node_id = node_id
        self.concepts = concepts  # the names of a run of several concepts (None with one)
        self.method = method
        self.num_timesteps = num_timesteps
        self.last = None  # the latest StepInfo (the final chart shows its sampler estimate)
        self.best: tuple[int, float] | None = None  # (step, score) of the lowest score so far
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        if start:
            self.bar.update_absolute(start, total)

    def __call__(self, info) -> None:
        self.last = info
        if info.score is not None and (self.best is None or info.score < self.best[1]):
            self.best = (info.step, float(info.score))
        send_event(self.node_id, {
            "kind": "train", "step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
            "grad_norm": info.grad_norm, "timesteps": list(info.timesteps),
            "vector_norm": _mean(x for v in info.vector_norms.values() for x in v),
            "g_estimate": info.g_estimate, "bin_edges": info.bin_edges,
            "target_norm": None if not info.target_norms else _mean(info.target_norms.values()),
            "num_timesteps": self.num_timesteps, "method": self.method,
            "score": info.score, **_best(self.best),
            **({"stop_step": info.step, "stop_reason": info.stop_reason} if info.stop_reason else {}),
            **_concepts(self.concepts, info),
        })
        for message in info.warnings:
            warn_user(self.node_id, message)
        self.bar.update_absolute(info.step, info.total)  # inside a server this also checks Cancel
        check_cancel()


def _concepts(names: list[str] | None, info) -> dict[str, Any]:
    """A step's per-concept values for the live chart (nothing for a run of one concept)."""
    if not names or info.concept_norms is None:
        return {}
    return {"concepts": list(names), "concept_vector_norm": list(info.concept_norms),
            "concept_loss": list(info.concept_loss or [None] * len(names))}


def _best(best: tuple[int, float] | None) -> dict[str, Any]:
    return {"best_step": None if best is None else best[0], "best_score": None if best is None else best[1]}


def history_payload(history, *, method: str, num_timesteps: int, total: int, last_info=None,
                    stop_step: int | None = None, stop_reason: str = "",
                    concepts: list[str] | None = None) -> dict[str, Any]:
    """The final chart data (``ui[UI_KEY]``): the whole history (``score_step`` / ``score`` when scored)
    plus the sampler's last estimate, the best-scored step, and where early stop fired. ``concepts``:
    the names of a run of several (its history's ``concept_*`` series follow them)."""
    d = {"kind": "train", **history.to_dict(), "method": method, "num_timesteps": num_timesteps, "total": total,
         **_best(history.best())}
    if concepts:
        d["concepts"] = list(concepts)
    if stop_step is not None:
        d.update(stop_step=stop_step, stop_reason=stop_reason)
    if last_info is not None:
        d["g_estimate"] = last_info.g_estimate
        d["bin_edges"] = last_info.bin_edges
        d["target_norm"] = None if not last_info.target_norms else _mean(last_info.target_norms.values())
    return d


def embeddings_dir() -> str:
    """The first ``models/embeddings`` folder ComfyUI searches (where ``embedding:<name>`` looks)."""
    folder = folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def embedding_path(name: str) -> str:
    """``models/embeddings/<name>.safetensors`` for a valid concept name."""
    return os.path.join(embeddings_dir(), f"{validate_name(name)}.safetensors")
