"""What changed in ComfyUI up to v0.33 and how the pack meets it (../shared/COMFYUI_NOTES.md section 8).

Each test runs on whichever ComfyUI ``COMFYUI_PATH`` names; the behaviour it checks is found by feature
detection, as the pack finds it: the text encoder's execution device (v0.4+), and training under
dynamic VRAM (v0.16+: a model whose weights stream to the GPU per operation is trained through core's
fully loaded copy). The tokenizer's new return shape (v0.28+) is covered by ``test_embed.py``, whose
tests fail on v0.33 with the old override.
"""

from __future__ import annotations

import pytest
import torch

from devtools import harness


def _execution_devices(monkeypatch) -> list:
    """Every execution device an ``SDClipModel`` forward runs with (``"absent"``: this ComfyUI has none)."""
    import comfy.sd1_clip

    seen = []
    forward = comfy.sd1_clip.SDClipModel.forward

    def spy(self, tokens):
        seen.append(getattr(self, "execution_device", "absent"))
        return forward(self, tokens)

    monkeypatch.setattr(comfy.sd1_clip.SDClipModel, "forward", spy)
    return seen


def test_text_encoder_runs_where_clip_text_encode_runs_it(comfyui, family, monkeypatch):
    """The trainer's encoder gets the device ComfyUI's own encode gives it (v0.4+: the patcher's load
    device, not wherever its token table sits), for every encoder of every family."""
    host = comfyui.mod("nodes.comfy_host")
    build = comfyui.mod("inversion.data.prompts").build_prompt_batch
    seen = _execution_devices(monkeypatch)
    with torch.inference_mode():
        comfyui.nodes.CLIPTextEncode().encode(family.clip, "a photo of a cat")
    core = list(seen)
    seen.clear()
    with host.training_host(family.model, family.clip) as h:
        for enc in h.text_side.encoders:
            batch = build(enc, ["a photo of a <c>"], {"<c>": (0, 1)})
            enc.encode(batch.ids, batch.slots, torch.zeros(1, enc.width, requires_grad=True))
    assert len(core) == len(seen) == len(host.encoder_keys(family.clip))
    assert seen == core
    if core[0] != "absent":  # v0.4+
        assert all(d == family.clip.patcher.load_device for d in seen)


def _streamed(patcher):
    """A clone of ``patcher`` that reports itself dynamic and makes its delegate with core's own code.

    A real ``ModelPatcherDynamic`` cannot be built on a CPU (comfy-aimdo allocates pinned host memory),
    so this stand-in borrows its two methods: ``is_dynamic`` and ``get_non_dynamic_delegate``, which
    reloads the model from its loader's ``cached_patcher_init`` through a plain ModelPatcher."""
    import comfy.model_patcher

    dynamic = comfy.model_patcher.ModelPatcherDynamic

    class Streamed(type(patcher)):
        is_dynamic = lambda self: True  # noqa: E731
        get_non_dynamic_delegate = dynamic.get_non_dynamic_delegate

    out = patcher.clone()
    out.__class__ = Streamed
    out.non_dynamic_delegate_model = None
    return out


def _needs_dynamic_vram():
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic arrived in v0.16)")


def test_training_under_dynamic_vram_uses_cores_fully_loaded_copy(comfyui, sd15, monkeypatch, tmp_path):
    """With a MODEL and CLIP whose weights stream (dynamic VRAM), the run loads and trains core's
    non-dynamic delegates, never the streamed patchers, made once and reused by the next run; the
    vectors are those of a run on the ordinary load (same file, same weights)."""
    _needs_dynamic_vram()
    import comfy.model_management

    training = comfyui.mod("nodes.training_nodes")
    init = comfyui.mod("inversion.methods.init")
    text = comfyui.mod("nodes.comfy_host").comfy_text_side(sd15.clip)
    loaded = []
    load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, *a, **k: (loaded.extend(models), load(models, *a, **k))[1])
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def train(model, clip, name):
        vectors = init.from_word(text, "cat", 1)
        emb = comfyui.mod("inversion.embedding").LearnedEmbedding("init", vectors, "<init>", {"init_text": "cat"})
        out = harness.run_node(training.TrainTextualInversion, **harness.train_inputs(
            model=model, clip=clip, vae=sd15.vae, init=emb, name=name, method="vanilla", steps=2, learning_rate=0.0,
            batch_size=1, seed=0, if_exists="error", images=images))
        return out.args[0].vectors["clip_l"]

    plain = train(sd15.model, sd15.clip, "dyn-plain")
    model, clip = _streamed(sd15.model), sd15.clip.clone()
    clip.patcher = _streamed(clip.patcher)
    loaded.clear()
    streamed = train(model, clip, "dyn-streamed")
    assert model not in loaded and clip.patcher not in loaded
    delegate_model = model.non_dynamic_delegate_model[0]
    assert delegate_model is not model.model and any(p.model is delegate_model for p in loaded)
    assert any(p.model is clip.patcher.non_dynamic_delegate_model[0] for p in loaded)
    torch.testing.assert_close(streamed, plain, rtol=0, atol=0)
    train(model, clip, "dyn-streamed-again")  # the delegate is kept: the file is not read a third time
    assert model.non_dynamic_delegate_model[0] is delegate_model


def test_a_streamed_model_its_loader_cannot_copy_is_refused_with_what_to_do(comfyui, sd2):
    """A dynamic MODEL without a loader to copy it from (a custom loader, no ``cached_patcher_init``) stops
    before training with an error that names the way out."""
    _needs_dynamic_vram()
    host = comfyui.mod("nodes.comfy_host")
    model = _streamed(sd2.model)
    model.cached_patcher_init = None
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        host.static_models(model, sd2.clip)
