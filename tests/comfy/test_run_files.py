"""A run's files through the real ComfyUI (issue 17): nothing lost, nothing silent.

- Cancel in an ``overwrite`` run never replaces the existing embedding; the run's own vectors and
  state wait in ``models/inversion_runs/<name>/``, ``resume`` continues them, and only a completed
  run replaces the file.
- No state file in ``models/embeddings``; an old ``<name>.state.safetensors`` side file is moved out
  and still resumes; a name ending in ``.state`` is refused; a corrupt state says what to do.
- A learning rate that makes the vectors explode stops the run and never writes them.
Everything trains the tiny SD2 model at 64 px (a step takes a fraction of a second).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from devtools import harness

STEPS = 4


def run(comfyui, node_cls, node_id="7", **inputs):
    return harness.run_node(node_cls, node_id, **inputs)


def _nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)




def _messages(sent):
    return [p["message"] for e, p in sent if e == "inversion.warning"]


def _train(comfyui, sd2, name, *, steps=STEPS, if_exists="overwrite", lr=0.0, checkpoint_every=0, seed=3):
    nodes = _nodes(comfyui)
    init = run(comfyui, nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    return run(comfyui, nodes["TrainTextualInversion"], **harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(), init=init, name=name, method="vanilla",
        steps=steps, batch_size=1, learning_rate=lr, seed=seed, if_exists=if_exists,
        checkpoint_every=checkpoint_every))


def _paths(comfyui, name):
    run_dir = comfyui.mod("nodes.run_files").runs_dir() / name  # models/inversion_runs of the booted ComfyUI
    assert run_dir.parent.name == "inversion_runs" and run_dir.parent.parent.name == "models"
    return Path(comfyui.embeddings_dir) / f"{name}.safetensors", run_dir


def test_cancel_in_an_overwrite_run_keeps_the_existing_file_and_resume_finishes_it(comfyui, sd2, toasts):
    import comfy.model_management

    formats = comfyui.mod("inversion.files.formats")
    path, run_dir = _paths(comfyui, "kept-concept")
    _train(comfyui, sd2, "kept-concept", steps=6)
    before = path.read_bytes()
    assert formats.load_embedding(path).metadata["steps"] == "6"

    with pytest.MonkeyPatch.context() as mp:
        harness.cancel_at_step(mp, 1)  # the probe's case: Cancel as soon as the node starts
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(comfyui, sd2, "kept-concept", steps=STEPS, seed=5)
    assert path.read_bytes() == before
    assert formats.load_embedding(run_dir / "kept-concept.safetensors").metadata["steps"] == "1"
    assert (run_dir / "state.safetensors").is_file()
    assert any("kept-concept.safetensors (an earlier run) is unchanged" in m and "resume" in m
               for m in _messages(toasts)), _messages(toasts)

    # resume continues the cancelled run (seed 5), and only its completion replaces the file
    done = _train(comfyui, sd2, "kept-concept", steps=STEPS, seed=5, if_exists="resume")
    assert any("resuming the unfinished run" in m for m in _messages(toasts))
    assert done.args[0].metadata["steps"] == str(STEPS) and done.ui["inversion_chart"][0]["step"] == [1, 2, 3, 4]
    assert path.read_bytes() != before
    assert formats.load_embedding(path).metadata["steps"] == str(STEPS)
    assert not (run_dir / "kept-concept.safetensors").exists()
    uninterrupted = _train(comfyui, sd2, "kept-fresh", steps=STEPS, seed=5)
    torch.testing.assert_close(done.args[0].vectors["clip_h"], uninterrupted.args[0].vectors["clip_h"])


def test_cancel_before_the_first_step_writes_nothing(comfyui, sd2):
    import comfy.model_management

    path, run_dir = _paths(comfyui, "early-cancel")
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(comfyui, sd2, "early-cancel")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not path.exists() and not (run_dir / "state.safetensors").exists()


def test_state_lives_outside_models_embeddings_and_resumes(comfyui, sd2):
    path, run_dir = _paths(comfyui, "state-home")
    _train(comfyui, sd2, "state-home", steps=2, checkpoint_every=1)
    assert (run_dir / "state.safetensors").is_file()
    assert not [f for f in os.listdir(comfyui.embeddings_dir) if ".state" in f]
    listed = comfyui.folder_paths.get_filename_list("embeddings")
    assert "state-home.safetensors" in listed and not [f for f in listed if ".state" in f]
    resumed = _train(comfyui, sd2, "state-home", steps=STEPS, if_exists="resume")
    assert resumed.ui["inversion_chart"][0]["step"] == [1, 2, 3, 4]  # the history came back from the state
    straight = _train(comfyui, sd2, "state-straight", steps=STEPS)
    torch.testing.assert_close(resumed.args[0].vectors["clip_h"], straight.args[0].vectors["clip_h"])


def test_an_old_side_file_is_moved_out_and_still_resumes(comfyui, sd2):
    run_files = comfyui.mod("nodes.run_files")
    path, run_dir = _paths(comfyui, "legacy-side")
    _train(comfyui, sd2, "legacy-side", steps=2, checkpoint_every=1)
    # what older versions wrote: the state beside the embedding
    old = Path(comfyui.embeddings_dir) / "legacy-side.state.safetensors"
    os.replace(run_dir / "state.safetensors", old)
    # an embedding that merely has such a name is not a state file and stays
    other = Path(comfyui.embeddings_dir) / "not-a-state.state.safetensors"
    other.write_bytes(path.read_bytes())
    moved = run_files.migrate_side_files()
    assert (old, run_dir / "state.safetensors") in moved and not old.exists() and other.exists()
    other.unlink()
    resumed = _train(comfyui, sd2, "legacy-side", steps=STEPS, if_exists="resume")
    assert resumed.ui["inversion_chart"][0]["step"] == [1, 2, 3, 4]


def test_a_name_ending_in_state_is_refused(comfyui, sd2):
    with pytest.raises(ValueError, match=r"name: .*'\.state'"):
        _train(comfyui, sd2, "other.state")
    assert not (Path(comfyui.embeddings_dir) / "other.state.safetensors").exists()


def test_a_corrupt_state_file_says_what_to_do(comfyui, sd2):
    path, run_dir = _paths(comfyui, "corrupt-state")
    _train(comfyui, sd2, "corrupt-state", steps=2, checkpoint_every=1)
    (run_dir / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="Delete it.*if_exists = overwrite"):
        _train(comfyui, sd2, "corrupt-state", steps=STEPS, if_exists="resume")


def test_a_state_older_than_the_file_resumes_from_the_file(comfyui, sd2, toasts):
    formats = comfyui.mod("inversion.files.formats")
    path, run_dir = _paths(comfyui, "stale-state")
    _train(comfyui, sd2, "stale-state", steps=2, checkpoint_every=1)
    emb = formats.load_embedding(path)
    emb.vectors = {k: v + 0.01 for k, v in emb.vectors.items()}
    formats.save_embedding(emb, path, overwrite=True)  # e.g. Save Embedding over it
    resumed = _train(comfyui, sd2, "stale-state", steps=STEPS, if_exists="resume")
    assert any("does not match" in m for m in _messages(toasts)), _messages(toasts)
    assert resumed.ui["inversion_chart"][0]["step"] == [3, 4]  # from the file: its steps, no history


def test_exploding_vectors_stop_the_run_and_are_never_written(comfyui, sd2):
    path, run_dir = _paths(comfyui, "exploding")
    with pytest.raises(ValueError, match=r"exploded.*times the largest word.*Lower the learning rate"):
        _train(comfyui, sd2, "exploding", lr=10.0, steps=20, checkpoint_every=1)
    if path.exists():  # only vectors within the guard's warning range may have been kept
        formats = comfyui.mod("inversion.files.formats")
        table = sd2.clip.cond_stage_model.clip_h.transformer.get_input_embeddings().weight
        vocab = float(table.float().norm(dim=-1).max())
        assert float(formats.load_embedding(path).vectors["clip_h"].norm(dim=-1).max()) <= 8 * vocab + 1e-6
