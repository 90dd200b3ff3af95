"""Previews while training (issue 14 item 1) through the real ComfyUI, on the tiny SD2 model at 64 px.

- The grid: a row per preview step (every N, and the last step), a column per prompt; each row is
  shown on the node as ComfyUI's progress preview image while the run goes on.
- A preview is what KSampler draws: the last row equals Apply Learned Embedding -> CLIPTextEncode ->
  KSampler -> VAEDecode with the run's final vectors, bit for bit.
- Previews change nothing: the same learned vectors as a run without them, the same torch RNG state,
  train/eval flags and model options afterwards, and a KSampler run after it bit-identical.
- Off costs nothing: without the input no preview code runs and nothing is sampled.
- Bad settings are refused with errors that say what to set.
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools import harness

PROMPTS = "a photo of {}\na painting of [name] on the beach"


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def _nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}


def _previews(comfyui, **widgets):
    """PreviewSettings made by the Preview Options node: tiny, one sampling step, unless ``widgets`` say."""
    node = _nodes(comfyui)["PreviewOptionsNode"]
    values = {i.id: i.default for i in node.define_schema().inputs}
    values.update(every=2, prompts=PROMPTS, steps=1, cfg=2.0, width=64, height=64)
    values.update(widgets)
    return harness.run_node(node, **values).args[0]


def _train(comfyui, sd2, name, *, steps=3, previews=None, **options):
    nodes = _nodes(comfyui)
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    inputs = harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(), init=init, name=name, method="vanilla",
        steps=steps, batch_size=1, learning_rate=0.0, seed=3, if_exists="overwrite", checkpoint_every=0, **options)
    if previews is not None:
        inputs["previews"] = previews
    return harness.run_node(nodes["TrainTextualInversion"], **inputs)


def _sample(comfyui, sd2, clip=None, text="a photo of a cat", size=64):
    """CLIPTextEncode -> KSampler (euler, 1 step, cfg 2, seed 0) -> VAEDecode, as a graph would run them."""
    nodes = comfyui.nodes
    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip or sd2.clip, text)
        (neg,) = nodes.CLIPTextEncode().encode(clip or sd2.clip, "blurry, low quality, watermark, text")
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        (out,) = nodes.common_ksampler(sd2.model, 0, 1, 2.0, "euler", "normal", pos, neg, latent)
        return sd2.vae.decode(out["samples"]).clone()


@pytest.fixture()
def shown(comfyui, monkeypatch) -> list[tuple]:
    """Every progress update with a preview image: (value, total, preview, node id)."""
    import comfy.utils

    seen: list[tuple] = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if preview is not None:
            seen.append((value, total, preview, node_id))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return seen


def test_grid_has_a_row_per_preview_step_and_a_column_per_prompt(comfyui, sd2, shown):
    out = _train(comfyui, sd2, "prev-grid", steps=5, previews=_previews(comfyui, every=2))
    grid = out.args[3]
    assert tuple(grid.shape) == (1, 3 * 64, 2 * 64, 3)  # steps 2, 4 and the last (5); two prompts
    assert grid.dtype == torch.float32 and 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    assert [(v, t, node) for v, t, _, node in shown] == [(2, 5, "7"), (4, 5, "7"), (5, 5, "7")]
    kind, image, size = shown[-1][2]
    assert kind == "JPEG" and image.size == (2 * 64, 64) and size > 0
    rows = grid[0].reshape(3, 64, 2 * 64, 3)
    assert not torch.equal(rows[0], rows[2])  # the vectors moved between step 2 and step 5
    assert not torch.equal(rows[2, :, :64], rows[2, :, 64:])  # the prompts differ

    # the last row is what KSampler draws with the final vectors through Apply Learned Embedding
    apply = _nodes(comfyui)["ApplyLearnedEmbedding"]
    clip = harness.run_node(apply, clip=sd2.clip, embedding=out.args[0], trigger="prevgrid", strength=1.0).args[0]
    expected = torch.cat([_sample(comfyui, sd2, clip, "a photo of prevgrid"),
                          _sample(comfyui, sd2, clip, "a painting of prevgrid on the beach")], dim=2)
    torch.testing.assert_close(rows[2][None], expected, rtol=0, atol=0)


def test_previews_change_neither_the_vectors_nor_later_sampling(comfyui, sd2, shown):
    modes = [m.training for m in sd2.model.model.modules()] + [m.training for m in sd2.clip.cond_stage_model.modules()]
    options = sd2.model.model_options
    torch.manual_seed(1234)
    off = _train(comfyui, sd2, "prev-off", steps=3)
    rng_off = torch.get_rng_state()
    after_off = _sample(comfyui, sd2)

    torch.manual_seed(1234)
    on = _train(comfyui, sd2, "prev-on", steps=3, previews=_previews(comfyui, every=1, sampler_name="euler_ancestral"))
    rng_on = torch.get_rng_state()
    after_on = _sample(comfyui, sd2)

    assert len(shown) == 3 and tuple(on.args[3].shape) == (1, 3 * 64, 2 * 64, 3)
    assert torch.equal(on.args[0].vectors["clip_h"], off.args[0].vectors["clip_h"])
    assert torch.equal(rng_on, rng_off)  # prepare_noise reseeds torch's RNG; the preview puts it back
    assert sd2.model.model_options is options
    assert [m.training for m in sd2.model.model.modules()] + \
        [m.training for m in sd2.clip.cond_stage_model.modules()] == modes
    torch.testing.assert_close(after_on, after_off, rtol=0, atol=0)
    hist_on, hist_off = on.ui["inversion_chart"][0], off.ui["inversion_chart"][0]
    assert hist_on["loss"] == hist_off["loss"] and hist_on["timesteps"] == hist_off["timesteps"]


def test_an_early_stop_previews_the_step_it_stops_at(comfyui, sd2, monkeypatch, shown):
    from dataclasses import replace

    scores = iter([1.0, 1.0] + [0.5] * 30)  # DVAR (window 3) fires once the last 3 scores are flat: step 5
    monkeypatch.setattr(comfyui.mod("inversion.trainer").Trainer, "evaluate",
                        lambda self, draws=4, seed=12345: float(next(scores)))
    nodes = _nodes(comfyui)
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    inputs = harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(), init=init, name="prev-stop", method="vanilla",
        steps=20, batch_size=1, learning_rate=0.0, seed=3, if_exists="overwrite", score_every=1, early_stop=True)
    inputs["options"] = replace(inputs["options"], dvar_window=3).validate()
    out = harness.run_node(nodes["TrainTextualInversion"], previews=_previews(comfyui, every=4), **inputs)
    assert out.ui["inversion_chart"][0]["stop_step"] == 5
    assert [v for v, *_ in shown] == [4, 5] and tuple(out.args[3].shape) == (1, 2 * 64, 2 * 64, 3)


def test_clip_scores_of_each_row_reach_the_chart(comfyui, sd2, shown, monkeypatch):
    """With an open_clip model, each preview row is scored (image similarity of the first prompt's image to
    the concept images, text similarity of the edit's image to its prompt without the concept), the values
    go to the live chart as they come and into the final chart; the vectors are those of a run without."""
    from open_clip_env import import_open_clip
    from vl_models import make_open_clip

    folders, classify = comfyui.mod("nodes.folders"), comfyui.mod("inversion.vision_language.classify")
    preview, run = comfyui.mod("nodes.comfy_preview"), comfyui.mod("nodes.comfy_run")
    make_open_clip(import_open_clip(), os.path.join(folders.model_dirs(folders.OPEN_CLIP)[0], "tiny-oc-prev"))
    events = []
    monkeypatch.setattr(preview, "send_event", lambda node, payload: events.append(payload))
    monkeypatch.setattr(run, "send_event", lambda node, payload: None)

    torch.manual_seed(7)
    plain = _train(comfyui, sd2, "prev-clip-off", steps=4, previews=_previews(comfyui, every=2))
    torch.manual_seed(7)
    out = _train(comfyui, sd2, "prev-clip", steps=4, previews=_previews(comfyui, every=2,
                                                                           open_clip_model="tiny-oc-prev"))
    assert torch.equal(out.args[0].vectors["clip_h"], plain.args[0].vectors["clip_h"])
    assert torch.equal(out.args[3], plain.args[3])  # the same previews
    chart = out.ui["inversion_chart"][0]
    assert chart["clip_step"] == [2, 4] and chart["clip_model"] == "tiny-oc-prev"
    assert [e["step"] for e in events] == [2, 4] and all(e["kind"] == "preview_score" for e in events)
    assert [e["clip_image"] for e in events] == chart["clip_image"]
    assert "clip_step" not in plain.ui["inversion_chart"][0]

    # the values are the paper's metrics of the grid's images, against the concept images
    oc = classify.load_open_clip("tiny-oc-prev", folders.model_dirs(folders.OPEN_CLIP))
    rows = out.args[3][0].reshape(2, 64, 2, 64, 3).permute(0, 2, 4, 1, 3)  # [row, prompt, 3, H, W]
    concept = _images().movedim(-1, 1)
    for r in range(2):
        img = oc.encode_images(list(rows[r]))
        image = float((img[0] @ oc.encode_images(concept).T).mean())
        text = float(img[1] @ oc.encode_texts(["a painting of on the beach"])[0])
        assert chart["clip_image"][r] == pytest.approx(image, abs=1e-4)
        assert chart["clip_text"][r] == pytest.approx(text, abs=1e-4)
    drawn = comfyui.mod("inversion.charts").loss_chart(chart)
    assert drawn.shape[-1] == 3  # the chart draws the CLIP panel without error


def test_an_unknown_clip_model_is_refused_before_training(comfyui, sd2):
    settings = _previews(comfyui, open_clip_model="no-such-model")
    with pytest.raises(ValueError, match=r"previews: open_clip_model: (no open_clip model found|open_clip model "
                       r"'no-such-model' not found).*or set it to none"):
        _train(comfyui, sd2, "prev-clip-bad", steps=2, previews=settings)


def test_previews_off_runs_no_preview_code(comfyui, sd2, monkeypatch, shown):
    preview = comfyui.mod("nodes.comfy_preview")

    def never(*_args, **_kwargs):
        raise AssertionError("preview code ran without a previews input")

    monkeypatch.setattr(preview.TrainingPreviews, "__init__", never)
    monkeypatch.setattr(preview.TrainingPreviews, "render", never)
    monkeypatch.setattr(preview.comfy.sample, "sample", never)
    out = _train(comfyui, sd2, "prev-none", steps=2)
    assert torch.equal(out.args[3], preview.previews_off()) and tuple(out.args[3].shape) == (1, 64, 64, 3)
    assert shown == []


@pytest.mark.parametrize("widgets, message", [
    ({"prompts": "  \n "}, "prompts is empty"),
    ({"prompts": "a photo of {}\na red car"}, r"prompt 2 \('a red car'\) has no \[name\] or \{\}"),
    ({"prompts": "\n".join(["{}"] * 9)}, "at most 8"),
    ({"sampler_name": "no-such-sampler"}, "not one of ComfyUI's samplers"),
    ({"scheduler": "no-such-scheduler"}, "not one of ComfyUI's schedulers"),
    ({"width": 100}, "width must be a multiple of 8"),
])
def test_bad_settings_are_refused_at_the_options_node(comfyui, widgets, message):
    with pytest.raises(ValueError, match=message):
        _previews(comfyui, **widgets)


def test_bad_wiring_and_too_many_rows_are_refused_before_training(comfyui, sd2, shown):
    with pytest.raises(TypeError, match="connect the 'previews' output of a Preview Options node"):
        _train(comfyui, sd2, "prev-bad", steps=2, previews={"every": 1})
    with pytest.raises(ValueError, match="makes 100 preview rows, at most 64; set every to at least 2"):
        _train(comfyui, sd2, "prev-bad", steps=100, previews=_previews(comfyui, every=1))
    assert shown == []


def test_schemas_are_valid_and_existing_sockets_keep_their_order(comfyui):
    nodes = _nodes(comfyui)
    for cls in (nodes["PreviewOptionsNode"], nodes["TrainTextualInversion"], nodes["AddConcept"]):
        cls.define_schema().validate()  # what ComfyUI checks when it registers the pack (unique ids)
    schema = nodes["TrainTextualInversion"].define_schema()
    assert [i.id for i in schema.inputs][-4:] == ["options", "previews", "concepts", "lora"]  # append-only
    assert [o.display_name for o in schema.outputs] == ["embedding", "chart", "path", "previews", "paths", "model",
                                                        "lora_path"]


def test_preview_steps_include_the_last_and_follow_a_resumed_start(comfyui):
    settings = comfyui.mod("nodes.comfy_preview").PreviewSettings(every=4)
    assert settings.preview_steps(0, 10) == [4, 8, 10]
    assert settings.preview_steps(5, 12) == [8, 12]
    assert settings.least_every(0, 1000) == 16 and len(settings.__class__(every=16).preview_steps(0, 1000)) <= 64
    assert settings.concept_prompt("a ({}:1.2), [name]!") == "a ( xqinversionpreview :1.2), xqinversionpreview !"
