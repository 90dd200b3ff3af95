"""The pack's nodes run through their own ``execute`` inside a simulated prompt (inference mode on).

Training runs on the random full-size SD1.5 checkpoint at 64x64 with every method preset; the
SDXL and SD2 families through the tiny ComfyUI objects. "The loss falls" is checked on identical
draws: a run with the method's learning rate against a run with a negligible one (same seed, so
the same images, prompts, timesteps and noise at every step).
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools import harness

STEPS = 4
SIZE = 64


def run(comfyui, node_cls, node_id="7", **inputs):
    return harness.run_node(node_cls, node_id, **inputs)


def nodes(comfyui) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{n.__name__: n for n in comfyui.mod("nodes").NODES})


def _images(n=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, size // 8, size // 8, 3, generator=g)
    imgs = torch.nn.functional.interpolate(base.movedim(-1, 1), size=(size, size), mode="bilinear").movedim(1, -1)
    return (imgs + 0.1 * torch.rand(n, size, size, 3, generator=g)).clamp(0, 1)


def _init(comfyui, clip, text="a toy"):
    return run(comfyui, nodes(comfyui).CaptionInit, clip=clip, mode="manual", text=text)[0]


def _train_inputs(comfyui, bundle, name, method="vanilla", steps=STEPS, lr=0.0, **extra):
    kw = dict(model=bundle.model, clip=bundle.clip, vae=bundle.vae, images=_images(), init=_init(comfyui, bundle.clip),
              name=name, method=method, steps=steps, batch_size=1, learning_rate=lr, seed=3, if_exists="overwrite",
              checkpoint_every=0)
    kw.update(extra)
    return harness.train_inputs(**kw)  # templates, flip, checkpoint_every, ... through Training Options


def _train(comfyui, bundle, name, method="vanilla", steps=STEPS, lr=0.0, node_id="7", **extra):
    inputs = _train_inputs(comfyui, bundle, name, method, steps, lr, **extra)
    return run(comfyui, nodes(comfyui).TrainTextualInversion, node_id=node_id, **inputs)


@pytest.fixture(scope="module")
def profile(comfyui, sd15):
    out = run(comfyui, nodes(comfyui).GradNormProfiler, model=sd15.model, clip=sd15.clip, vae=sd15.vae,
              images=_images(), init=_init(comfyui, sd15.clip), bins=4, samples_per_bin=1, batch_size=4,
              window=100, seed=0)
    return out


def test_grad_norm_profiler(comfyui, profile):
    prof, chart, lo, hi = profile.args
    assert prof.bins == 4 and prof.num_timesteps == 1000
    assert torch.isfinite(prof.mean).all() and (prof.mean > 0).all()
    assert 0 <= lo < hi < 1000 and hi - lo == 99
    assert (lo, hi) == prof.best_window(100)
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    ui = profile.ui["inversion_chart"][0]
    assert ui["kind"] == "profile" and ui["window"] == [lo, hi]


METHODS = ["vanilla", "interval", "single_step", "high_grad", "adaptive", "directional", "directional_adamw",
           "adaptive_directional", "high_grad_directional"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_the_loss_falls(comfyui, sd15, profile, method):
    extra = {"profile": profile.args[0]} if "high_grad" in method else {}
    trained = _train(comfyui, sd15, f"m-{method}", method, **extra)
    baseline = _train(comfyui, sd15, f"m-{method}-base", method, lr=1e-9, **extra)
    emb, chart, path, _previews, paths = trained.args[:5]
    assert paths == path  # one concept: one file
    loss = trained.ui["inversion_chart"][0]["loss"]
    base = baseline.ui["inversion_chart"][0]["loss"]
    assert len(loss) == STEPS and all(np.isfinite(loss))
    assert loss[0] == pytest.approx(base[0], rel=1e-5)  # same draw, same initial vectors
    assert sum(loss[1:]) < sum(base[1:]), (method, loss, base)
    assert emb.metadata["method"] == method and emb.metadata["steps"] == str(STEPS)
    assert os.path.isfile(path) and chart.shape[0] == 1
    init = _init(comfyui, sd15.clip)
    assert not torch.allclose(emb.vectors["clip_l"], init.vectors["clip_l"])
    if "directional" in method:  # DTI keeps every vector at the fixed norm m*
        norms = emb.vectors["clip_l"].norm(dim=-1)
        torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def vanilla(comfyui, sd15):
    return _train(comfyui, sd15, "concept-vanilla")


def test_saved_file_works_with_comfyui_embedding_syntax(comfyui, sd15, vanilla):
    emb, _, path, _, _ = vanilla.args[:5]
    assert path == os.path.join(comfyui.embeddings_dir, "concept-vanilla.safetensors")

    def encode(clip, text):
        with torch.inference_mode():
            return comfyui.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]

    file_route = encode(sd15.clip, "a photo of embedding:concept-vanilla")
    plain = encode(sd15.clip, "a photo of")
    assert (file_route - plain).abs().max() > 1e-4
    applied = run(comfyui, nodes(comfyui).ApplyLearnedEmbedding, clip=sd15.clip, embedding=emb, trigger="",
                  strength=1.0)
    clip, trigger = applied.args
    assert trigger == "concept-vanilla"
    torch.testing.assert_close(encode(clip, "a photo of concept-vanilla"), file_route, rtol=0, atol=0)
    loaded = run(comfyui, nodes(comfyui).LoadEmbedding, file="concept-vanilla.safetensors").args[0]
    torch.testing.assert_close(loaded.vectors["clip_l"], emb.vectors["clip_l"], rtol=0, atol=0)
    assert loaded.metadata["method"] == "vanilla"


def test_existing_file_is_never_overwritten_unless_told(comfyui, sd15, vanilla):
    path = vanilla.args[2]
    before = (os.path.getmtime(path), Path(path).read_bytes())
    with pytest.raises(ValueError, match="already exists.*'overwrite'.*'resume'.*queued an unchanged graph again.*Load Embedding"):
        _train(comfyui, sd15, "concept-vanilla", if_exists="error")
    assert (os.path.getmtime(path), Path(path).read_bytes()) == before
    with pytest.raises(ValueError, match="switch 'overwrite' on"):
        run(comfyui, nodes(comfyui).SaveEmbedding, embedding=vanilla.args[0], name="concept-vanilla",
            format="auto", overwrite=False)


def test_cancel_keeps_the_last_good_vectors_and_resume_continues_exactly(comfyui, sd15, vanilla, monkeypatch):
    """Cancel after step 2 saves step 2; resuming to step 4 gives the uninterrupted run's vectors."""
    import comfy.model_management

    comfy_run = comfyui.mod("nodes.comfy_run")
    reporter_call = comfy_run.TrainReporter.__call__

    def cancel_after_two(self, info):
        if info.step == 2:
            comfy.model_management.interrupt_current_processing(True)
        return reporter_call(self, info)

    monkeypatch.setattr(comfy_run.TrainReporter, "__call__", cancel_after_two)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _train(comfyui, sd15, "concept-cancel")
    monkeypatch.undo()
    formats = comfyui.mod("inversion.files.formats")
    saved = formats.load_embedding(os.path.join(comfyui.embeddings_dir, "concept-cancel.safetensors"))
    assert saved.metadata["steps"] == "2"
    resumed = _train(comfyui, sd15, "concept-cancel", if_exists="resume")
    emb = resumed.args[0]
    assert emb.metadata["steps"] == str(STEPS)
    assert resumed.ui["inversion_chart"][0]["step"] == list(range(1, STEPS + 1))
    torch.testing.assert_close(emb.vectors["clip_l"], vanilla.args[0].vectors["clip_l"], rtol=1e-5, atol=1e-6)


