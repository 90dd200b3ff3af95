"""Statistics for the world benchmark: paired differences with bootstrap intervals, steps to a
threshold per seed, and the equal-wall-clock view.

Every method runs on the same seeds (same concept images, same evaluation noise per seed), so a
method is compared with vanilla seed by seed: d_s = m(method, s) - m(vanilla, s), and the 95 %
interval of mean(d) comes from resampling seeds with replacement (percentile bootstrap, Efron &
Tibshirani 1993). Steps to a threshold are read per seed on its own accuracy curve; a seed that
never reaches it counts as "not reached" (infinite), so the median (not the mean) is reported with
a bootstrap interval that may be open-ended.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Callable, Sequence

__all__ = ["bootstrap_ci", "paired_difference", "steps_to_threshold", "median_ci", "seconds_to_threshold",
           "area_under_curve", "value_at", "sign_flip_p", "holm"]

INF = float("inf")


def bootstrap_ci(values: Sequence[float], stat: Callable[[list[float]], float] = statistics.fmean,
                 n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): the percentile bootstrap interval of ``stat`` over ``values``."""
    vals = list(values)
    if not vals:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(stat([vals[rng.randrange(len(vals))] for _ in vals]) for _ in range(n_boot))
    lo = boots[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = boots[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return stat(vals), lo, hi


def paired_difference(method: dict[int, float], base: dict[int, float], **kw) -> dict:
    """Mean of ``method[s] - base[s]`` over the seeds both have, with its bootstrap interval and the
    number of seeds where the method is ahead."""
    seeds = sorted(set(method) & set(base))
    diffs = [method[s] - base[s] for s in seeds]
    mean, lo, hi = bootstrap_ci(diffs, **kw)
    return {"mean": mean, "low": lo, "high": hi, "seeds": len(seeds), "ahead": sum(d > 0 for d in diffs),
            "behind": sum(d < 0 for d in diffs)}


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired differences ``diffs`` against "no difference": the exact
    sign-flip permutation test (under the null each seed's difference is as likely to have either
    sign, so all 2^n sign patterns are equally likely; p = the share whose |mean| is at least the
    observed one). Exact for n <= 16 seeds; a seeded sample of 2^16 patterns beyond."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        return 1.0
    observed = abs(sum(d)) - 1e-12
    if n <= 16:
        patterns = range(2 ** n)
        total = 2 ** n
    else:
        rng = random.Random(0)
        total = 2 ** 16
        patterns = (rng.getrandbits(n) for _ in range(total))
    hits = 0
    for bits in patterns:
        s = sum(x if (bits >> i) & 1 else -x for i, x in enumerate(d))
        hits += abs(s) >= observed
    return hits / total


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979) for a family of m comparisons: sorted ascending,
    p_(i) x (m - i + 1), made monotone and capped at 1; a comparison holds at level a when its adjusted
    p-value is below a (the family-wise error rate stays below a)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def steps_to_threshold(steps: Sequence[int], acc: Sequence[float], threshold: float, sustain: int = 2) -> float:
    """The first evaluated step from which the curve stays >= ``threshold`` for ``sustain``
    evaluations in a row (a single lucky evaluation of a noisy curve does not count); INF if never."""
    run = 0
    for i, a in enumerate(acc):
        run = run + 1 if a >= threshold else 0
        if run >= sustain:
            return float(steps[i - sustain + 1])
    return INF


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ci(values: Sequence[float], **kw) -> tuple[float, float, float]:
    """Median with its bootstrap interval; INF values (not reached) take part as the largest."""
    return bootstrap_ci(values, stat=_median, **kw)


def seconds_to_threshold(steps_needed: float, seconds_per_step: float, fixed_seconds: float = 0.0) -> float:
    """Wall clock to reach a threshold: the steps at the method's measured step cost, plus what it
    pays once before training (the profiler's run, for the methods that need a profile)."""
    return INF if math.isinf(steps_needed) else fixed_seconds + steps_needed * seconds_per_step


def area_under_curve(steps: Sequence[int], acc: Sequence[float]) -> float:
    """Mean accuracy over the run (trapezoid rule over steps): a convergence-speed measure."""
    if len(steps) < 2:
        return float("nan")
    area = sum((steps[i + 1] - steps[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``ys`` linearly interpolated at ``x`` (held at the ends)."""
    if x <= xs[0]:
        return float(ys[0])
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return float(ys[i - 1] + f * (ys[i] - ys[i - 1]))
    return float(ys[-1])
