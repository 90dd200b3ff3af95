"""SD3 and Flux (the rectified-flow families) on ComfyUI's own classes at tiny sizes (``harness.tiny_sd3`` /
``tiny_flux``: MMDiT depth 2 and Flux with one double and one single block, random weights; CLIP-L 32-d,
CLIP-G 64-d, T5 with 2 narrow layers; SD3's T5 keeps 4096 features, as SD3ClipModel requires)."""

from __future__ import annotations

import os
import types

import pytest
import torch

from devtools import harness

PROMPT = "a photo of a cat on the grass"


def _bundle(comfyui, family: str, **kw) -> types.SimpleNamespace:
    make = harness.tiny_sd3 if family.startswith("sd3") else harness.tiny_flux
    model, clip, vae = make(comfyui.folder_paths.get_folder_paths("embeddings"), **kw)
    return types.SimpleNamespace(name=family, model=model, clip=clip, vae=vae)


@pytest.fixture(scope="module")
def sd3(comfyui):
    return _bundle(comfyui, "sd3")


@pytest.fixture(scope="module")
def sd3_no_t5(comfyui):
    return _bundle(comfyui, "sd3-no-t5", t5=False)


@pytest.fixture(scope="module")
def flux(comfyui):
    return _bundle(comfyui, "flux")


@pytest.fixture(params=["sd3", "sd3_no_t5", "flux"])
def flow(request):
    return request.getfixturevalue(request.param)