def test_live_progress_events(comfyui, sd2, monkeypatch):
    comfy_run = comfyui.mod("nodes.comfy_run")
    events = []
    monkeypatch.setattr(comfy_run, "send_event", lambda node, payload: events.append((node, payload)))
    out = _train(comfyui, sd2, "concept-events", steps=3, node_id="42")
    assert [p["step"] for _, p in events] == [1, 2, 3]
    assert all(n == "42" and p["kind"] == "train" and np.isfinite(p["loss"]) for n, p in events)
    assert [p["loss"] for _, p in events] == out.ui["inversion_chart"][0]["loss"]


@pytest.mark.parametrize("fam", ["sdxl", "sd2"])
def test_other_families_train_and_save(comfyui, request, fam):
    bundle = request.getfixturevalue(fam)
    emb, _, path, _, _ = _train(comfyui, bundle, f"concept-{fam}", steps=2, checkpoint_every=1).args[:5]
    keys = {"sdxl": ["clip_l", "clip_g"], "sd2": ["clip_h"]}[fam]
    assert emb.keys == keys
    loaded = comfyui.mod("inversion.files.formats").load_embedding(path)
    assert sorted(loaded.keys) == sorted(keys)
    assert loaded.metadata["model_family"] == {"sdxl": "SDXL", "sd2": "SD2.x"}[fam]
    state = comfyui.mod("nodes.run_files").runs_dir() / f"concept-{fam}" / "state.safetensors"
    assert state.is_file()  # checkpoint_every wrote the state, in the runs folder
    assert not os.path.exists(path.replace(".safetensors", ".state.safetensors"))  # never beside the embedding


