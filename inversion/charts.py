"""Training charts drawn with PIL alone, returned as ComfyUI-style IMAGE rows.

Every renderer returns a float32 tensor [H, W, 3] with values in [0, 1] (one row of a ComfyUI
IMAGE batch; the node layer adds the batch dimension). No plotting library is needed for a few
line series, and the same dicts the web extension draws live (``inversion.progress`` events and
the node's final ``inversion_chart`` UI output) are accepted here, so the saved chart and the live
one show the same numbers.

- ``loss_chart(history)``: raw and EMA-smoothed loss against step; the timesteps sampled, as a
  histogram over [0, T); for the adaptive sampler the current per-bin estimate of
  g(t) = E||grad_c ||eps_hat - eps|| || (seeds/000 Eq. 4/5); the mean norm of the learned vectors,
  with DTI's fixed magnitude m* (seeds/002) as a reference line when given. A run of several concepts
  (``concepts`` with ``concept_loss`` / ``concept_vector_norm``) adds each concept's smoothed loss and
  draws each concept's mean vector norm, a colour per concept.
- ``profile_chart(profile)``: a gradient-norm profile g(t) (seeds/000 Eq. 4), its per-bin mean with
  a +-std band, and the high-grad window (the best window of seeds/000 Sec. 3) highlighted.
- ``similarity_chart(values)``: OVI's cosine-similarity curve over optimisation steps (seeds/004).
- ``inspect_chart(rows)``: each learned vector's norm over the vocabulary's norm distribution, and
  its cosine to the final vector across a run's snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .methods.profiler import GradProfile
from .methods.score import best_step

__all__ = ["loss_chart", "concept_series", "profile_chart", "similarity_chart", "curves_chart", "inspect_chart", "ema", "nice_ticks",
           "font", "to_image"]

# A light theme: these images end up in previews, saved PNGs and READMEs.
BACKGROUND = (255, 255, 255)
PANEL = (250, 250, 252)
FRAME = (90, 90, 100)
GRID = (226, 228, 234)
TEXT = (30, 30, 36)
MUTED = (110, 112, 122)
RAW = (160, 190, 235)  # raw loss: light, so the smoothed curve reads on top of it
SMOOTH = (25, 90, 200)
HIST = (120, 160, 110)
GEST = (215, 120, 30)
NORM = (140, 70, 170)
TARGET = (200, 40, 40)
BAND = (250, 215, 170)
WINDOW = (255, 236, 150)
SCORE = (0, 140, 120)  # the deterministic score (score.py): smooth, so a strong colour
STOP = (200, 40, 40)
CLIP_IMAGE = (30, 150, 60)  # CLIP similarity of previews to the concept images (clip_score.py)
CLIP_TEXT = (205, 50, 150)  # ... and of the edit previews to their prompts
# One per concept of a multi-concept run, in order (cycled beyond six).
CONCEPT_COLORS = ((214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75))

_FONTS: dict[int, Any] = {}


def font(size: int):
    """PIL's bundled font at ``size`` px (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, OSError, ImportError):  # old Pillow, or Pillow built without FreeType
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def to_image(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor [H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average: s_t = a s_(t-1) + (1 - a) x_t, reported as s_t / (1 - a^t).

    Non-finite values are skipped (their position gets the current average, NaN before the first
    finite value), so a diverged step does not poison the smoothed curve.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, s, w = [], 0.0, 0.0
    for x in values:
        x = float(x) if x is not None else math.nan
        if math.isfinite(x):
            s = smoothing * s + (1.0 - smoothing) * x
            w = smoothing * w + (1.0 - smoothing)
        out.append(s / w if w > 0 else math.nan)
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _fmt(v: float, span: float) -> str:
    """Tick label: integers plainly, small/large magnitudes in short scientific form."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    if span >= 5 and float(v).is_integer():
        return str(int(v))
    digits = max(0, min(4, 1 - int(math.floor(math.log10(max(span, 1e-12))))))
    return f"{v:.{digits}f}"


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _floats(values: Iterable[Any] | None) -> list[float]:
    """Values as floats, None/unparseable/non-finite entries as NaN (drawn as gaps)."""
    out = []
    for v in values or []:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) else math.nan)
    return out


def _flatten_ints(values: Any) -> list[int]:
    out: list[int] = []
    for v in values or []:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten_ints(v))
        elif isinstance(v, torch.Tensor):
            out.extend(int(x) for x in v.flatten().tolist())
        elif v is not None:
            out.append(int(v))
    return out


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} must be a dict (or an object with to_dict()), got {type(obj).__name__}")
    return dict(obj)


@dataclass
class _Axes:
    """A plot area: pixel box (left, top, right, bottom) and the data ranges mapped onto it."""

    draw: ImageDraw.ImageDraw
    box: tuple[int, int, int, int]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float) -> float:
        x0, x1 = self.xlim
        left, _, right, _ = self.box
        return left + (x - x0) / ((x1 - x0) or 1.0) * (right - left)

    def py(self, y: float) -> float:
        y0, y1 = self.ylim
        _, top, _, bottom = self.box
        return bottom - (y - y0) / ((y1 - y0) or 1.0) * (bottom - top)

    def frame(self, title: str, xlabel: str, *, xint: bool = False, yint: bool = False) -> None:
        d, (left, top, right, bottom) = self.draw, self.box
        d.rectangle(self.box, fill=PANEL)
        small = font(11)
        xs = [t for t in nice_ticks(*self.xlim, n=max(3, (right - left) // 80)) if self.xlim[0] <= t <= self.xlim[1]]
        ys = [t for t in nice_ticks(*self.ylim, n=max(3, (bottom - top) // 45)) if self.ylim[0] <= t <= self.ylim[1]]
        if xint:  # steps and timesteps are integers: no 2.5 ticks, no "2.0" labels
            xs = [int(t) for t in xs if float(t).is_integer()] or [int(round(t)) for t in xs]
        if yint:
            ys = [int(t) for t in ys if float(t).is_integer()]
        xspan, yspan = self.xlim[1] - self.xlim[0], self.ylim[1] - self.ylim[0]
        for t in xs:
            x = self.px(t)
            d.line([(x, top), (x, bottom)], fill=GRID)
            d.line([(x, bottom), (x, bottom + 4)], fill=FRAME)
            label = str(t) if isinstance(t, int) else _fmt(t, xspan)
            d.text((x, bottom + 6), label, fill=MUTED, font=small, anchor="ma")
        for t in ys:
            y = self.py(t)
            d.line([(left, y), (right, y)], fill=GRID)
            d.line([(left - 4, y), (left, y)], fill=FRAME)
            label = str(t) if isinstance(t, int) else _fmt(t, yspan)
            d.text((left - 6, y), label, fill=MUTED, font=small, anchor="rm")
        d.rectangle(self.box, outline=FRAME)
        d.text((left, top - 6), title, fill=TEXT, font=font(13), anchor="ld")
        d.text(((left + right) / 2, bottom + 22), xlabel, fill=MUTED, font=small, anchor="ma")

    def line(self, xs: Sequence[float], ys: Sequence[float], color, width: int = 2) -> None:
        """A polyline through the finite points; a NaN breaks it (a gap)."""
        seg: list[tuple[float, float]] = []
        for x, y in zip(xs, ys):
            if math.isfinite(x) and math.isfinite(y):
                seg.append((self.px(x), self.py(min(max(y, self.ylim[0]), self.ylim[1]))))
                continue
            self._flush(seg, color, width)
            seg = []
        self._flush(seg, color, width)

    def _flush(self, seg, color, width) -> None:
        if len(seg) >= 2:
            self.draw.line(seg, fill=color, width=width, joint="curve")
        elif len(seg) == 1:
            x, y = seg[0]
            r = max(1, width)
            self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

    def vline(self, x: float, color, dash: int = 5) -> None:
        """A dashed vertical line at data ``x`` (a marked step)."""
        _, top, _, bottom = self.box
        xx = self.px(x)
        y = float(top)
        while y < bottom:
            self.draw.line([(xx, y), (xx, min(y + dash, bottom))], fill=color, width=2)
            y += 2 * dash

    def hline(self, y: float, color, dash: int = 6) -> None:
        left, _, right, _ = self.box
        yy = self.py(y)
        x = float(left)
        while x < right:
            self.draw.line([(x, yy), (min(x + dash, right), yy)], fill=color, width=2)
            x += 2 * dash

    def bars(self, edges: Sequence[float], heights: Sequence[float], color) -> None:
        for a, b, h in zip(edges[:-1], edges[1:], heights):
            if not math.isfinite(h) or h <= self.ylim[0]:
                continue
            x0, x1 = self.px(a), self.px(b)
            self.draw.rectangle([x0 + 1, self.py(min(h, self.ylim[1])), max(x0 + 1, x1 - 1), self.py(self.ylim[0])],
                                fill=color)

    def points(self, xs: Sequence[float], ys: Sequence[float], color, radius: int = 3) -> None:
        """A dot at each finite point (a series of one point has no line to show)."""
        for x, y in zip(xs, ys):
            if math.isfinite(x) and math.isfinite(y):
                px, py = self.px(x), self.py(min(max(y, self.ylim[0]), self.ylim[1]))
                self.draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color)

    def legend(self, items: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        """A one-line key above the panel's right end (outside the plot, so it hides no data)."""
        _, top, right, _ = self.box
        small = font(11)
        x, y = right, top - 10
        for label, color in reversed(items):
            d = self.draw
            x -= int(d.textlength(label, font=small))
            d.text((x, y), label, fill=TEXT, font=small, anchor="lm")
            d.line([(x - 18, y), (x - 4, y)], fill=color, width=3)
            x -= 30


def _limits(values: Sequence[float], *, pad: float = 0.06, floor: float | None = None) -> tuple[float, float]:
    vals = _finite(values)
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if floor is not None:
        lo = min(lo, floor)
    if hi - lo < 1e-12:
        d = abs(hi) * 0.1 or 1.0
        return (lo - d, hi + d)
    span = hi - lo
    return (lo - (0 if floor is not None and lo == floor else pad * span), hi + pad * span)


def _canvas(width: int, height: int, what: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    if not (isinstance(width, int) and isinstance(height, int)) or width < 160 or height < 120:
        raise ValueError(f"{what} size must be integers of at least 160 x 120 px, got {width} x {height}")
    img = Image.new("RGB", (width, height), BACKGROUND)
    return img, ImageDraw.Draw(img)


def _message(draw: ImageDraw.ImageDraw, box, text: str) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, fill=PANEL, outline=GRID)
    draw.text(((left + right) / 2, (top + bottom) / 2), text, fill=MUTED, font=font(13), anchor="mm")


# --------------------------------------------------------------------------- loss chart

def concept_series(h: Mapping[str, Any], key: str) -> list[tuple[str, list[float]]]:
    """``(name, values per step)`` for each concept of a multi-concept run's ``key`` (``concept_loss`` or
    ``concept_vector_norm``: per step, one value per concept); [] for a run of one concept."""
    names = [str(n) for n in h.get("concepts") or []]
    rows = h.get(key) or []
    if len(names) < 2 or not rows:
        return []
    return [(n, _floats(r[i] if isinstance(r, (list, tuple)) and i < len(r) else None for r in rows))
            for i, n in enumerate(names)]


def loss_chart(history: Mapping[str, Any] | Any, *, width: int = 768, height: int = 512,
               smoothing: float | None = None) -> torch.Tensor:
    """The training chart as an image [H, W, 3] float32 in [0, 1].

    ``history``: the node's ``inversion_chart`` dict or ``TrainHistory.to_dict()``: ``loss`` and
    ``step`` lists; ``timesteps`` (flat or per step); optional ``num_timesteps`` (default 1000),
    ``bin_edges`` and ``g_estimate`` (adaptive sampler), ``vector_norm`` (per step) and
    ``target_norm`` (DTI's m*), ``method``; ``score_step`` / ``score`` (the deterministic score,
    ``score.py``), drawn on the loss panel with the best step (``best_step``, else the lowest score)
    marked, and ``stop_step`` where early stop fired; ``clip_step`` / ``clip_image`` / ``clip_text``
    (previews scored with CLIP, ``clip_score.py``): a panel of their own; ``concepts`` with ``concept_loss`` and
    ``concept_vector_norm`` (several concepts): a smoothed loss and a norm curve per concept.
    ``smoothing`` is the EMA factor; by default it
    grows with the run length (0.6 for a few steps up to 0.98), so short and long runs both read well.
    """
    h = _as_dict(history, "history")
    loss = _floats(h.get("loss"))
    steps = _floats(h.get("step")) or [float(i + 1) for i in range(len(loss))]
    if len(steps) != len(loss):
        raise ValueError(f"history: 'step' has {len(steps)} entries but 'loss' has {len(loss)}; pass one step per loss")
    T = int(h.get("num_timesteps") or 1000)
    if T < 1:
        raise ValueError(f"history: num_timesteps must be positive, got {T}")
    ts = [t for t in _flatten_ints(h.get("timesteps")) if 0 <= t < T]
    edges = _floats(h.get("bin_edges")) or None
    g_est = _floats(h.get("g_estimate")) or None
    if g_est is not None and (edges is None or len(edges) != len(g_est) + 1):
        edges = list(np.linspace(0, T, len(g_est) + 1))
    vnorm = _floats(h.get("vector_norm"))
    concept_loss, concept_norm = concept_series(h, "concept_loss"), concept_series(h, "concept_vector_norm")
    target = h.get("target_norm")
    target = float(target) if target is not None and math.isfinite(float(target)) else None
    if smoothing is None:
        smoothing = min(0.98, max(0.6, 1.0 - 8.0 / max(1, len(loss))))
    score = _floats(h.get("score"))
    score_steps = _floats(h.get("score_step"))[: len(score)]
    score = score[: len(score_steps)]
    best = best_step([int(x) for x in score_steps if math.isfinite(x)],
                     [v for x, v in zip(score_steps, score) if math.isfinite(x)]) if score else None
    if h.get("best_step") is not None and h.get("best_score") is not None:
        best = (int(h["best_step"]), float(h["best_score"]))
    stop_step = h.get("stop_step")
    clip_steps = _floats(h.get("clip_step"))
    clip_image = _floats(h.get("clip_image"))[: len(clip_steps)]
    clip_text = _floats(h.get("clip_text"))[: len(clip_steps)]

    img, d = _canvas(width, height, "loss chart")
    method = str(h.get("method") or "").strip()
    head = "Textual inversion" + (f" - {method}" if method else "")
    last = _finite(loss[-1:])
    if steps:
        head += f"   step {int(steps[-1])}" + (f"/{int(h['total'])}" if h.get("total") else "")
    if last:
        head += f"   loss {last[0]:.4g}"
    if best is not None:
        head += f"   best step {best[0]} (score {best[1]:.4g})"
    d.text((12, 8), head, fill=TEXT, font=font(15))

    ml, mr, gap = 58, 16, 56
    top_box = (ml, 54, width - mr, int(height * 0.56))
    if not _finite(loss):
        _message(d, top_box, "no loss values yet")
    else:
        ax = _Axes(d, top_box, (min(steps), max(steps)) if len(steps) > 1 else (steps[0] - 1, steps[0] + 1),
                   _limits(loss + score))
        ax.frame("loss", "step", xint=True)
        smooth = ema(loss, smoothing)
        ax.line(steps, loss, RAW, width=1)
        ax.line(steps, smooth, SMOOTH, width=2)
        keys = [("raw", RAW), (f"EMA {smoothing:.2f}", SMOOTH)]
        for i, (name, values) in enumerate(concept_loss):
            color = CONCEPT_COLORS[i % len(CONCEPT_COLORS)]
            ax.line(steps[: len(values)], ema(values, smoothing), color, width=1)
            keys.append((name, color))
        if _finite(score):
            ax.line(score_steps, score, SCORE, width=2)
            keys.append(("score (fixed draws)", SCORE))
        if stop_step is not None:
            ax.vline(float(stop_step), STOP)
            d.text((ax.px(float(stop_step)) - 4, top_box[1] + 4), f"early stop {int(stop_step)}", fill=STOP,
                   font=font(11), anchor="ra")
        if best is not None and math.isfinite(best[1]):
            bx, by = ax.px(best[0]), ax.py(min(max(best[1], ax.ylim[0]), ax.ylim[1]))
            ax.vline(float(best[0]), SCORE)
            d.ellipse([bx - 5, by - 5, bx + 5, by + 5], outline=SCORE, fill=BACKGROUND, width=3)
            right = bx > (top_box[0] + top_box[2]) / 2
            d.text((bx + (-8 if right else 8), by + 8), f"best {best[0]}", fill=SCORE, font=font(11),
                   anchor="ra" if right else "la")
        ax.legend(keys)

    panels = ["hist"] + (["g"] if g_est is not None else []) + (["norm"] if _finite(vnorm) else []) + \
        (["clip"] if _finite(clip_image + clip_text) else [])
    bottom_top, bottom_bottom = top_box[3] + 62, height - 40
    pw = (width - ml - mr - gap * (len(panels) - 1)) // len(panels)
    for i, kind in enumerate(panels):
        left = ml + i * (pw + gap)
        box = (left, bottom_top, left + pw, bottom_bottom)
        if kind == "hist":
            hedges = edges if edges is not None else list(np.linspace(0, T, 21))
            counts = np.histogram(ts, bins=np.asarray(hedges, dtype=np.float64))[0].astype(float) if ts else []
            if not ts:
                _message(d, box, "no timesteps yet")
                continue
            ax = _Axes(d, box, (0.0, float(T)), (0.0, max(1.0, float(max(counts))) * 1.08))
            ax.frame(f"timesteps sampled (count, n={len(ts)})", "t", xint=True, yint=True)
            ax.bars(hedges, list(counts), HIST)
        elif kind == "g":
            ax = _Axes(d, box, (0.0, float(T)), _limits(g_est, floor=0.0))
            ax.frame("adaptive sampler: g(t) per bin", "t", xint=True)
            ax.bars(edges, g_est, GEST)
        elif kind == "clip":
            xs = _finite(clip_steps)
            ax = _Axes(d, box, (min(xs), max(xs)) if len(xs) > 1 else (xs[0] - 1, xs[0] + 1),
                       _limits(clip_image + clip_text))
            ax.frame("CLIP similarity of previews", "step", xint=True)
            keys = []
            for values, color, name in ((clip_image, CLIP_IMAGE, "image"), (clip_text, CLIP_TEXT, "text")):
                if _finite(values):
                    ax.line(clip_steps[: len(values)], values, color, width=2)
                    ax.points(clip_steps[: len(values)], values, color)
                    keys.append((name, color))
            ax.legend(keys)
        else:
            vs = steps[: len(vnorm)]
            every = [x for _, values in concept_norm for x in values]
            lim = _limits(vnorm + every + ([target] if target is not None else []))
            ax = _Axes(d, box, (min(vs), max(vs)) if len(vs) > 1 else (vs[0] - 1, vs[0] + 1), lim)
            ax.frame("vector norm per concept" if concept_norm else "mean vector norm", "step", xint=True)
            if not concept_norm:
                ax.line(vs, vnorm, NORM, width=2)
            for j, (_, values) in enumerate(concept_norm):
                ax.line(steps[: len(values)], values, CONCEPT_COLORS[j % len(CONCEPT_COLORS)], width=2)
            if target is not None:  # dashed, on top: under DTI the norm sits exactly on it
                ax.hline(target, TARGET)
                d.text((box[2] - 4, ax.py(target) - 3), f"m* = {target:.3g}", fill=TARGET, font=font(11),
                       anchor="rd")
    return to_image(img)


# --------------------------------------------------------------------------- profile chart

def _best_window(edges: Sequence[float], mean: Sequence[float], T: int, width: int) -> tuple[int, int] | None:
    """The high-grad window of ``inversion.methods.profiler.GradProfile.best_window`` (one implementation)."""
    if any(not math.isfinite(m) for m in mean) or not 1 <= width <= T:
        return None
    prof = GradProfile(torch.tensor([int(round(e)) for e in edges], dtype=torch.long),
                       torch.tensor(mean, dtype=torch.float64), torch.zeros(len(mean), dtype=torch.float64),
                       torch.zeros(len(mean), dtype=torch.long), T)
    return prof.best_window(width)


def profile_chart(profile: Mapping[str, Any] | Any, *, window: tuple[int, int] | None = None,
                  window_width: int = 100, width: int = 768, height: int = 384,
                  title: str | None = None) -> torch.Tensor:
    """A gradient-norm profile g(t) as an image [H, W, 3] float32 in [0, 1].

    ``profile``: a ``GradProfile`` or its dict (``edges`` or ``bin_edges``, ``mean``, ``std``,
    ``num_timesteps``), or a live ``kind: "profile"`` event (partial: unmeasured bins are None).
    The window [a, b] is highlighted: ``window`` if given, else the profile's best window of
    ``window_width`` timesteps once every bin has a value.
    """
    p = _as_dict(profile, "profile")
    edges = _floats(p.get("edges") if p.get("edges") is not None else p.get("bin_edges"))
    mean = _floats(p.get("mean"))
    std = _floats(p.get("std")) or [0.0] * len(mean)
    if len(edges) != len(mean) + 1:
        raise ValueError(f"profile: expected len(edges) == len(mean) + 1, got {len(edges)} edges for {len(mean)} bins")
    if len(std) != len(mean):
        raise ValueError(f"profile: 'std' has {len(std)} entries but 'mean' has {len(mean)}")
    T = int(p.get("num_timesteps") or (edges[-1] if edges else 1000))
    if window is None and p.get("window") is not None:
        window = tuple(int(x) for x in p["window"])
    if window is None and mean:
        window = _best_window(edges, mean, T, int(window_width))

    img, d = _canvas(width, height, "profile chart")
    done = sum(1 for m in mean if math.isfinite(m))
    head = title or f"Gradient-norm profile g(t)   {done}/{len(mean)} bins"
    if window is not None:
        head += f"   {'window' if title else 'high-grad window'} [{window[0]}, {window[1]}]"
    d.text((12, 8), head, fill=TEXT, font=font(15))
    box = (64, 54, width - 18, height - 44)
    if not done:
        _message(d, box, "no bins measured yet")
        return to_image(img)
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    lo = [m - s if math.isfinite(s) else m for m, s in zip(mean, std)]
    hi = [m + s if math.isfinite(s) else m for m, s in zip(mean, std)]
    ax = _Axes(d, box, (0.0, float(T)), _limits(lo + hi, floor=0.0 if min(_finite(lo)) >= 0 else None))
    ax.frame("g(t) = E || grad_c || eps_hat - eps || ||", "timestep t", xint=True)
    if window is not None:
        x0, x1 = ax.px(window[0]), ax.px(window[1] + 1)
        d.rectangle([x0, box[1] + 1, max(x0 + 1, x1), box[3] - 1], fill=WINDOW)
        d.text(((x0 + x1) / 2, box[1] + 4), "high-grad", fill=TEXT, font=font(11), anchor="ma")
    # the +-std band: one polygon per run of measured bins
    run: list[int] = []
    for i in list(range(len(mean))) + [None]:
        if i is not None and math.isfinite(mean[i]):
            run.append(i)
            continue
        if len(run) >= 2:
            pts = [(ax.px(centers[j]), ax.py(hi[j])) for j in run] + [(ax.px(centers[j]), ax.py(lo[j])) for j in reversed(run)]
            d.polygon(pts, fill=BAND)
        run = []
    d.rectangle(box, outline=FRAME)
    ax.line(centers, mean, GEST, width=2)
    for c, m in zip(centers, mean):
        if math.isfinite(m):
            x, y = ax.px(c), ax.py(m)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=GEST)
    ax.legend([("mean g", GEST), ("+-1 std", BAND)])
    return to_image(img)


# --------------------------------------------------------------------------- OVI similarity

def similarity_chart(values: Sequence[float] | Mapping[str, Sequence[float]], *, width: int = 640,
                     height: int = 360, title: str = "OVI: cosine similarity to the text embedding") -> torch.Tensor:
    """OVI's similarity curve (one value per optimisation step) as an image [H, W, 3] in [0, 1].

    ``values``: a list of similarities, or a dict of named series (``{"similarity": [...],
    "step": [...]}`` uses ``step`` as the x axis; other keys are drawn as further series).
    """
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, Mapping):
        series = {k: _floats(v) for k, v in values.items() if k != "step"}
        steps = _floats(values.get("step")) or None
    else:
        series = {"similarity": _floats(values)}
        steps = None
    n = max((len(v) for v in series.values()), default=0)
    xs = steps if steps is not None and len(steps) == n else [float(i + 1) for i in range(n)]
    img, d = _canvas(width, height, "similarity chart")
    first = next(iter(series.values()), [])
    last = _finite(first[-1:])
    d.text((12, 8), title + (f"   final {last[0]:.4f}" if last else ""), fill=TEXT, font=font(15))
    box = (64, 48, width - 18, height - 44)
    allv = [x for v in series.values() for x in v]
    if not _finite(allv):
        _message(d, box, "no similarity values yet")
        return to_image(img)
    ax = _Axes(d, box, (min(xs), max(xs)) if n > 1 else (xs[0] - 1, xs[0] + 1), _limits(allv))
    ax.frame("", "step", xint=True)
    colors = [SMOOTH, GEST, NORM, HIST, TARGET]
    items = []
    for i, (name, v) in enumerate(series.items()):
        c = colors[i % len(colors)]
        ax.line(xs[: len(v)], v, c, width=2)
        items.append((name, c))
    ax.legend(items)
    return to_image(img)


