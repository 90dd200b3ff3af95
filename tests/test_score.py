"""The deterministic score, the best step and DVAR's early stop (issue 14 items 2 and 3), in the library."""

from __future__ import annotations

import math

import pytest
import torch

from inversion.methods.init import make_embedding
from inversion.options import TrainingOptions
from inversion.methods.score import ScoreConfig, best_step, dvar_ratio, dvar_should_stop, dvar_stop_index
from inversion.trainer import TrainConfig, Trainer, TrainHistory, prepare_concept
from tiny_models import concept_images


def _trainer(world, steps=6, snapshot=None, **cfg):
    emb = make_embedding(world.text, "toy", init_word="toy", k=2)
    concept = prepare_concept(world.latents, concept_images(4), emb)
    return Trainer(world.text, world.denoiser, [concept], TrainConfig(steps=steps, batch_size=2, seed=3, **cfg),
                   snapshot=snapshot)


def _scripted(monkeypatch, values):
    """``Trainer.evaluate`` returns ``values`` in turn (a synthetic score curve)."""
    it = iter(values)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, draws=4, seed=12345: float(next(it)))


# ---- the pure rule -------------------------------------------------------------------------------

def test_dvar_stops_a_flat_after_k_curve_exactly_when_the_window_is_flat():
    # k values at 1, then flat at 0: with w = 10 the window still holds one 1 at n = k + w - 1
    # (ratio 0.09 / 0.249 = 0.36) and none at n = k + w (ratio 0).
    k, w = 10, 10
    curve = [1.0] * k + [0.0] * 40
    assert dvar_stop_index(curve, window=w, threshold=0.15) == k + w
    assert dvar_ratio(curve[:k + w - 1], w) == pytest.approx(0.09 / (10 / 19 * 9 / 19))
    # the paper's setting: 100 falling evaluations, then flat
    curve = [1.0 - i / 100 for i in range(100)] + [0.0] * 600
    n = dvar_stop_index(curve)
    assert n is not None and 310 < n <= 100 + 310
    assert not dvar_should_stop(curve[:n - 1]) and dvar_should_stop(curve[:n])


def test_dvar_does_not_stop_a_steadily_falling_curve():
    falling = [1.0 - i / 1000 for i in range(500)]  # 500 evaluations, w = 310: ratio (w^2-1)/(n^2-1) >= 0.38
    assert dvar_stop_index(falling) is None
    noisy = [math.exp(-i / 400) + 0.002 * ((-1) ** i) for i in range(500)]
    assert dvar_stop_index(noisy) is None
    # the rule is relative: a straight decline stops once n > w / sqrt(0.15) = 2.58 w (w = 10: n = 26)
    assert dvar_stop_index([-float(i) for i in range(60)], window=10) == 26


def test_dvar_needs_a_full_window():
    assert dvar_ratio([1.0] * 309) is None and not dvar_should_stop([1.0, 0.0] * 154)
    assert not dvar_should_stop([0.5] * 400)  # no variance at all: the curve never moved
    with pytest.raises(ValueError, match="dvar_window"):
        dvar_ratio([1.0, 2.0], window=1)


def test_best_step_is_the_lowest_score_and_the_earliest_on_a_tie():
    assert best_step([10, 20, 30, 40], [0.5, 0.2, 0.3, 0.2]) == (20, 0.2)
    assert best_step([1, 2, 3], [float("nan"), 0.4, float("inf")]) == (2, 0.4)
    assert best_step([], []) is None
    with pytest.raises(ValueError, match="one score per step"):
        best_step([1, 2], [0.1])


@pytest.mark.parametrize("settings, needle", [
    ({"keep": "best"}, "score_every > 0"),
    ({"early_stop": True}, "score_every > 0"),
    ({"score_every": -1}, "score_every must be >= 0"),
    ({"score_every": 1, "keep": "first"}, "keep must be one of last, best"),
    ({"score_every": 1, "dvar_threshold": 1.5}, "dvar_threshold"),
])
def test_settings_are_validated_and_name_the_input(settings, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**settings).validate()
    with pytest.raises(ValueError, match=needle):
        TrainingOptions(**settings).validate()
    assert ScoreConfig().every == 0 and TrainingOptions().score_every == 0 and TrainingOptions().keep == "last"


# ---- the trainer ---------------------------------------------------------------------------------

def test_score_off_trains_exactly_as_before_and_never_evaluates(tiny, monkeypatch):
    on = _trainer(tiny, score_every=1).run()
    assert on.history.score_step == list(range(1, 7)) and len(on.history.score) == 6
    monkeypatch.setattr(Trainer, "evaluate", lambda *a, **k: pytest.fail("score_every = 0 must not score"))
    off = _trainer(tiny).run()
    assert off.history.score == [] and off.history.score_step == [] and off.best is None
    # the fixed draws touch no random state of training: the vectors are bit-identical either way
    for key in off.embedding.vectors:
        assert torch.equal(on.embedding.vectors[key], off.embedding.vectors[key])
    assert on.history.loss == off.history.loss


def test_the_score_is_deterministic(tiny):
    tr = _trainer(tiny)
    a, b = tr.evaluate(3, 7), tr.evaluate(3, 7)
    assert a == b and math.isfinite(a)
    assert tr.evaluate(3, 8) != a  # another fixed set