def test_bad_wiring_messages(comfyui, sd15, sdxl):
    n = nodes(comfyui)
    with pytest.raises(ValueError, match="learned for SDXL .* this CLIP is SD1.x"):
        _train(comfyui, sd15, "bad", init=_init(comfyui, sdxl.clip))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _train(comfyui, sd15, "bad", steps=0)
    with pytest.raises(ValueError, match="needs a gradient profile"):
        _train(comfyui, sd15, "bad", method="high_grad")
    with pytest.raises(ValueError, match="name: embedding name 'two words' is not usable"):
        _train(comfyui, sd15, "two words")
    with pytest.raises(ValueError, match="custom_templates"):
        _train(comfyui, sd15, "bad", templates="custom", custom_templates="no placeholder here")
    with pytest.raises(ValueError, match="multiple of 8"):
        _train(comfyui, sd15, "bad", images=_images(size=60))
    vanilla_xl = _train(comfyui, sdxl, "concept-xl-wiring", steps=1).args[0]
    with pytest.raises(ValueError, match="learned for SDXL"):
        run(comfyui, n.ApplyLearnedEmbedding, clip=sd15.clip, embedding=vanilla_xl, trigger="xqword", strength=1.0)


def _write_images(folder):
    os.makedirs(folder, exist_ok=True)
    side = np.zeros((20, 40, 3), np.uint8)
    side[:, :20] = (255, 0, 0)  # left red, right blue
    side[:, 20:] = (0, 0, 255)
    im = Image.fromarray(side)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    im.save(os.path.join(folder, "a_rotated.jpg"), exif=exif.tobytes(), quality=95)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[8:24, 8:24, 3] = 255  # opaque square, transparent border
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "b_alpha.png"))
    with open(os.path.join(folder, "c_broken.png"), "wb") as f:
        f.write(b"not an image")


def test_load_concept_images(comfyui, caplog):
    n = nodes(comfyui)
    folder = os.path.join(comfyui.folder_paths.get_input_directory(), "concept-test")
    _write_images(folder)
    with caplog.at_level(logging.WARNING):
        images, masks, count, dataset = run(comfyui, n.LoadConceptImages, folder="concept-test", size=64, fit="crop",
                                            alpha_as_mask=True).args
    assert len(dataset.images) == count
    assert "c_broken.png" in caplog.text
    assert count == 2 and images.shape == (2, 64, 64, 3) and masks.shape == (2, 64, 64)
    rot = images[0]
    assert rot[:20, :, 0].mean() > 0.8 and rot[-20:, :, 2].mean() > 0.8  # EXIF applied: red on top
    assert masks[0].min() == 1.0  # no alpha: the whole image counts
    assert masks[1][32, 32] == 1.0 and masks[1][2, 2] == 0.0  # alpha became the mask
    assert images[1][2, 2].min() > 0.99  # transparent pixels flattened on white
    empty = os.path.join(comfyui.folder_paths.get_input_directory(), "empty-concept")
    os.makedirs(empty, exist_ok=True)
    with pytest.raises(ValueError, match="no readable images in folder .*empty-concept"):
        run(comfyui, n.LoadConceptImages, folder=empty, size=64, fit="crop", alpha_as_mask=True)
    with pytest.raises(ValueError, match="folder: give a folder"):
        run(comfyui, n.LoadConceptImages, folder="", size=64, fit="crop", alpha_as_mask=True)
    batch = _images(n=3, size=80)
    out_images, out_masks, c, out_dataset = run(comfyui, n.LoadConceptImages, folder="", size=64, fit="pad",
                                                alpha_as_mask=True, images=batch).args
    assert c == 3 and out_images.shape == (3, 64, 64, 3) and out_masks.shape == (3, 64, 64)
    assert len(out_dataset.images) == 3


