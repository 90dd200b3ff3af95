"""Training Options declared once (issue 24): the dataclass fields are the options, their order the
node's, and the run's TrainConfig takes every field of the same name."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from inversion.options import TrainingOptions, option, widget_fields
from inversion.trainer import TrainConfig


@dataclass(frozen=True)
class WithANewOption(TrainingOptions):
    """A new option, written once: it is appended to the widgets and reaches the run by its name."""

    norm_warn: float = option(8.0, "Warn when a vector's norm passes this many times the largest word's.",
                              min=0.0, max=100.0, step=0.5)


def test_a_new_option_is_one_field():
    names = [f.name for f in widget_fields(WithANewOption)]
    assert names[:-1] == [f.name for f in widget_fields(TrainingOptions)] and names[-1] == "norm_warn"
    meta = widget_fields(WithANewOption)[-1].metadata
    assert meta["min"] == 0.0 and meta["max"] == 100.0 and "largest word" in meta["tooltip"]
    assert WithANewOption(norm_warn=3.0).validate().train_config(steps=5).norm_warn == 3.0
    assert TrainingOptions().train_config(steps=5).norm_warn == TrainConfig().norm_warn


def test_every_option_shared_with_the_run_reaches_its_train_config():
    """Each field whose name is a TrainConfig field, set away from its default, arrives in the run."""
    changed = dict(lr_schedule="cosine", warmup_steps=3, grad_accum=2, max_grad_norm=0.5, flip=False,
                   checkpoint_every=7, score_every=2, early_stop=True, keep="best", g_reading="context",
                   dvar_window=20, dvar_threshold=0.2)
    shared = {f.name for f in fields(TrainingOptions)} & {f.name for f in fields(TrainConfig)}
    assert shared - {"templates"} == set(changed)  # (templates: the set name becomes its prompts, below)
    cfg = TrainingOptions(**changed).validate().train_config(steps=10, batch_size=2)
    assert {k: getattr(cfg, k) for k in changed} == changed and cfg.steps == 10 and cfg.batch_size == 2
    opts = TrainingOptions(templates="style", caption_shuffle=True, caption_keep=2, caption_dropout=0.25,
                           interval_start=100, interval_end=200, adaptive_bins=10, class_word=" dog ")
    cfg = opts.train_config(steps=1)
    assert cfg.templates == opts.template_list() and cfg.captions == opts.captions
    assert (cfg.captions.shuffle, cfg.captions.keep, cfg.captions.dropout) == (True, 2, 0.25)
    assert opts.method.interval == (100, 200) and opts.method.bins == 10 and opts.method.class_word == "dog"


def test_choices_and_ranges_are_checked_with_the_inputs_name():
    for name, bad in (("precision", "fp8"), ("lr_schedule", "step"), ("templates", "mine"), ("keep", "first"),
                      ("g_reading", "rows")):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            TrainingOptions(**{name: bad}).validate()
    with pytest.raises(ValueError, match="interval_start"):
        TrainingOptions(interval_start=500, interval_end=100).validate()
    assert all(f.metadata["tooltip"] for f in fields(TrainingOptions))
