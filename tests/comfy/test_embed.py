"""In-memory embeddings in prompts (``clip_with_embedding``) against ComfyUI's own file route."""

from __future__ import annotations

import pytest
import torch


def _embedding(comfyui, clip, name, k=2, seed=0):
    host = comfyui.mod("nodes.comfy_host")
    emb_mod = comfyui.mod("inversion.embedding")
    g = torch.Generator().manual_seed(seed)
    vectors = {}
    for enc in host.comfy_text_side(clip).encoders:
        rows = enc.token_table().float()
        vectors[enc.key] = rows[torch.randint(0, 40000, (k,), generator=g)] + 0.05 * torch.randn(k, enc.width, generator=g)
    return emb_mod.LearnedEmbedding(name, vectors)


def _save(comfyui, emb):
    formats = comfyui.mod("inversion.files.formats")
    return formats.save_embedding(emb, f"{comfyui.embeddings_dir}/{emb.name}", overwrite=True)


def _cond(comfyui, clip, text):
    with torch.inference_mode():
        (cond,) = comfyui.nodes.CLIPTextEncode().encode(clip, text)
    return cond[0][0], cond[0][1].get("pooled_output")


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    if a[1] is not None:
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_in_memory_embedding_equals_the_file_route(comfyui, family):
    embed = comfyui.mod("nodes.comfy_embed")
    emb = _embedding(comfyui, family.clip, f"probefile-{family.name}")
    _save(comfyui, emb)
    clip = embed.clip_with_embedding(family.clip, emb, trigger="probemem")
    file_route = _cond(comfyui, family.clip, f"a photo of embedding:{emb.name}, on the grass")
    memory = _cond(comfyui, clip, "a photo of embedding:probemem, on the grass")
    bare = _cond(comfyui, clip, "a photo of probemem, on the grass")
    plain = _cond(comfyui, family.clip, "a photo of on the grass")
    _assert_same(memory, file_route)
    _assert_same(bare, file_route)
    assert (file_route[0] - plain[0]).abs().max() > 1e-4  # the embedding changes the conditioning


def test_strength_is_a_prompt_weight_on_the_embedding(comfyui, sd15):
    embed = comfyui.mod("nodes.comfy_embed")
    emb = _embedding(comfyui, sd15.clip, "probeweight", seed=1)
    _save(comfyui, emb)
    clip = embed.clip_with_embedding(sd15.clip, emb, trigger="probew", strength=1.3)
    _assert_same(_cond(comfyui, clip, "a photo of probew"),
                 _cond(comfyui, sd15.clip, "a photo of (embedding:probeweight:1.3)"))
    plain_weight = _cond(comfyui, embed.clip_with_embedding(sd15.clip, emb, trigger="probew"), "a photo of probew")
    assert (plain_weight[0] - _cond(comfyui, clip, "a photo of probew")[0]).abs().max() > 1e-5


def test_embeddings_chain_and_leave_the_source_clip_alone(comfyui, sdxl):
    embed = comfyui.mod("nodes.comfy_embed")
    e1, e2 = _embedding(comfyui, sdxl.clip, "probeone", k=1, seed=2), _embedding(comfyui, sdxl.clip, "probetwo", k=3, seed=3)
    _save(comfyui, e1)
    _save(comfyui, e2)
    clip = embed.clip_with_embedding(embed.clip_with_embedding(sdxl.clip, e1, "xqone"), e2, "xqtwo")
    _assert_same(_cond(comfyui, clip, "xqone next to xqtwo"),
                 _cond(comfyui, sdxl.clip, "embedding:probeone next to embedding:probetwo"))
    # The source CLIP's tokenizer is untouched: the trigger is plain text there.
    assert not hasattr(sdxl.clip.tokenizer.clip_l, "_inversion_triggers")
    _assert_same(_cond(comfyui, sdxl.clip, "xqone next to xqtwo"),
                 _cond(comfyui, embed.clip_with_embedding(sdxl.clip, e1, "xqunused"), "xqone next to xqtwo"))


def test_bad_wiring_gets_an_actionable_message(comfyui, sd15, sdxl, sd2):
    embed = comfyui.mod("nodes.comfy_embed")
    xl = _embedding(comfyui, sdxl.clip, "xlconcept")
    with pytest.raises(ValueError, match=r"learned for SDXL \(clip_l, clip_g\) but this CLIP is SD1.x"):
        embed.clip_with_embedding(sd15.clip, xl)
    sd1 = _embedding(comfyui, sd15.clip, "sdoneconcept")
    with pytest.raises(ValueError, match=r"learned for SD1.x .* this CLIP is SD2.x"):
        embed.clip_with_embedding(sd2.clip, sd1)
    narrow = comfyui.mod("inversion.embedding").LearnedEmbedding("narrow", {"clip_l": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="clip_l has 32 but the CLIP expects 768"):
        embed.clip_with_embedding(sd15.clip, narrow)
    with pytest.raises(ValueError, match="trigger word 'cat' is already a word CLIP knows"):
        embed.clip_with_embedding(sd15.clip, sd1, trigger="cat")
    with pytest.raises(ValueError, match="not usable"):
        embed.clip_with_embedding(sd15.clip, sd1, trigger="two words")