def test_the_score_is_the_masked_training_loss_on_a_set_that_ignores_the_batch_size(tiny):
    """The score is the objective training follows: with masks, the loss over the masked pixels (the
    same ``per_sample_mse`` the step uses), on the same fixed draws at batch size 1 and 3."""
    from inversion.methods.loss import per_sample_mse, predict_eps

    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    images = concept_images(4)
    masks = torch.zeros(4, images.shape[-2], images.shape[-1])
    masks[:, : images.shape[-2] // 2] = 1.0  # the concept is the top half
    concept = prepare_concept(tiny.latents, images, emb, masks=masks)

    def trainer(b):
        return Trainer(tiny.text, tiny.denoiser, [concept], TrainConfig(steps=2, batch_size=b, seed=3))

    one, three = trainer(1), trainer(3)
    score = one.evaluate(5, 7)
    assert score == pytest.approx(three.evaluate(5, 7), rel=1e-6)  # the set does not grow with B
    draws = one.data.fixed_draws(5, 7, tiny.denoiser.num_timesteps, 5)
    assert len(draws) == 1 and draws[0].mask is not None
    d = draws[0]
    with torch.no_grad():
        eps = predict_eps(tiny.denoiser, d, one.encode_prompts(d.prompts))
    masked, _ = per_sample_mse(eps, d.noise, d.mask)
    unmasked = ((eps - d.noise) ** 2).flatten(1).mean(1)
    assert score == pytest.approx(float(masked.mean()), rel=1e-6)
    assert abs(score - float(unmasked.mean())) > 1e-4  # the old, unmasked score was another objective


def test_scores_snapshots_and_the_best_step(tiny, monkeypatch):
    _scripted(monkeypatch, [0.5, 0.3, 0.1, 0.4])
    seen = []
    tr = _trainer(tiny, steps=7, score_every=2, keep="best",
                  snapshot=lambda t: seen.append((t.step, t.history.score[-1])))
    infos = []
    res = tr.run(infos.append)
    # every 2 steps, and the last step (7) so that keep = "best" sees the end of the run
    assert res.history.score_step == [2, 4, 6, 7] and res.history.score == [0.5, 0.3, 0.1, 0.4]
    assert [i.score for i in infos] == [None, 0.5, None, 0.3, None, 0.1, 0.4]
    assert seen == [(2, 0.5), (4, 0.3), (6, 0.1), (7, 0.4)]
    assert res.best == (6, 0.1) and not res.stopped_early and res.stop_step is None


def test_early_stop_fires_at_the_predicted_step(tiny, monkeypatch):
    k, w = 3, 4
    _scripted(monkeypatch, [1.0] * k + [0.0] * 30)
    infos = []
    res = _trainer(tiny, steps=30, score_every=1, early_stop=True, dvar_window=w).run(infos.append)
    assert res.stopped_early and res.stop_step == k + w == res.steps_done
    assert "DVAR early stop at step 7" in res.stop_reason and infos[-1].stop_reason == res.stop_reason
    assert all(i.stop_reason is None for i in infos[:-1])


def test_with_score_every_above_one_the_window_counts_evaluations(tiny, monkeypatch):
    k, w = 3, 4
    _scripted(monkeypatch, [1.0] * k + [0.0] * 30)
    res = _trainer(tiny, steps=30, score_every=2, early_stop=True, dvar_window=w).run()
    assert res.stop_step == 2 * (k + w)


def test_early_stop_off_runs_to_the_end(tiny, monkeypatch):
    _scripted(monkeypatch, [1.0] * 2 + [0.0] * 30)
    res = _trainer(tiny, steps=12, score_every=1, dvar_window=2).run()
    assert not res.stopped_early and res.steps_done == 12


def test_histories_without_scores_still_load_and_roll_back_with_their_scores():
    old = {"step": [1, 2], "loss": [0.3, 0.2], "lr": [1e-3] * 2, "grad_norm": [1.0] * 2, "timesteps": [[5], [7]],
           "sample_grad_norms": [[1.0], [1.0]], "vector_norm": [0.5] * 2}
    h = TrainHistory.from_dict(old)
    assert h.score == [] and h.score_step == [] and h.best() is None
    h = TrainHistory.from_dict({**old, "step": [1, 2, 3, 4], "loss": [0.1] * 4, "score_step": [2, 4],
                                "score": [0.3, 0.2]})
    cut = h.upto(3)
    assert cut.step == [1, 2, 3] and cut.score_step == [2] and cut.score == [0.3]


# ---- the chart -----------------------------------------------------------------------------------

def _colour_columns(img, colour):
    px = (img.numpy() * 255).round().astype(int)
    hit = (abs(px - torch.tensor(colour).numpy()).sum(-1) <= 6)
    return hit, sorted(set(hit.nonzero()[1].tolist()))


def test_loss_chart_draws_the_score_and_marks_the_best_step():
    from inversion import charts

    base = {"step": list(range(1, 41)), "loss": [1.0 / i for i in range(1, 41)], "timesteps": [[500]] * 40}
    hit, _ = _colour_columns(charts.loss_chart(base, width=800, height=520), charts.SCORE)
    assert not hit.any()
    scored = dict(base, score_step=list(range(4, 41, 4)), score=[0.9, 0.5, 0.3, 0.2, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5])
    img = charts.loss_chart(scored, width=800, height=520)
    hit, cols = _colour_columns(img, charts.SCORE)
    assert hit.sum() > 200
    # the best step (20) is marked by a dashed vertical line at x(20), between x(4) and x(40)
    full = [c for c in cols if hit[:, c].sum() > 60]
    assert full and all(abs(c - full[0]) <= 3 for c in full)
    stopped = charts.loss_chart(dict(scored, stop_step=36), width=800, height=520)
    assert _colour_columns(stopped, charts.STOP)[0].sum() > 60
