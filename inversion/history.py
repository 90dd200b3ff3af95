"""What a training run reports and keeps, as plain data: each step's report (``StepInfo``), the run's
history for charts and resume (``TrainHistory``), its exact-resume state (``TrainState``) and result
(``TrainResult``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from .embedding import LearnedEmbedding
from .progress import Progress
from .methods.score import best_step

__all__ = ["StepInfo", "TrainHistory", "TrainState", "TrainResult"]


@dataclass
class StepInfo(Progress):
    """Plain per-step data handed to the callback (progress, previews, charts, cancellation).

    ``step`` is the 1-based number of optimiser steps done, of ``total``."""

    loss: float  # mean diffusion loss of the step (without regularisers)
    reg_loss: float
    lr: float
    timesteps: list[int]
    grad_norms: list[float]  # Eq. 4 g for each sample of the step
    grad_norm: float  # their mean
    vector_norms: dict[str, list[float]]  # per encoder, per learned vector, after the step
    elapsed: float  # seconds since the run started
    sampler: str = ""
    g_estimate: list[float] | None = None  # adaptive sampler's per-bin g(t), if any
    bin_edges: list[int] | None = None  # and its bin edges (timesteps)
    target_norms: dict[str, float] | None = None  # DTI's fixed norm m* per encoder, if any
    warnings: list[str] = field(default_factory=list)  # new this step, for the user (once per run each)
    # Dynamic loss scaling (fp16): a skipped step changed nothing (its gradient or loss overflowed; its
    # grad_norms are 0 and its loss the last finite one, never NaN); the scale the next step uses.
    skipped: bool = False
    loss_scale: float | None = None  # None without loss scaling
    score: float | None = None  # the deterministic score (``score.py``) of this step's vectors, when scored
    stop_reason: str | None = None  # set on the step at which the run's own rule (DVAR) stopped it
    # Runs of several concepts only (None with one): per concept, in ``Trainer.concepts`` order, the mean
    # diffusion loss of its samples in this step (None if the step drew none of it) and the mean norm of
    # its vectors over every encoder, after the step.
    concept_loss: list[float | None] | None = None
    concept_norms: list[float] | None = None
    # Runs that train further parameter groups beside the vectors (``groups.py``; None without): per group,
    # its report and the learning rate it stepped with.
    groups: dict[str, dict[str, Any]] | None = None


@dataclass
class TrainHistory:
    """Everything needed for plots, in plain lists."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    timesteps: list[list[int]] = field(default_factory=list)
    sample_grad_norms: list[list[float]] = field(default_factory=list)
    vector_norm: list[float] = field(default_factory=list)  # mean over vectors and encoders
    score_step: list[int] = field(default_factory=list)  # the steps that were scored (``score.py``)
    score: list[float] = field(default_factory=list)  # their deterministic scores
    # Several concepts (empty with one): per step, one value per concept (``StepInfo.concept_*``)
    concept_loss: list[list[float | None]] = field(default_factory=list)
    concept_vector_norm: list[list[float]] = field(default_factory=list)

    def append(self, info: StepInfo) -> None:
        if info.score is not None:
            self.score_step.append(info.step)
            self.score.append(float(info.score))
        self.step.append(info.step)
        self.loss.append(info.loss)
        self.lr.append(info.lr)
        self.grad_norm.append(info.grad_norm)
        self.timesteps.append(list(info.timesteps))
        self.sample_grad_norms.append(list(info.grad_norms))
        norms = [x for v in info.vector_norms.values() for x in v]
        self.vector_norm.append(sum(norms) / max(1, len(norms)))
        if info.concept_norms is not None:
            self.concept_vector_norm.append(list(info.concept_norms))
            self.concept_loss.append(list(info.concept_loss or [None] * len(info.concept_norms)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainHistory":
        """From ``to_dict()``; a history saved before a list existed gets it empty."""
        return cls(**{k: list(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def upto(self, n: int) -> "TrainHistory":
        """The history of the first ``n`` recorded steps (scores of later steps dropped)."""
        last = self.step[n - 1] if 0 < n <= len(self.step) else 0
        keep = sum(1 for s in self.score_step if s <= last) if n > 0 else 0
        d = {k: v[:keep] if k in ("score_step", "score") else v[:n] for k, v in self.to_dict().items()}
        return TrainHistory.from_dict(d)

    def best(self) -> tuple[int, float] | None:
        """(step, score) of the lowest deterministic score, the earliest on a tie; None if never scored."""
        return best_step(self.score_step, self.score)


@dataclass
class TrainState:
    """What a checkpoint needs to continue a run exactly: step, vectors, optimiser, sampler, history."""

    step: int
    vectors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    sampler: dict[str, Any]
    history: TrainHistory
    # The other parameter groups (``groups.py``), by name: "param.<key>" the last good parameters,
    # "state.<key>" their optimiser and schedule state. Empty for a run of the vectors alone.
    groups: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class TrainResult:
    embeddings: list[LearnedEmbedding]  # the last step's vectors
    history: TrainHistory
    steps_done: int
    stopped_early: bool  # before ``config.steps``: the callback asked, or the run's own rule (below)
    stop_step: int | None = None  # the step at which early_stop's rule (DVAR) fired, if it did
    stop_reason: str = ""  # what it saw

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, score) of the lowest deterministic score of the run; None if it was never scored."""
        return self.history.best()

    @property
    def embedding(self) -> LearnedEmbedding:
        return self.embeddings[0]
