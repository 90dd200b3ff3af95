"""The PIL chart renderers: image format, and curves drawn where the data says."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from devtools import harness
from inversion import charts
from inversion.charts import ema, loss_chart, nice_ticks, profile_chart, similarity_chart


def _mask(img: torch.Tensor, color) -> np.ndarray:
    """Pixels within a small tolerance of ``color`` (0-255 RGB)."""
    a = (img.numpy() * 255.0).round()
    return (np.abs(a - np.asarray(color, dtype=np.float64)).max(axis=-1) <= 6)


def _ys(mask: np.ndarray, x0: int, x1: int) -> float:
    """Mean row of the masked pixels in columns [x0, x1)."""
    rows, _ = np.nonzero(mask[:, x0:x1])
    assert rows.size, f"no curve pixels in columns {x0}..{x1}"
    return float(rows.mean())


def _cols(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(mask.any(axis=0))[0]


def _axis_span(img: torch.Tensor, below: float = 0.0) -> tuple[int, int]:
    """Left and right columns of the widest panel frame: the longest row of frame-coloured pixels
    (the bottom axis line), looked for below ``below`` (a fraction of the height)."""
    m = _mask(img, charts.FRAME)
    start = int(img.shape[0] * below)
    row = start + int(np.argmax(m[start:].sum(axis=1)))
    cols = np.nonzero(m[row])[0]
    return int(cols.min()), int(cols.max())


def _in_plot(img: torch.Tensor, color) -> np.ndarray:
    """Pixels of ``color`` below the first panel's top border (drops the key drawn above it)."""
    lo, hi = _axis_span(img)
    top = int(np.nonzero(_mask(img, charts.FRAME).sum(axis=1) > 0.5 * (hi - lo))[0].min())
    m = _mask(img, color)
    m[: top + 1] = False
    return m


def _history(loss, **kw):
    n = len(loss)
    d = {"kind": "train", "loss": list(loss), "step": list(range(1, n + 1)),
         "timesteps": [[(37 * i) % 1000] for i in range(n)], "num_timesteps": 1000, "method": "vanilla"}
    d.update(kw)
    return d


def _check_image(img: torch.Tensor, h: int, w: int) -> None:
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert tuple(img.shape) == (h, w, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.std()) > 0.01  # something was drawn


@pytest.mark.parametrize("size", [(768, 512), (400, 300)])
def test_loss_chart_is_a_comfy_image_row(size):
    w, h = size
    img = loss_chart(_history([1.0 / (i + 1) for i in range(50)]), width=w, height=h)
    _check_image(img, h, w)
    assert torch.equal(img.unsqueeze(0)[0], img)  # the node only adds the batch dimension


def test_descending_loss_is_drawn_lower_on_the_right():
    n = 120
    loss = [2.0 - 1.5 * i / (n - 1) for i in range(n)]  # straight descent, no noise
    img = loss_chart(_history(loss), width=800, height=520)
    m = _in_plot(img, charts.SMOOTH)
    cols = _cols(m)
    left, right = cols.min(), cols.max()
    assert right - left > 500  # the curve spans the panel width
    y_left = _ys(m, left, left + 20)
    y_right = _ys(m, right - 20, right + 1)
    assert y_right > y_left + 100  # image rows grow downwards: lower loss -> larger row


def test_ascending_loss_is_drawn_higher_on_the_right():
    loss = [0.1 + 0.01 * i for i in range(80)]
    m = _in_plot(loss_chart(_history(loss), width=800, height=520), charts.SMOOTH)
    cols = _cols(m)
    assert _ys(m, cols.max() - 20, cols.max() + 1) < _ys(m, cols.min(), cols.min() + 20) - 100


