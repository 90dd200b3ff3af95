"""The seeds/003 regularisers and DTI's per-vector prior through the real ComfyUI (tiny SD2-v, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from devtools import harness


@pytest.mark.parametrize("method", ["vanilla", "directional"])
def test_training_with_l2_to_init_and_the_vocabulary_contrast(comfyui, sd2, monkeypatch, method):
    """Train Textual Inversion with l2_init_weight and contrastive_weight from Training Options: both terms
    are computed every step (the contrast as the one-concept vocabulary contrast), and the run writes
    finite vectors of the init's shape."""
    regs = comfyui.mod("inversion.methods.regularizers")
    calls = []
    for cls in (regs.L2ToInit, regs.VocabularyContrast):
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, v, ctx, _o=orig: calls.append(type(self).__name__)
                            or _o(self, v, ctx))
    nodes = {n.__name__: n for n in comfyui.mod("nodes").NODES}
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a red toy")[0]
    name = f"reg-{method}"
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    out = harness.run_node(nodes["TrainTextualInversion"], **harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, init=init, name=name, method=method, steps=3,
        learning_rate=0.0, batch_size=1, seed=0, if_exists="overwrite", images=images, checkpoint_every=0,
        l2_init_weight=0.1, contrastive_weight=1e-3, class_word="toy"))
    emb = out.args[0]
    assert calls.count("L2ToInit") == 3 and calls.count("VocabularyContrast") == 3
    for key, v in emb.vectors.items():
        assert v.shape == init.vectors[key].shape and torch.isfinite(v).all()
    assert os.path.isfile(os.path.join(comfyui.embeddings_dir, f"{name}.safetensors"))


def test_dti_prior_rows_with_comfyui_tokenizers(comfyui, sdxl):
    """ComfyUI's own tokenizers (SDXL: clip_l and clip_g) place the class word on its own row: in
    'a red toy' 'dog' is absent, so the last row takes it and 'a', 'red' keep their own directions."""
    ch, presets, init_mod = (comfyui.mod(m) for m in ("nodes.comfy_host", "inversion.methods.presets", "inversion.methods.init"))
    with ch.training_host(sdxl.model, sdxl.clip) as host:
        init = init_mod.from_text(host.text_side, "a red toy")
        mu = presets.prior_directions(host.text_side, init, "a red toy", "dog")
        same = presets.prior_directions(host.text_side, init, "a red toy", "toy")
        dog = init_mod.from_word(host.text_side, "dog")
    for key, v in init.items():
        assert v.shape[0] == 3
        torch.testing.assert_close(mu[key][:2], v[:2])
        torch.testing.assert_close(mu[key][2], dog[key][0])
        torch.testing.assert_close(same[key], v)


def test_g_reading_reaches_the_profiler_and_the_trainer_and_must_match(comfyui, sd2):
    """Training Options' g_reading: the profiler measures with it, the trainer trains with it, and a profile
    measured with the other reading is refused before any work."""
    nodes = {n.__name__: n for n in comfyui.mod("nodes").NODES}
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    common = dict(model=sd2.model, clip=sd2.clip, vae=sd2.vae, init=init, images=images)
    context = harness.training_options(g_reading="context")
    prof = harness.run_node(nodes["GradNormProfiler"], **common, bins=2, samples_per_bin=2, batch_size=2, window=100,
                            seed=0, options=context).args[0]
    assert prof.reading == "context"
    out = harness.run_node(nodes["TrainTextualInversion"], **common, name="g-reading", method="adaptive", steps=2,
                           learning_rate=0.0, batch_size=1, seed=0, if_exists="overwrite", profile=prof, options=context)
    assert out.args[0].metadata["steps"] == "2"
    with pytest.raises(ValueError, match="profile: measured with g_reading = context but this run uses tokens"):
        harness.run_node(nodes["TrainTextualInversion"], **common, name="g-reading", method="adaptive", steps=2,
                         learning_rate=0.0, batch_size=1, seed=0, if_exists="overwrite", profile=prof)