def _images(n: int = 4, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 1, 1, generator=g)
    return (base + 0.2 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def _trainer(comfyui, host, text="a red toy", steps=10, lr=5e-2, method=None):
    init = comfyui.mod("inversion.methods.init")
    trainer_mod = comfyui.mod("inversion.trainer")
    emb_mod = comfyui.mod("inversion.embedding")
    concepts = comfyui.mod("inversion.concepts")
    vec = init.from_text(host.text_side, text)
    concept = concepts.prepare_concept(host.latent_encoder, _images(), emb_mod.LearnedEmbedding("xqtoy", vec, "<xqtoy>", {}))
    kwargs = {}
    if method is not None:
        kwargs = {"timesteps": method.sampler, "optimizer": method.optimizer}
    tr = trainer_mod.Trainer(host.text_side, host.denoiser, [concept],
                             trainer_mod.TrainConfig(steps=steps, batch_size=2, seed=1, lr=lr), **kwargs)
    return tr, vec


def test_families_are_read_as_comfyui_defines_them(comfyui, sd3, sd3_no_t5, flux):
    host = comfyui.mod("nodes.comfy_host")
    assert host.encoder_keys(sd3.clip) == ["clip_l", "clip_g", "t5xxl"]
    assert host.encoder_keys(sd3_no_t5.clip) == ["clip_l", "clip_g"]
    assert host.encoder_keys(flux.clip) == ["clip_l", "t5xxl"]
    for b, family, T in ((sd3, "sd3", 1000), (flux, "flux", 10000)):
        d = host.ComfyDenoiser(b.model)
        sampling = b.model.get_model_object("model_sampling")
        assert (d.family, d.objective, d.num_timesteps) == (family, "flow", T)
        torch.testing.assert_close(d.sigmas, sampling.sigmas.float())  # the model's own table: SD3's shift 3
    assert host.ComfyDenoiser(sd3.model).guidance is None and host.ComfyDenoiser(flux.model).guidance == 3.5
    t5 = host.comfy_text_side(sd3.clip).encoders[2]
    assert (t5.key, t5.bos_id, t5.eos_id, t5.pad_id, t5.max_length, t5.trainable) == ("t5xxl", None, 1, 0, 77, False)
    assert host.comfy_text_side(flux.clip).encoders[1].max_length == 256  # Flux's T5 pads to 256
    assert host.comfy_text_side(sd3.clip, train_t5=True).encoders[2].trainable


def test_encoding_matches_clip_text_encode(comfyui, flow):
    host = comfyui.mod("nodes.comfy_host")
    build = comfyui.mod("inversion.data.prompts").build_prompt_batch
    with torch.inference_mode():
        (ref,) = comfyui.nodes.CLIPTextEncode().encode(flow.clip, PROMPT)
        side = host.comfy_text_side(flow.clip)
        outs = []
        for enc in side.encoders:
            b = build(enc, [PROMPT, PROMPT], {})
            outs.append(enc.encode(b.ids, b.slots, torch.zeros(1, enc.width)))
        cond = side.combine(outs)
    context, pooled = ref[0][0], ref[0][1]["pooled_output"]
    assert cond.context.shape[1:] == context.shape[1:]  # SD3: 77 CLIP tokens (+ 77 T5), 4096 wide; Flux: T5's 256
    torch.testing.assert_close(cond.context[1:], context, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled[:1], pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_t5", [False, True])
def test_training_learns_the_clip_rows_and_t5_only_when_asked(comfyui, sd3, flux, train_t5):
    host_mod = comfyui.mod("nodes.comfy_host")
    score = comfyui.mod("inversion.methods.score")
    for b in (sd3, flux):
        with torch.inference_mode(), host_mod.training_host(b.model, b.clip, b.vae, train_t5=train_t5) as host:
            tr, vec = _trainer(comfyui, host, steps=12)
            tables = [e.token_table() for e in host.text_side.encoders]
            before = score.deterministic_score(tr, score.ScoreConfig(every=1))
            res = tr.run()
            after = score.deterministic_score(tr, score.ScoreConfig(every=1))
        learned = {"clip_l", "clip_g", "t5xxl"} if train_t5 else {"clip_l", "clip_g"}
        assert set(tr.params) == learned & set(vec), b.name  # gradients only on the learned rows
        assert all(t.grad is None and not t.requires_grad for t in tables)  # never the token tables
        for k, v in res.embedding.vectors.items():
            moved = float((v - vec[k]).abs().max())
            assert (moved > 1e-3) if k in tr.params else moved == 0.0, (b.name, k, moved)
        assert after < before, (b.name, before, after)  # the fixed-draw training loss fell


def test_logit_normal_and_adaptive_run_on_the_flow_tables(comfyui, flux):
    host_mod = comfyui.mod("nodes.comfy_host")
    presets = comfyui.mod("inversion.methods.presets")
    with torch.inference_mode(), host_mod.training_host(flux.model, flux.clip, flux.vae) as host:
        for name in ("logit_normal", "adaptive", "interval"):
            m = presets.build_method(name, host.text_side, host.denoiser.num_timesteps)
            tr, _ = _trainer(comfyui, host, steps=3, method=m)
            res = tr.run()
            assert res.steps_done == 3 and all(torch.isfinite(torch.tensor(res.history.loss)))
        assert m.sampler.a == 3500 and m.sampler.b == 4500  # [350, 450] on Flux's 10000 sigmas


def test_saved_file_applies_through_embedding_like_apply_learned_embedding(comfyui, sd3, flux):
    host_mod = comfyui.mod("nodes.comfy_host")
    formats = comfyui.mod("inversion.files.formats")
    embed = comfyui.mod("nodes.comfy_embed")
    for b in (sd3, flux):
        with torch.inference_mode(), host_mod.training_host(b.model, b.clip, b.vae, train_t5=True) as host:
            tr, _ = _trainer(comfyui, host, steps=2)
            emb = tr.run().embedding
        name = f"xqflow{b.name}"
        path = formats.save_embedding(emb, os.path.join(comfyui.embeddings_dir, name), overwrite=True)
        assert formats.detect_format(path) == "sdxl"  # one tensor per encoder key ("keyed")
        back = formats.load_embedding(path)
        assert back.keys == emb.keys and all(torch.equal(back.vectors[k], emb.vectors[k]) for k in emb.keys)
        with torch.inference_mode():
            (ref,) = comfyui.nodes.CLIPTextEncode().encode(b.clip, f"a photo of embedding:{name} on the grass")
            applied = embed.clip_with_embedding(b.clip, emb, trigger=name)
            (mine,) = comfyui.nodes.CLIPTextEncode().encode(applied, f"a photo of {name} on the grass")
            (plain,) = comfyui.nodes.CLIPTextEncode().encode(b.clip, "a photo of on the grass")
        torch.testing.assert_close(mine[0][0], ref[0][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine[0][1]["pooled_output"], ref[0][1]["pooled_output"], rtol=0, atol=1e-6)
        assert not torch.allclose(ref[0][0][:, :plain[0][0].shape[1]], plain[0][0], atol=1e-4)  # the rows did arrive


def test_sd3_embedding_fits_a_clip_without_t5_and_flux_refuses_sdxl(comfyui, sd3, sd3_no_t5, flux, sdxl):
    embed = comfyui.mod("nodes.comfy_embed")
    emb_mod = comfyui.mod("inversion.embedding")
    v = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64), "t5xxl": torch.randn(2, 4096)}
    e = emb_mod.LearnedEmbedding("xqsd", v, "<xqsd>", {})
    embed.clip_with_embedding(sd3_no_t5.clip, e)  # T5's rows unused
    with pytest.raises(ValueError, match="learned for SD3 .* this CLIP is Flux"):
        embed.check_embedding_fits(flux.clip, e)
    lg = emb_mod.LearnedEmbedding("xqlg", {k: v[k] for k in ("clip_l", "clip_g")}, "<xqlg>", {})
    with pytest.raises(ValueError, match="learned for SDXL .* this CLIP is SD3"):
        embed.check_embedding_fits(sd3.clip, lg)  # T5 would not find the word: train with this CLIP
