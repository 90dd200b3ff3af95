"""The trainer's SDPA attention (``nodes/comfy_attention.py``) against ComfyUI's own attention."""

from __future__ import annotations

import pytest
import torch


def _count_sdpa(monkeypatch) -> list[int]:
    """Counts calls of torch's SDPA (ComfyUI's CPU default, sub-quadratic attention, never calls it)."""
    calls = [0]
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("layout", ["flat", "skip_reshape", "skip_output_reshape"])
@pytest.mark.parametrize("mask", [None, "2d", "3d", "bool"])
def test_sdpa_matches_comfy_attention_functions(comfyui, layout, mask):
    """Same values as ComfyUI's basic and sub-quadratic attention, in each layout and mask form."""
    import comfy.ldm.modules.attention as attn

    att = comfyui.mod("nodes.comfy_attention")
    torch.manual_seed(0)
    b, heads, n, m, d = 2, 4, 24, 7, 16
    q, k, v = (torch.randn(b, heads, length, d, dtype=torch.float64) for length in (n, m, m))
    masks = {None: None, "2d": torch.randn(n, m, dtype=torch.float64), "3d": torch.randn(b, n, m, dtype=torch.float64),
             "bool": torch.rand(b, n, m) > 0.3}
    kw = {"mask": masks[mask], "skip_reshape": layout == "skip_reshape",
          "skip_output_reshape": layout == "skip_output_reshape"}
    if layout != "skip_reshape":
        q, k, v = (t.transpose(1, 2).reshape(b, -1, heads * d) for t in (q, k, v))
    ours = att.sdpa(q, k, v, heads, **kw)
    # A bool mask means "may attend" only in ComfyUI's PyTorch path (basic and sub-quadratic
    # attention read it as a key-padding mask): that path is the one reimplemented here.
    references = [attn.attention_pytorch]
    if mask != "bool":
        references += [attn.attention_basic, attn.attention_sub_quad]
    for reference in references:
        ref = reference(q, k, v, heads, **kw)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_override_goes_through_comfy_wrap_attn(comfyui, monkeypatch):
    """``wrap_attn`` hands the override ComfyUI's function and its arguments."""
    import comfy.ldm.modules.attention as attn

    att = comfyui.mod("nodes.comfy_attention")
    calls = _count_sdpa(monkeypatch)
    q = torch.randn(1, 10, 32)
    out = attn.attention_sub_quad(q, q, q, 2, transformer_options={att.OVERRIDE_KEY: att.sdpa_override})
    assert calls[0] == 1
    torch.testing.assert_close(out, attn.attention_sub_quad(q, q, q, 2), rtol=1e-5, atol=1e-6)


def _step(comfyui, bundle, seed=0):
    """One TI step (64 px) inside ``training_host``: eps-hat, the vectors' gradients, the options seen."""
    host_mod = comfyui.mod("nodes.comfy_host")
    prompts = comfyui.mod("inversion.data.prompts")
    torch.manual_seed(seed)
    with torch.inference_mode(), host_mod.training_host(bundle.model, bundle.clip) as host:
        seen = dict(bundle.model.model_options.get("transformer_options", {}))
        side = host.text_side
        vectors = {e.key: e.token_table()[e.tokenize("cat")].float().clone().requires_grad_(True) for e in side.encoders}
        cond = side.combine([e.encode(*_ids(prompts, e), vectors[e.key]) for e in side.encoders])
        x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
        eps = host.denoiser.predict_eps(host.denoiser.add_noise(x0, noise, t), t, cond)
        torch.nn.functional.mse_loss(eps, noise).backward()
        return eps.detach(), {k: v.grad.clone() for k, v in vectors.items()}, seen


def _ids(prompts, enc):
    b = prompts.build_prompt_batch(enc, ["a photo of a <c>", "a rendering of a <c>"], {"<c>": (0, 1)})
    return b.ids, b.slots


def _attention_modules(bundle) -> int:
    import comfy.ldm.modules.attention as attn

    return sum(isinstance(m, attn.CrossAttention) for m in bundle.model.model.diffusion_model.modules())


@pytest.mark.parametrize("fam", ["sd2", "sd15"])
def test_training_uses_sdpa_and_matches_comfy_attention(comfyui, request, monkeypatch, fam):
    """Every UNet attention of a training step goes through SDPA; eps-hat and the gradients equal
    those of ComfyUI's default (sub-quadratic on the CPU) attention in fp32."""
    bundle = request.getfixturevalue(fam)
    host_mod, att = comfyui.mod("nodes.comfy_host"), comfyui.mod("nodes.comfy_attention")
    calls = _count_sdpa(monkeypatch)
    eps, grads, seen = _step(comfyui, bundle)
    assert seen.get(att.OVERRIDE_KEY) is att.sdpa_override
    # forward once per attention module (the text encoder does not use the override); the
    # backward of SDPA is not a Python call
    assert calls[0] == _attention_modules(bundle) > 0

    import contextlib

    monkeypatch.setattr(host_mod, "sdpa_attention", lambda model: contextlib.nullcontext(False))
    calls[0] = 0
    ref_eps, ref_grads, seen = _step(comfyui, bundle)
    assert att.OVERRIDE_KEY not in seen and calls[0] == 0
    torch.testing.assert_close(eps, ref_eps, rtol=1e-4, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5 * ref_grads[key].abs().max().item())


def _sample(comfyui, bundle):
    with torch.inference_mode():
        (pos,) = comfyui.nodes.CLIPTextEncode().encode(bundle.clip, "a photo of a cat")
        (neg,) = comfyui.nodes.CLIPTextEncode().encode(bundle.clip, "")
        (out,) = comfyui.nodes.common_ksampler(bundle.model, 7, 2, 5.0, "euler", "normal", pos, neg,
                                               {"samples": torch.zeros(1, 4, 8, 8)})
    return out["samples"]


def test_options_restored_and_sampling_unchanged_after_training(comfyui, sd2):
    """After ``training_host`` the patcher's model_options are the same object with the same
    contents, also after an exception, and KSampler's output is bit-identical to before."""
    host_mod = comfyui.mod("nodes.comfy_host")
    options = sd2.model.model_options
    snapshot = repr(options)
    before = _sample(comfyui, sd2)
    _step(comfyui, sd2)
    assert sd2.model.model_options is options and repr(options) == snapshot
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
        with host_mod.training_host(sd2.model, sd2.clip):
            raise RuntimeError("boom")
    assert sd2.model.model_options is options and repr(options) == snapshot
    torch.testing.assert_close(_sample(comfyui, sd2), before, rtol=0, atol=0)


def test_no_sdpa_leaves_the_model_alone(comfyui, sd2, monkeypatch):
    att = comfyui.mod("nodes.comfy_attention")
    monkeypatch.setattr(att, "has_sdpa", lambda: False)
    options = sd2.model.model_options
    with att.sdpa_attention(sd2.model) as used:
        assert used is False and sd2.model.model_options is options