def test_ema_is_debiased_and_skips_non_finite():
    assert ema([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    out = ema([float("nan"), 1.0, float("inf"), 3.0], 0.5)
    assert math.isnan(out[0]) and out[1] == pytest.approx(1.0) and out[2] == pytest.approx(1.0)
    assert out[3] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def test_timestep_histogram_bars_follow_the_samples():
    # every timestep in [800, 1000): the histogram's bars sit in the right fifth of its panel
    h = _history([1.0] * 40)
    h["timesteps"] = [800 + (7 * i) % 200 for i in range(40)]
    img = loss_chart(h, width=800, height=520)
    m = _mask(img, charts.HIST)
    cols = _cols(m)
    assert cols.size
    # the histogram panel is the only bottom panel (no g, no norm): it spans the plot width
    lo, hi = _axis_span(img, below=0.6)
    assert cols.min() > lo + 0.75 * (hi - lo)


def test_adaptive_and_dti_panels_appear_only_with_their_data():
    base = _history([1.0, 0.9, 0.8])
    plain = loss_chart(base)
    assert not _mask(plain, charts.GEST).any()
    assert not _mask(plain, charts.TARGET).any()
    adaptive = loss_chart(dict(base, g_estimate=[1.0, 4.0, 2.0, 0.5], bin_edges=[0, 250, 500, 750, 1000]))
    g = _mask(adaptive, charts.GEST)
    assert g.sum() > 200
    # the tallest bar is the second bin: its top row is the smallest row of the orange pixels
    cols = _cols(g)
    quarter = (cols.max() - cols.min()) / 4
    tops = [np.nonzero(g[:, int(cols.min() + k * quarter + 2): int(cols.min() + (k + 1) * quarter - 2)].any(axis=1))[0].min()
            for k in range(4)]
    assert int(np.argmin(tops)) == 1
    dti = loss_chart(dict(base, vector_norm=[0.38, 0.38, 0.38], target_norm=0.38))
    assert _mask(dti, charts.TARGET).any() and _mask(dti, charts.NORM).any()


def test_clip_panel_appears_only_with_scores_and_follows_them():
    base = _history([1.0, 0.9, 0.8, 0.7])
    plain = loss_chart(base, width=800, height=520)
    assert not _mask(plain, charts.CLIP_IMAGE).any() and not _mask(plain, charts.CLIP_TEXT).any()
    # image similarity rises over the preview steps, text similarity falls; a missing text value is a gap
    scored = loss_chart(dict(base, clip_step=[2, 3, 4], clip_image=[0.5, 0.6, 0.7], clip_text=[0.3, None, 0.2]),
                        width=800, height=520)
    img, txt = _mask(scored, charts.CLIP_IMAGE), _mask(scored, charts.CLIP_TEXT)
    assert img.sum() > 50 and txt.sum() > 20
    lo, hi = _axis_span(scored, below=0.6)
    panel_top = int(520 * 0.56) + 62 + 3  # below the bottom panels' top edge (their keys sit above it)
    bottom = img.copy()
    bottom[:panel_top] = False
    cols = _cols(bottom)
    assert cols.min() > lo + 0.5 * (hi - lo)  # the last of two bottom panels: the right half
    left, right = int(cols.min()), int(cols.max())
    third = (right - left) // 3
    assert _ys(bottom, left, left + third) > _ys(bottom, right - third, right + 1)  # rising = higher on the right


def test_nan_losses_do_not_break_the_chart():
    img = loss_chart(_history([1.0, float("nan"), None, 0.5, float("inf"), 0.4]))
    _check_image(img, 512, 768)
    empty = loss_chart({"loss": [], "step": [], "timesteps": []})
    _check_image(empty, 512, 768)


def test_train_history_dict_is_accepted():
    from inversion.trainer import TrainHistory

    th = TrainHistory(step=[1, 2], loss=[0.5, 0.4], lr=[1e-3, 1e-3], grad_norm=[1.0, 1.0],
                      timesteps=[[10, 20], [30, 40]], sample_grad_norms=[[1.0, 1.0], [1.0, 1.0]],
                      vector_norm=[0.3, 0.31])
    _check_image(loss_chart(th), 512, 768)
    _check_image(loss_chart(th.to_dict()), 512, 768)


def test_bad_inputs_name_the_input():
    with pytest.raises(ValueError, match="'step' has 1 entries but 'loss' has 2"):
        loss_chart({"loss": [1.0, 2.0], "step": [1]})
    with pytest.raises(TypeError, match="history must be a dict"):
        loss_chart([1.0, 2.0])
    with pytest.raises(ValueError, match="size"):
        loss_chart(_history([1.0]), width=10, height=10)
    with pytest.raises(ValueError, match="edges"):
        profile_chart({"edges": [0, 500, 1000], "mean": [1.0], "std": [0.1], "num_timesteps": 1000})


def _profile(mean, std=None, T=1000):
    n = len(mean)
    edges = [round(T * i / n) for i in range(n + 1)]
    return {"edges": edges, "mean": mean, "std": std if std is not None else [0.1] * n, "num_timesteps": T}


def test_profile_chart_peak_and_window_where_g_is_largest():
    mean = [1.0] * 20
    mean[15] = 5.0  # bin [750, 800)
    img = profile_chart(_profile(mean), window_width=100, width=800, height=400)
    _check_image(img, 400, 800)
    lo, hi = _axis_span(img)
    curve = _in_plot(img, charts.GEST)  # the key above the plot is drawn in the same colour
    # the curve's highest point (smallest row) is at the peak bin's centre, 77.5 % across the axis
    rows, cols = np.nonzero(curve)
    peak_col = cols[rows == rows.min()].mean()
    assert abs((peak_col - lo) / (hi - lo) - 0.775) < 0.03
    win = _cols(_mask(img, charts.WINDOW))
    assert win.size and abs(((win.min() + win.max()) / 2 - lo) / (hi - lo) - 0.775) < 0.06


def test_profile_window_is_the_known_answer():
    from inversion.methods.profiler import GradProfile

    # T = 8, bins [0, 2) [2, 4) [4, 6) [6, 8) with centres 1, 3, 5, 7 and means 1, 3, 3, 1: linear
    # between centres, constant beyond them, g(t) for t = 0..7 is 1 1 2 3 3 3 2 1 (exact in floats)
    edges, mean, T = [0, 2, 4, 6, 8], [1.0, 3.0, 3.0, 1.0], 8
    known = {
        1: (3, 3),  # g = 3 at t = 3, 4, 5: a three-way tie, the earliest wins
        2: (3, 4),  # pair sums 2 3 5 6 6 5 3: [3, 4] and [4, 5] tie at 6, the earliest wins
        3: (3, 5),  # wider than a bin: sums 4 6 8 9 8 6, the only maximum is 3 + 3 + 3
        8: (0, 7),  # the whole range
    }
    prof = GradProfile(torch.tensor(edges), torch.tensor(mean, dtype=torch.float64),
                       torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.long), T)
    for width, window in known.items():
        assert charts._best_window(edges, mean, T, width) == window, width
        assert prof.best_window(width) == window, width
    assert charts._best_window(edges, mean, T, 9) is None  # wider than T
    assert charts._best_window(edges, [1.0, float("nan"), 3.0, 1.0], T, 2) is None  # a bin not measured
    _check_image(profile_chart(prof), 384, 768)  # a GradProfile object is accepted too


def test_profile_std_band_is_drawn_and_partial_profiles_render():
    img = profile_chart(_profile([1.0, 2.0, 3.0, 2.0], std=[0.5, 0.5, 0.5, 0.5]))
    assert _mask(img, charts.BAND).sum() > 500
    live = {"kind": "profile", "node": "3", "step": 2, "total": 4, "bin_edges": [0, 250, 500, 750, 1000],
            "mean": [1.0, 2.0, None, None], "std": [0.1, 0.2, None, None]}
    img = profile_chart(live)
    _check_image(img, 384, 768)
    assert not _mask(img, charts.WINDOW).any()  # no window until every bin is measured
    empty = profile_chart({"bin_edges": [0, 500, 1000], "mean": [None, None], "std": [None, None]})
    _check_image(empty, 384, 768)


def test_similarity_chart_rises_for_a_rising_curve():
    vals = [0.1 + 0.2 * (1 - math.exp(-i / 20)) for i in range(100)]
    img = similarity_chart(vals, width=640, height=360)
    _check_image(img, 360, 640)
    m = _in_plot(img, charts.SMOOTH)
    cols = _cols(m)
    assert _ys(m, cols.max() - 15, cols.max() + 1) < _ys(m, cols.min(), cols.min() + 15) - 80
    two = similarity_chart({"similarity": vals, "nearest": [v / 2 for v in vals], "step": list(range(100))})
    assert _mask(two, charts.SMOOTH).any() and _mask(two, charts.GEST).any()
    _check_image(similarity_chart(torch.tensor(vals)), 360, 640)


def test_nice_ticks():
    assert nice_ticks(0, 1000, 5) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(0.13, 0.47, 4) == pytest.approx([0.2, 0.3, 0.4])
    assert nice_ticks(3, 3) == [3]
    assert nice_ticks(float("nan"), 1) == []


def test_curves_chart_draws_every_series_and_checks_lengths():
    from inversion.charts import PALETTE, curves_chart

    img = curves_chart({"a": [0.1, 0.5, 0.9], "b": [0.2, 0.3, 0.4]}, [0, 10, 20], references={"ref": 0.6},
                       title="t", width=500, height=300)
    assert img.shape == (300, 500, 3)
    pixels = {tuple(int(round(v * 255)) for v in px) for px in img.reshape(-1, 3).tolist()}
    assert PALETTE[0] in pixels and PALETTE[1] in pixels  # both curves (and their legend swatches)
    with pytest.raises(ValueError, match="'b' has 2 values for 3"):
        curves_chart({"a": [1, 2, 3], "b": [1, 2]}, [0, 1, 2])


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_chart_folds_preview_scores_into_the_running_chart(tmp_path):
    """web/js/inversion/chart_math.js: live preview_score events join the run's data, as the output does."""
    events = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    events.insert(2, {"kind": "preview_score", "step": 2, "clip_image": 0.5, "clip_text": None})
    events.append({"kind": "preview_score", "step": 4, "clip_image": 0.6, "clip_text": 0.25})
    output = {"kind": "train", "step": [1, 2, 3, 4], "loss": [1.0, 0.5, 0.33, 0.25], "clip_step": [2, 4],
              "clip_image": [0.5, 0.6], "clip_text": [None, 0.25]}
    live, final, orphan, steps = harness.run_chart_js(
        tmp_path,
        "let d = null;\n"
        f"for (const e of {json.dumps(events)}) d = e.kind === 'train' ? m.appendTrain(d, e) "
        ": m.appendPreviewScore(d, e);\n"
        f"const o = m.fromOutput({json.dumps(output)});\n"
        "const fix = (v) => v.map((x) => (Number.isFinite(x) ? x : null));\n"
        "const pick = (x) => [fix(x.clip_step), fix(x.clip_image), fix(x.clip_text)];\n"
        "console.log(JSON.stringify([pick(d), pick(o), m.appendPreviewScore(null, {step: 1}), m.summary(d).clip_steps]));\n")
    assert live == final == [[2, 4], [0.5, 0.6], [None, 0.25]]
    assert orphan is None and steps == [2, 4]
