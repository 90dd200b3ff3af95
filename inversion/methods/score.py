"""A deterministic score of the learned vectors, the best step, and DVAR's early-stopping rule.

DVAR (Voronov et al., "Is This Loss Informative? Faster Text-to-Image Customization by Tracking
Objective Dynamics", NeurIPS 2023) evaluates the diffusion loss on a FIXED set of (image, noise,
timestep) draws, so the only thing that changes between two evaluations is the vectors: the curve
is smooth where the training loss (a new draw every step) is noise. With the evaluated values
L_1..L_n it stops training once the curve has flattened,

    Var(L_{n-w+1..n}) / Var(L_1..n) < threshold,          w = 310, threshold = 0.15 for TI,

the variance of the last ``w`` values against that of all of them. The authors' code is public
(github.com/yandex-research/DVAR); this module implements the rule from the paper's description and
was not compared with that code here (this project's machines cannot reach it): population variances
(ddof 0), at least ``w`` values before it can fire, and a curve with no variance at all (every value
equal, nothing learned yet) never fires: early stop must only ever end a run that has moved. The
paper scores every step; with ``every`` > 1 the window counts evaluations, not steps (w evaluations
= w x every steps). The score is the training objective itself: the same masked loss, on a fixed set
of draws that does not grow with the batch size.

Note the rule is relative: a curve that keeps falling in a straight line has
Var(last w) / Var(all n) = (w^2 - 1) / (n^2 - 1), which drops below 0.15 once n > 2.58 w, so even a
steady decline stops after about 2.6 windows; before that only a flattening stops it.

The best step is the evaluation with the LOWEST score (the earliest on a tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["ScoreConfig", "KEEP", "DVAR_WINDOW", "DVAR_THRESHOLD", "deterministic_score", "dvar_ratio",
           "dvar_should_stop", "dvar_stop_index", "best_step", "check_score_settings"]

DVAR_WINDOW = 310  # the paper's textual-inversion setting
DVAR_THRESHOLD = 0.15
KEEP = ("last", "best")  # which step's vectors a finished run's embedding file holds


@dataclass(frozen=True)
class ScoreConfig:
    """When and on which fixed draws the vectors are scored."""

    every: int = 0  # 0 = off; else score after every N optimiser steps (each costs ``draws`` forward passes)
    # Fixed draws per concept, whatever the run's batch size (DVAR scores one fixed set): 4 keep a score
    # near one B = 1 training step's cost (a step is a forward and a backward pass) over several images.
    draws: int = 4
    # One fixed set for every run (not the run's seed): scores of runs with different seeds compare.
    seed: int = 12345

    def validate(self) -> "ScoreConfig":
        if self.every < 0:
            raise ValueError(f"score_every must be >= 0 (0 = off), got {self.every}")
        if self.draws < 1:
            raise ValueError(f"score draws must be >= 1, got {self.draws}")
        return self


def check_score_settings(score_every: int, early_stop: bool, dvar_window: int, dvar_threshold: float,
                         keep: str) -> None:
    """The run's scoring settings (``TrainConfig``, ``TrainingOptions``); errors name the input."""
    if score_every < 0:
        raise ValueError(f"score_every must be >= 0 (0 = off), got {score_every}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if not score_every and (early_stop or keep == "best"):
        raise ValueError("early_stop and keep = 'best' need the deterministic score: set score_every > 0 "
                         "(1 is DVAR's cadence), or turn early_stop off and keep 'last'")
    if dvar_window < 2 or not 0.0 < dvar_threshold < 1.0:
        raise ValueError(f"dvar_window must be >= 2 evaluations and dvar_threshold in (0, 1), got "
                         f"{dvar_window} and {dvar_threshold}")


def deterministic_score(trainer: Any, config: ScoreConfig) -> float:
    """The training loss (masked as training masks it) of the current vectors on ``config``'s fixed draws
    (``Trainer.evaluate``): the concept images, noise and timesteps of each draw depend only on
    ``config.seed``, not on the run's batch size or step."""
    return trainer.evaluate(config.draws, config.seed)


def _variance(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def dvar_ratio(values: Sequence[float], window: int = DVAR_WINDOW) -> float | None:
    """Var(last ``window`` values) / Var(all values); None with fewer than ``window`` values, or
    when all of them are equal (0 / 0: the curve has not moved, so it cannot have flattened)."""
    if window < 2:
        raise ValueError(f"dvar_window must be >= 2 (a variance needs two values), got {window}")
    vals = [float(v) for v in values]
    if len(vals) < window or not all(math.isfinite(v) for v in vals[-window:]):
        return None
    finite = [v for v in vals if math.isfinite(v)]
    total = _variance(finite)
    last = _variance(vals[-window:])
    return last / total if total > 0.0 else None


def dvar_should_stop(values: Sequence[float], window: int = DVAR_WINDOW, threshold: float = DVAR_THRESHOLD) -> bool:
    """DVAR's rule on the evaluated values so far: Var(L_{n-w+1..n}) / Var(L_1..n) < ``threshold``."""
    ratio = dvar_ratio(values, window)
    return ratio is not None and ratio < threshold


def dvar_stop_index(values: Sequence[float], window: int = DVAR_WINDOW,
                    threshold: float = DVAR_THRESHOLD) -> int | None:
    """The number of values n at which the rule first fires on a whole curve (None: it never does)."""
    vals = list(values)
    return next((n for n in range(window, len(vals) + 1) if dvar_should_stop(vals[:n], window, threshold)), None)


def best_step(steps: Sequence[int], scores: Sequence[float]) -> tuple[int, float] | None:
    """(step, score) of the lowest finite score, the earliest on a tie; None without one."""
    if len(steps) != len(scores):
        raise ValueError(f"best_step: {len(steps)} steps but {len(scores)} scores; pass one score per step")
    best = None
    for s, v in zip(steps, scores):
        v = float(v)
        if math.isfinite(v) and (best is None or v < best[1]):
            best = (int(s), v)
    return best