def test_masks_weight_the_loss(comfyui, sd2):
    """A mask input changes the loss (the trainer averages over the masked pixels only)."""
    full = _train(comfyui, sd2, "concept-mask-a", steps=1).ui["inversion_chart"][0]["loss"][0]
    m = torch.zeros(2, SIZE, SIZE)
    m[:, :32] = 1.0
    half = _train(comfyui, sd2, "concept-mask-b", steps=1, masks=m).ui["inversion_chart"][0]["loss"][0]
    assert np.isfinite(half) and half != pytest.approx(full, rel=1e-6)


def test_slerp_and_save_formats(comfyui, sd15):
    n = nodes(comfyui)
    emb_mod = comfyui.mod("inversion.embedding")
    a = emb_mod.LearnedEmbedding("slerp-a", {"clip_l": torch.randn(2, 768)})
    b = emb_mod.LearnedEmbedding("slerp-b", {"clip_l": torch.randn(2, 768)})
    mid = run(comfyui, n.EmbeddingSlerp, a=a, b=b, alpha=0.5, name="").args[0]
    assert mid.name == "slerp-a-slerp-b-0.50"
    ends = run(comfyui, n.EmbeddingSlerp, a=a, b=b, alpha=0.0, name="start").args[0]
    torch.testing.assert_close(ends.vectors["clip_l"], a.vectors["clip_l"], rtol=1e-5, atol=1e-5)
    path = run(comfyui, n.SaveEmbedding, embedding=mid, name="", format="diffusers", overwrite=False).args[0]
    assert path.endswith("slerp-a-slerp-b-0.50.safetensors") and os.path.isfile(path)
    assert comfyui.mod("inversion.files.formats").detect_format(path) == "diffusers"


def test_training_options_node_is_built_from_the_declaration(comfyui):
    """Training Options' inputs are ``TrainingOptions``' widget fields in order, with their defaults, ranges
    and choices; a new option (a subclass with one more field) becomes one more input, last; the node
    builds the options from its widgets by name, a widget a saved workflow lacks keeping its default."""
    from dataclasses import dataclass

    opts_mod = comfyui.mod("inversion.options")
    nodes_mod = comfyui.mod("nodes.options_nodes")
    node = nodes_mod.TrainingOptionsNode
    inputs = node.define_schema().inputs
    assert [i.id for i in inputs] == [f.name for f in opts_mod.widget_fields()]
    defaults = opts_mod.TrainingOptions()
    assert all(i.default == getattr(defaults, i.id) for i in inputs)
    combo = next(i for i in inputs if i.id == "precision")
    assert list(combo.options) == list(opts_mod.PRECISIONS)

    @dataclass(frozen=True)
    class More(opts_mod.TrainingOptions):
        norm_warn: float = opts_mod.option(8.0, "Warn past this norm ratio.", min=0.0, max=100.0)

    more = nodes_mod.option_inputs(More)
    assert [i.id for i in more] == [i.id for i in inputs] + ["norm_warn"]
    assert more[-1].min == 0.0 and more[-1].max == 100.0 and more[-1].tooltip == "Warn past this norm ratio."
    built = harness.run_node(node, interval_start=10, interval_end=20, g_reading="context").args[0]
    assert built.method.interval == (10, 20) and built.g_reading == "context" and built.keep == defaults.keep