# --------------------------------------------------------------------------- several curves

# Ten distinguishable hues (Tableau 10), then darker variants: enough for a benchmark's methods.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (20, 60, 110), (150, 70, 0)]
REFERENCE = [(60, 60, 60), (150, 150, 150), (110, 30, 30)]


def curves_chart(series: Mapping[str, Sequence[float]], x: Sequence[float], *,
                 references: Mapping[str, float] | None = None, title: str = "", xlabel: str = "step",
                 width: int = 900, height: int = 420) -> torch.Tensor:
    """Named curves over a shared ``x`` (e.g. one metric per method against step), with dashed
    horizontal ``references`` and a legend in a column to the right; an image [H, W, 3] in [0, 1]."""
    xs = _floats(x)
    curves = {k: _floats(v) for k, v in series.items()}
    refs = {k: float(v) for k, v in (references or {}).items() if v is not None and math.isfinite(float(v))}
    for name, v in curves.items():
        if len(v) != len(xs):
            raise ValueError(f"curves_chart: series {name!r} has {len(v)} values for {len(xs)} x values")
    img, d = _canvas(width, height, "curves chart")
    small = font(11)
    labels = list(curves) + list(refs)
    legend_w = (int(max(d.textlength(s, font=small) for s in labels)) + 34) if labels else 0
    box = (58, 40, width - legend_w - 16, height - 40)
    d.text((12, 8), title, fill=TEXT, font=font(15))
    vals = [y for v in curves.values() for y in v] + list(refs.values())
    if not _finite(vals) or not xs:
        _message(d, box, "no values")
        return to_image(img)
    ax = _Axes(d, box, (min(xs), max(xs)) if len(xs) > 1 else (xs[0] - 1, xs[0] + 1), _limits(vals))
    ax.frame("", xlabel, xint=all(float(v).is_integer() for v in xs))
    y = box[1] + 6
    for i, (name, value) in enumerate(refs.items()):
        c = REFERENCE[i % len(REFERENCE)]
        ax.hline(value, c)
        d.line([(box[2] + 12, y + 7), (box[2] + 18, y + 7)], fill=c, width=2)
        d.line([(box[2] + 22, y + 7), (box[2] + 28, y + 7)], fill=c, width=2)
        d.text((box[2] + 32, y + 7), name, fill=TEXT, font=small, anchor="lm")
        y += 18
    for i, (name, v) in enumerate(curves.items()):
        c = PALETTE[i % len(PALETTE)]
        ax.line(xs, v, c, width=2)
        for xx, yy in zip(xs, v):
            if math.isfinite(yy):
                px, py = ax.px(xx), ax.py(yy)
                d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=c)
        d.line([(box[2] + 12, y + 7), (box[2] + 28, y + 7)], fill=c, width=3)
        d.text((box[2] + 32, y + 7), name, fill=TEXT, font=small, anchor="lm")
        y += 18
    return to_image(img)


