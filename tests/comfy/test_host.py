"""The host adapter over real ComfyUI MODEL/CLIP/VAE objects (SD1.5 full size, SDXL and SD2-v tiny)."""

from __future__ import annotations

import pytest
import torch

PROMPT = "a photo of a cat on the grass"


def _encode(comfyui, clip, prompts, placeholders=None, vectors=None):
    """Encode prompts through the adapter; ``vectors``: {key: [k, d]} for the placeholder slots."""
    build = comfyui.mod("inversion.data.prompts").build_prompt_batch
    side = comfyui.mod("nodes.comfy_host").comfy_text_side(clip)
    outs = []
    for enc in side.encoders:
        batch = build(enc, prompts, placeholders or {})
        v = vectors[enc.key] if vectors else torch.zeros(1, enc.width)
        outs.append(enc.encode(batch.ids, batch.slots, v))
    return side.combine(outs)


def _clip_text_encode(comfyui, clip, text):
    with torch.inference_mode():
        (cond,) = comfyui.nodes.CLIPTextEncode().encode(clip, text)
    return cond[0][0], cond[0][1].get("pooled_output")


def test_sd15_checkpoint_is_detected_as_sd15(comfyui, sd15):
    import comfy.model_base
    import comfy.supported_models

    assert isinstance(sd15.model.model.model_config, comfy.supported_models.SD15)
    assert sd15.model.model.model_type == comfy.model_base.ModelType.EPS
    n_unet = sum(p.numel() for p in sd15.model.model.diffusion_model.parameters())
    assert 850e6 < n_unet < 870e6  # the full SD1.5 UNet (859.5 M)
    assert comfyui.mod("nodes.comfy_host").encoder_keys(sd15.clip) == ["clip_l"]


def test_encoding_matches_clip_text_encode(comfyui, family):
    ref, ref_pooled = _clip_text_encode(comfyui, family.clip, PROMPT)
    with torch.inference_mode():
        cond = _encode(comfyui, family.clip, [PROMPT, PROMPT])
    assert cond.context.shape[0] == 2
    torch.testing.assert_close(cond.context[:1], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.context[1:], ref, rtol=0, atol=1e-6)
    if family.name == "sdxl":  # SDXL: [clip_l | clip_g] and clip_g's projected pooled output
        assert cond.context.shape[-1] == 32 + 64
        torch.testing.assert_close(cond.pooled[:1], ref_pooled, rtol=0, atol=1e-6)
    else:
        assert cond.pooled is None


def test_clip_set_last_layer_is_honoured(comfyui, sd15):
    clip = sd15.clip.clone()
    clip.clip_layer(-2)
    ref, _ = _clip_text_encode(comfyui, clip, PROMPT)
    default, _ = _clip_text_encode(comfyui, sd15.clip, PROMPT)
    with torch.inference_mode():
        cond = _encode(comfyui, clip, [PROMPT])
    torch.testing.assert_close(cond.context, ref, rtol=0, atol=1e-6)
    assert (cond.context - default).abs().max() > 1e-3


def test_vectors_initialised_from_a_word_reproduce_the_word(comfyui, family):
    """Splicing the token rows of 'cat' at the placeholder gives the plain 'cat' prompt exactly."""
    host = comfyui.mod("nodes.comfy_host")
    side = host.comfy_text_side(family.clip)
    vectors = {e.key: e.token_table()[e.tokenize("cat")].float() for e in side.encoders}
    ref, ref_pooled = _clip_text_encode(comfyui, family.clip, "a photo of a cat")
    with torch.inference_mode():
        cond = _encode(comfyui, family.clip, ["a photo of a <c>"], {"<c>": (0, 1)}, vectors)
        other = _encode(comfyui, family.clip, ["a photo of a <c>"], {"<c>": (0, 1)},
                        {k: v + 0.1 * torch.randn_like(v) for k, v in vectors.items()})
    torch.testing.assert_close(cond.context, ref, rtol=0, atol=1e-6)
    assert (other.context - ref).abs().max() > 1e-3
    if family.name == "sdxl":
        torch.testing.assert_close(cond.pooled, ref_pooled, rtol=0, atol=1e-6)


def _train_steps(comfyui, bundle, steps=2, detach_context=False, seed=0):
    """A few TI steps through the adapter inside a simulated prompt (inference mode on)."""
    host_mod = comfyui.mod("nodes.comfy_host")
    prompts = comfyui.mod("inversion.data.prompts")
    torch.manual_seed(seed)
    images = torch.rand(2, 3, 64, 64)
    losses, grads = [], []
    with torch.inference_mode():
        assert not torch.is_grad_enabled()
        with host_mod.training_host(bundle.model, bundle.clip, bundle.vae) as host:
            latents = host.latent_encoder.encode(images)
            side = host.text_side
            vectors = {e.key: e.token_table()[e.tokenize("cat")].float().clone().requires_grad_(True)
                       for e in side.encoders}
            opt = torch.optim.AdamW(list(vectors.values()), lr=1e-2, weight_decay=0.0)
            for _ in range(steps):
                outs = []
                for e in side.encoders:
                    b = prompts.build_prompt_batch(e, ["a photo of a <c>", "a rendering of a <c>"], {"<c>": (0, 1)})
                    outs.append(e.encode(b.ids, b.slots, vectors[e.key]))
                cond = side.combine(outs)
                if detach_context:
                    cond.context = cond.context.detach()
                t = torch.tensor([300, 700])
                noise = torch.randn_like(latents)
                eps = host.denoiser.predict_eps(host.denoiser.add_noise(latents, noise, t), t, cond)
                loss = torch.nn.functional.mse_loss(eps, noise)
                opt.zero_grad()
                loss.backward()
                grads.append({k: (None if v.grad is None else v.grad.clone()) for k, v in vectors.items()})
                losses.append(loss.item())
                opt.step()
    return losses, grads


