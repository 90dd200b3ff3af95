"""Pivotal tuning's LoRA on a real ComfyUI MODEL (issue 25): ComfyUI's own training adapters train beside the
vectors, the kohya file loads in ComfyUI's LoRA loader with every key used and reproduces the trained UNet,
and the MODEL the graph holds is never changed."""

from __future__ import annotations

import logging

import pytest
import torch


def _mods(comfyui):
    return (comfyui.mod("nodes.comfy_host"), comfyui.mod("nodes.comfy_lora"), comfyui.mod("inversion.lora"),
            comfyui.mod("inversion.trainer"), comfyui.mod("inversion.methods.init"))


def _probe(comfyui, host, embedding_vectors):
    """eps-hat of a fixed noisy latent under "a photo of a <c>" with the given vectors."""
    prompts_mod = comfyui.mod("inversion.data.prompts")
    side = host.text_side
    outs = []
    for e in side.encoders:
        b = prompts_mod.build_prompt_batch(e, ["a photo of a <c>"], {"<c>": (0, embedding_vectors[e.key].shape[0])})
        outs.append(e.encode(b.ids, b.slots, embedding_vectors[e.key]))
    cond = side.combine(outs)
    g = torch.Generator().manual_seed(7)
    x0, noise, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([450])
    with torch.no_grad():
        return host.denoiser.predict_eps(host.denoiser.add_noise(x0, noise, t), t, cond).detach().clone()


@pytest.mark.parametrize("fam", ["sd2", "sdxl"])
def test_a_lora_trained_with_the_vectors_loads_in_comfyuis_lora_loader(comfyui, request, caplog, fam):
    import comfy.sd

    bundle = request.getfixturevalue(fam)
    ch, cl, lora, tr_mod, init = _mods(comfyui)
    spec = lora.LoraSpec(rank=2, alpha=2.0, lr=2e-2)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as inside a prompt
        with ch.training_host(bundle.model, bundle.clip) as host:
            emb = init.make_embedding(host.text_side, "toy", init_word="toy", k=1)
            before = _probe(comfyui, host, emb.vectors)
        clone, group = cl.lora_clone(bundle.model, spec, steps=4, seed=0)
        assert group.paths and all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in group.paths)
        with ch.training_host(clone, bundle.clip) as host:
            concept = tr_mod.prepare_concept(ch.ComfyLatentEncoder(bundle.vae, clone), images, emb)
            tr = tr_mod.Trainer(host.text_side, host.denoiser, [concept],
                                tr_mod.TrainConfig(steps=4, batch_size=2, seed=1, lr=1e-2), groups=[group])
            infos = []
            tr.run(infos.append)
            trained_vectors = tr.embeddings()[0].vectors
            trained = _probe(comfyui, host, trained_vectors)
        assert infos[-1].groups["lora"]["delta_norm"] > 0  # the adapters trained through ComfyUI's forward
        assert all(float(d.detach().abs().max()) > 0 for d, _ in group.layers.values())  # down started at zero
        sd = group.kohya_state_dict()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded, _ = comfy.sd.load_lora_for_models(bundle.model, bundle.clip, sd, 1.0, 0.0)
        assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
        with ch.training_host(loaded, bundle.clip) as host:
            via_loader = _probe(comfyui, host, trained_vectors)
        with ch.training_host(bundle.model, bundle.clip) as host:
            untouched = _probe(comfyui, host, emb.vectors)
            plain_trained_vectors = _probe(comfyui, host, trained_vectors)
    assert torch.allclose(via_loader, trained, atol=1e-4), float((via_loader - trained).abs().max())
    assert not torch.allclose(via_loader, plain_trained_vectors, atol=1e-4)  # the LoRA changes the UNet's output
    assert torch.equal(untouched, before)  # the graph's MODEL never ran the adapters