# --------------------------------------------------------------------------- inspect an embedding

def inspect_chart(rows: Sequence[Mapping[str, Any]], *, title: str = "Inspect embedding", width: int = 768,
                  height: int | None = None) -> torch.Tensor:
    """Each learned vector's norm over its vocabulary's norm distribution and, when a run saved
    snapshots, its cosine to the final vector over steps; an image [H, W, 3] in [0, 1].

    ``rows``: one mapping per vector (``inversion.methods.inspect.VectorReport.chart_row``): ``label``,
    ``norm``, ``percentile``, ``band`` (the vocabulary's min, 5 %, median, 95 %, max norms) and
    optional ``drift_step`` / ``drift_cosine``. Per vector the grey line spans min to max, the band
    5 % to 95 %, the tick is the median and the bar the vector's norm (red outside 5-95 %).
    ``height`` defaults to what the rows need.
    """
    rows = [dict(r) for r in rows]
    drift = [(r.get("label", ""), _floats(r.get("drift_step")), _floats(r.get("drift_cosine"))) for r in rows]
    drift = [(label, s, c) for label, s, c in drift if _finite(c) and len(s) == len(c)]
    row_h, top = 22, 62
    norm_bottom = top + max(1, len(rows)) * row_h
    need = norm_bottom + 44 + (270 if drift else 0)
    img, d = _canvas(width, height if height is not None else max(160, need), "inspect chart")
    d.text((12, 8), title, fill=TEXT, font=font(15))
    small = font(11)
    labels = [str(r.get("label", "")) for r in rows]
    label_w = max([int(d.textlength(s, font=small)) for s in labels] + [40]) + 34
    box = (label_w, top, width - 110, norm_bottom)
    if not rows:
        _message(d, box, "no vectors")
        return to_image(img)
    bands = [(_floats(r.get("band")) + [math.nan] * 5)[:5] for r in rows]
    norms = _floats(r.get("norm") for r in rows)
    hi = max(_finite([x for b in bands for x in b] + norms) or [1.0]) * 1.05
    ax = _Axes(d, box, (0.0, hi), (0.0, float(len(rows))))
    d.rectangle(box, fill=PANEL)
    ticks = [t for t in nice_ticks(0.0, hi, n=max(3, (box[2] - box[0]) // 80)) if 0.0 <= t <= hi]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else hi
    for t in ticks:
        x = ax.px(t)
        d.line([(x, box[1]), (x, box[3])], fill=GRID)
        d.line([(x, box[3]), (x, box[3] + 4)], fill=FRAME)
        d.text((x, box[3] + 6), _fmt(t, step), fill=MUTED, font=small, anchor="ma")
    d.text((box[0], top - 6), "vector norm over the vocabulary's norms (line: min-max, band: 5-95%, tick: median)",
           fill=TEXT, font=font(13), anchor="ld")
    d.text(((box[0] + box[2]) / 2, box[3] + 22), "norm", fill=MUTED, font=small, anchor="ma")
    for i, (r, band, n) in enumerate(zip(rows, bands, norms)):
        y = box[1] + (i + 0.5) * row_h
        color = PALETTE[i % len(PALETTE)]
        d.rectangle([8, y - 4, 16, y + 4], fill=color)  # the key of its drift curve below
        d.text((box[0] - 8, y), labels[i], fill=TEXT, font=small, anchor="rm")
        lo, p5, med, p95, top_n = band
        if math.isfinite(p5) and math.isfinite(p95):
            d.rectangle([ax.px(p5), y - 6, max(ax.px(p5) + 1, ax.px(p95)), y + 6], fill=BAND)
        if math.isfinite(lo) and math.isfinite(top_n):  # whisker with end caps: visible over the bar too
            d.line([(ax.px(lo), y + 5), (ax.px(top_n), y + 5)], fill=FRAME, width=1)
            for end in (lo, top_n):
                d.line([(ax.px(end), y + 1), (ax.px(end), y + 9)], fill=FRAME, width=1)
        if math.isfinite(med):
            d.line([(ax.px(med), y - 8), (ax.px(med), y + 8)], fill=MUTED, width=2)
        if math.isfinite(n):
            outside = math.isfinite(p5) and math.isfinite(p95) and not p5 <= n <= p95
            d.rectangle([ax.px(0.0), y - 3, max(ax.px(0.0) + 1, ax.px(min(n, hi))), y + 2],
                        fill=TARGET if outside else NORM)
            pct = _finite([r.get("percentile")])
            d.text((box[2] + 8, y), f"{n:.3g}" + (f"  p{pct[0]:.0f}" if pct else ""), fill=TEXT, font=small,
                   anchor="lm")
    d.rectangle(box, outline=FRAME)
    if drift:
        dbox = (label_w, norm_bottom + 76, width - 110, norm_bottom + 76 + 190)
        steps = [x for _, s, _ in drift for x in s]
        cos = [y for _, _, c in drift for y in c]
        lo_c, hi_c = _limits(cos + [1.0])
        dax = _Axes(d, dbox, (min(steps), max(steps)) if len(set(steps)) > 1 else (steps[0] - 1, steps[0] + 1),
                    (lo_c, min(hi_c, 1.02)))
        dax.frame("cosine to the final vector, per snapshot", "step", xint=True)
        keyed = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
        for label, s, c in drift:
            dax.line(s, c, keyed.get(label, SMOOTH), width=2)
            for xx, yy in zip(s, c):
                if math.isfinite(yy):
                    px, py = dax.px(xx), dax.py(min(max(yy, dax.ylim[0]), dax.ylim[1]))
                    d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=keyed.get(label, SMOOTH))
        if len(drift) <= 4:
            dax.legend([(label, keyed.get(label, SMOOTH)) for label, _, _ in drift])
    return to_image(img)