def test_gradients_reach_only_the_learned_vectors(comfyui, family):
    losses, grads = _train_steps(comfyui, family)
    assert all(torch.isfinite(torch.tensor(losses)))
    for g in grads:
        for key, grad in g.items():
            assert grad is not None and torch.isfinite(grad).all() and grad.norm() > 0, key
    for module in (family.model.model, family.clip.cond_stage_model):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_sdxl_pooled_output_reaches_the_adm_vector(comfyui, sdxl):
    """With the context detached, clip_g still gets a gradient, through pooled -> encode_adm -> y."""
    _, grads = _train_steps(comfyui, sdxl, steps=1, detach_context=True)
    assert grads[0]["clip_g"] is not None and grads[0]["clip_g"].norm() > 0
    assert grads[0]["clip_l"] is None  # clip_l feeds only the context


def test_predict_eps_matches_the_parameterisation(comfyui, family):
    """eps-model: eps-hat is the UNet output; v-model: eps = sqrt(abar) v + sqrt(1 - abar) x_ddpm."""
    import comfy.model_base

    host_mod = comfyui.mod("nodes.comfy_host")
    base = family.model.model
    torch.manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([400])
    with torch.inference_mode():
        cond = _encode(comfyui, family.clip, [PROMPT])
        den = host_mod.ComfyDenoiser(family.model)
        sigma = den.sigma(t)
        x_t = den.add_noise(x0, noise, t)
        torch.testing.assert_close(x_t, base.model_sampling.noise_scaling(sigma, noise, x0), rtol=0, atol=0)
        eps = den.predict_eps(x_t, t, cond)
        kwargs = {"y": den._adm(cond, x_t)} if den.uses_adm else {}
        out = base.diffusion_model(base.model_sampling.calculate_input(sigma, x_t), t.float(),
                                   context=cond.context, **kwargs).float()
    abar = 1.0 / (1.0 + sigma**2)
    if base.model_type == comfy.model_base.ModelType.V_PREDICTION:
        expected = abar.sqrt() * out + (1 - abar).sqrt() * (x_t * abar.sqrt())
    else:
        assert base.model_type == comfy.model_base.ModelType.EPS
        expected = out
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4)
    assert den.num_timesteps == 1000
    assert (family.name == "sd2") == (base.model_type == comfy.model_base.ModelType.V_PREDICTION)


def test_latents_match_vae_encode_and_process_latent_in(comfyui, sd15):
    host_mod = comfyui.mod("nodes.comfy_host")
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        (ref,) = comfyui.nodes.VAEEncode().encode(sd15.vae, images.movedim(1, -1))
        lat = host_mod.ComfyLatentEncoder(sd15.vae, sd15.model).encode(images)
    assert not lat.is_inference()
    torch.testing.assert_close(lat, sd15.model.model.process_latent_in(ref["samples"]), rtol=0, atol=0)


def _sample(comfyui, bundle, text):
    pos, pos_pooled = _clip_text_encode(comfyui, bundle.clip, text)
    neg, neg_pooled = _clip_text_encode(comfyui, bundle.clip, "")
    with torch.inference_mode():
        (out,) = comfyui.nodes.common_ksampler(
            bundle.model, 7, 2, 5.0, "euler", "normal", [[pos, {"pooled_output": pos_pooled}]],
            [[neg, {"pooled_output": neg_pooled}]], {"samples": torch.zeros(1, 4, 8, 8)})
    return pos, out["samples"]


def test_models_stay_usable_and_unchanged_after_training(comfyui, sd15):
    """Same conditioning and same samples before and after training; CLIP layers restored."""
    import comfy.clip_model

    cond_before, before = _sample(comfyui, sd15, PROMPT)
    losses, _ = _train_steps(comfyui, sd15, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    layers = [m for m in sd15.clip.cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
    assert layers and all("forward" not in m.__dict__ for m in layers)
    cond_after, after = _sample(comfyui, sd15, PROMPT)
    torch.testing.assert_close(cond_after, cond_before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_thaw_replaces_inference_tensors(comfyui, sd2):
    host_mod = comfyui.mod("nodes.comfy_host")
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 4)
    assert layer.weight.is_inference()
    with torch.inference_mode(False):
        assert host_mod.thaw(layer) == 2
        assert host_mod.thaw(layer) == 0  # once is enough
    assert not layer.weight.is_inference() and not layer.weight.requires_grad
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        host_mod.thaw(layer)


def test_bad_wiring_errors_name_the_input(comfyui, sd15, sdxl):
    host_mod = comfyui.mod("nodes.comfy_host")
    enc = host_mod.comfy_text_side(sd15.clip).encoders[0]
    ids = torch.zeros(1, 77, dtype=torch.long)
    slots = torch.full((1, 77), -1)
    with pytest.raises(ValueError, match=r"clip_l: learned vectors must be \[k, 768\]"):
        enc.encode(ids, slots, torch.zeros(1, 1280))
    with pytest.raises(TypeError, match="clip: textual inversion"):
        host_mod.encoder_keys(sdxl.model)
    with pytest.raises(ValueError, match="has no text encoder 'clip_g'"):
        host_mod.ComfyTextEncoder(sd15.clip, "clip_g")
