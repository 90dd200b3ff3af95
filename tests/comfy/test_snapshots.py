"""Snapshots, the best step and early stop through the real ComfyUI (issue 14 items 2 and 3).

- Each scored step's embedding is kept in ``models/inversion_runs/<name>/snapshots/``, never in
  ``models/embeddings`` (nor in ComfyUI's embeddings listing); a fresh run clears an earlier run's.
- ``keep = best`` writes the lowest-score step's vectors (metadata names it); the state keeps the last
  step, and resume continues the run.
- Early stop (DVAR) ends the run at the predicted step and it still writes its file.
- Score off: no snapshot, no score, the same vectors as a scored run.
Everything trains the tiny SD2 model at 64 px.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from devtools import harness


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def _nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}


def _train(comfyui, sd2, name, *, steps=4, if_exists="overwrite", seed=3, tweak=None, **options):
    nodes = _nodes(comfyui)
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    inputs = harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(), init=init, name=name, method="vanilla",
        steps=steps, batch_size=1, learning_rate=0.0, seed=seed, if_exists=if_exists, checkpoint_every=0, **options)
    if tweak:  # TrainingOptions fields the node does not show (the DVAR window)
        inputs["options"] = replace(inputs["options"], **tweak).validate()
    return harness.run_node(nodes["TrainTextualInversion"], **inputs)


def _paths(comfyui, name):
    run_dir = comfyui.mod("nodes.run_files").runs_dir() / name
    return Path(comfyui.embeddings_dir) / f"{name}.safetensors", run_dir


def _scripted(comfyui, monkeypatch, values):
    """``Trainer.evaluate`` returns ``values`` in turn: a score curve with a known best step."""
    it = iter(values)
    monkeypatch.setattr(comfyui.mod("inversion.trainer").Trainer, "evaluate",
                        lambda self, num_batches=8, seed=12345: float(next(it)))


def _snapshot_steps(run_dir):
    return sorted(int(p.name[5:-12]) for p in (run_dir / "snapshots").glob("step-*.safetensors"))


def test_snapshots_live_in_the_runs_folder_and_a_fresh_run_clears_them(comfyui, sd2):
    import folder_paths

    path, run_dir = _paths(comfyui, "snap-home")
    out = _train(comfyui, sd2, "snap-home", steps=5, score_every=2)
    assert _snapshot_steps(run_dir) == [2, 4, 5]  # every 2 steps, and the last
    assert (run_dir / "snapshots" / "step-000002.safetensors").is_file()
    payload = out.ui["inversion_chart"][0]
    assert payload["score_step"] == [2, 4, 5] and len(payload["score"]) == 3
    assert payload["best_step"] in (2, 4, 5) and payload["best_score"] == min(payload["score"])
    # nothing of the run is in models/embeddings, nor offered as embedding:<...>
    everything = [f for _, _, files in os.walk(comfyui.embeddings_dir) for f in files]
    assert not [f for f in everything if f.startswith("step-")]
    snapshot_name = re.compile(r"(^|/)step-\d{6}\.safetensors$")  # other tests' files may say "single_step-"
    assert not [f for f in folder_paths.get_filename_list("embeddings") if snapshot_name.search(f) or "snapshots/" in f]
    # each snapshot is that step's embedding, with its score; Inspect Embedding reads them
    formats, inspect = comfyui.mod("inversion.files.formats"), comfyui.mod("inversion.methods.inspect")
    snap = formats.load_embedding(run_dir / "snapshots" / "step-000005.safetensors")
    assert snap.metadata["steps"] == "5" and float(snap.metadata["score"]) == payload["score"][-1]
    torch.testing.assert_close(snap.vectors["clip_h"], formats.load_embedding(path).vectors["clip_h"])
    found, _ = inspect.load_snapshots(run_dir, "snap-home")
    assert [s.step for s in found] == [2, 4, 5]

    _train(comfyui, sd2, "snap-home", steps=3)  # a fresh run, score off: the old snapshots go
    assert _snapshot_steps(run_dir) == []


def test_score_off_writes_no_snapshot_and_trains_the_same_vectors(comfyui, sd2):
    _, run_dir = _paths(comfyui, "snap-off")
    off = _train(comfyui, sd2, "snap-off", steps=3)
    assert _snapshot_steps(run_dir) == [] and off.ui["inversion_chart"][0]["score"] == []
    assert off.ui["inversion_chart"][0]["best_step"] is None
    on = _train(comfyui, sd2, "snap-on", steps=3, score_every=1)
    assert torch.equal(on.args[0].vectors["clip_h"], off.args[0].vectors["clip_h"])


def test_keep_best_writes_the_best_snapshot_and_resume_continues_the_last_step(comfyui, sd2, monkeypatch, toasts):
    formats = comfyui.mod("inversion.files.formats")
    path, run_dir = _paths(comfyui, "snap-best")
    _scripted(comfyui, monkeypatch, [0.5, 0.1, 0.3, 0.1, 0.4, 0.6])  # best: step 2 (the earlier of two 0.1s)
    out = _train(comfyui, sd2, "snap-best", steps=4, score_every=1, keep="best")
    best = formats.load_embedding(run_dir / "snapshots" / "step-000002.safetensors")
    last = formats.load_embedding(run_dir / "snapshots" / "step-000004.safetensors")
    written = formats.load_embedding(path)
    assert not torch.equal(best.vectors["clip_h"], last.vectors["clip_h"])
    assert torch.equal(written.vectors["clip_h"], best.vectors["clip_h"])
    assert torch.equal(out.args[0].vectors["clip_h"], best.vectors["clip_h"]) and out.args[1] is not None
    assert written.metadata["keep"] == "best" and written.metadata["best_step"] == "2"
    assert float(written.metadata["score"]) == 0.1 and written.metadata["steps_trained"] == "4"
    assert out.ui["inversion_chart"][0]["best_step"] == 2
    state = comfyui.mod("inversion.files.checkpoint").load_state(run_dir / "state.safetensors")
    assert state.step == 4 and torch.equal(state.vectors["clip_h"], last.vectors["clip_h"])

    resumed = _train(comfyui, sd2, "snap-best", steps=6, score_every=1, keep="best", if_exists="resume")
    assert not [p for e, p in toasts if e == "inversion.warning"], toasts  # the run's own file: no warning
    payload = resumed.ui["inversion_chart"][0]
    assert payload["step"] == [1, 2, 3, 4, 5, 6] and payload["score_step"] == [1, 2, 3, 4, 5, 6]
    assert _snapshot_steps(run_dir) == [1, 2, 3, 4, 5, 6] and payload["best_step"] == 2


def test_early_stop_ends_the_run_at_the_predicted_step(comfyui, sd2, monkeypatch, toasts):
    formats = comfyui.mod("inversion.files.formats")
    path, run_dir = _paths(comfyui, "snap-stop")
    k, w = 2, 3  # two high scores, then flat: DVAR fires once the window is flat, at step k + w
    _scripted(comfyui, monkeypatch, [1.0] * k + [0.5] * 20)
    out = _train(comfyui, sd2, "snap-stop", steps=20, score_every=1, early_stop=True, tweak={"dvar_window": w})
    payload = out.ui["inversion_chart"][0]
    assert payload["step"][-1] == k + w and payload["stop_step"] == k + w
    assert "DVAR early stop at step 5" in payload["stop_reason"]
    stops = [p for e, p in toasts if e == "inversion.progress" and p.get("stop_step")]
    assert [p["stop_step"] for p in stops] == [k + w]
    assert formats.load_embedding(path).metadata["steps"] == str(k + w)  # the stopped run earned its file
    assert _snapshot_steps(run_dir) == list(range(1, k + w + 1))


def test_keep_best_without_a_score_is_refused_at_the_options_node(comfyui):
    with pytest.raises(ValueError, match="score_every > 0"):
        harness.training_options(keep="best")
