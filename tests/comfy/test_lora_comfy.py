"""Pivotal tuning's LoRA on a real ComfyUI MODEL (issue 25): ComfyUI's own training adapters train beside the
vectors, the kohya file loads in ComfyUI's LoRA loader with every key used and reproduces the trained UNet,
and the MODEL the graph holds is never changed."""

from __future__ import annotations

import logging
from pathlib import Path

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


# ---------------------------------------------------------------- the nodes: LoRA Options on Train Textual Inversion

def _nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}


def _lora_spec(comfyui, **widgets):
    from devtools import harness

    node = _nodes(comfyui)["LoraOptionsNode"]
    defaults = {i.id: i.default for i in node.define_schema().inputs}
    return harness.run_node(node, **{**defaults, **widgets}).args[0]


def _train_pair(comfyui, sd2, name, *, steps=4, if_exists="overwrite", lora=None, seed=3):
    from devtools import harness

    nodes = _nodes(comfyui)
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return harness.run_node(nodes["TrainTextualInversion"], **harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=images, init=init, name=name, method="vanilla",
        steps=steps, batch_size=1, learning_rate=0.0, seed=seed, if_exists=if_exists,
        lora=lora if lora is not None else _lora_spec(comfyui, rank=2, alpha=2.0, learning_rate=2e-2)))


def _eps(comfyui, model, clip, vectors):
    ch = comfyui.mod("nodes.comfy_host")
    with torch.inference_mode(), ch.training_host(model, clip) as host:
        return _probe(comfyui, host, vectors)


def test_lora_options_make_the_spec_the_trainer_reads(comfyui):
    spec = _lora_spec(comfyui, rank=8, alpha=4.0, learning_rate=1e-3, start=0.25, blocks="mid + up",
                      layers="attention + feed-forward")
    assert (spec.rank, spec.alpha, spec.lr, spec.start) == (8, 4.0, 1e-3, 0.25)
    assert spec.blocks == ("middle_block.", "output_blocks.") and "ff.net.2" in spec.targets


def test_the_trainer_writes_the_pair_and_outputs_the_model_with_the_lora(comfyui, sd2, caplog):
    import comfy.sd

    lora_file = comfyui.mod("nodes.lora_nodes").lora_path("toy-pair")
    out = _train_pair(comfyui, sd2, "toy-pair")
    emb, model_out, written = out.args[0], out.args[5], out.args[6]
    assert written == str(lora_file) and lora_file.is_file()
    tensors, meta = comfyui.mod("inversion.files.lora_file").load_lora(lora_file)
    assert meta["ss_network_dim"] == "2" and meta["embedding"] == "toy-pair" and meta["steps"] == "4"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(sd2.model, sd2.clip, tensors, 1.0, 0.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    plain = _eps(comfyui, sd2.model, sd2.clip, emb.vectors)
    with_lora = _eps(comfyui, model_out, sd2.clip, emb.vectors)
    assert torch.allclose(_eps(comfyui, loaded, sd2.clip, emb.vectors), with_lora, atol=1e-5)
    assert not torch.allclose(plain, with_lora, atol=1e-4)
    assert model_out is not sd2.model


def test_without_lora_options_the_model_passes_through_and_no_lora_file_is_written(comfyui, sd2):
    from devtools import harness

    nodes = _nodes(comfyui)
    init = harness.run_node(nodes["CaptionInit"], clip=sd2.clip, mode="manual", text="a toy")[0]
    out = harness.run_node(nodes["TrainTextualInversion"], **harness.train_inputs(
        model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=torch.rand(2, 64, 64, 3), init=init, name="toy-alone",
        method="vanilla", steps=2, batch_size=1, learning_rate=0.0, seed=0, if_exists="overwrite"))
    assert out.args[5] is sd2.model and out.args[6] == ""
    assert not comfyui.mod("nodes.lora_nodes").lora_path("toy-alone").exists()


def test_an_existing_lora_file_is_never_touched_with_if_exists_error(comfyui, sd2):
    lora_file = comfyui.mod("nodes.lora_nodes").lora_path("toy-guarded")
    lora_file.write_bytes(b"someone's LoRA")
    with pytest.raises(ValueError, match="already exists \\(the LoRA of an earlier run\\).*if_exists = overwrite"):
        _train_pair(comfyui, sd2, "toy-guarded", if_exists="error")
    assert lora_file.read_bytes() == b"someone's LoRA"
    assert not (Path(comfyui.embeddings_dir) / "toy-guarded.safetensors").exists()


def test_cancel_then_resume_gives_the_uninterrupted_vectors_and_lora(comfyui, sd2, monkeypatch):
    import comfy.model_management
    from devtools import harness

    lora_file = comfyui.mod("nodes.lora_nodes").lora_path("toy-resumed")
    load_lora = comfyui.mod("inversion.files.lora_file").load_lora
    whole = _train_pair(comfyui, sd2, "toy-whole", steps=4, seed=5)
    with pytest.MonkeyPatch.context() as mp:
        harness.cancel_at_step(mp, 2)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train_pair(comfyui, sd2, "toy-resumed", steps=4, seed=5)
    assert not lora_file.exists()  # a cancelled run writes no LoRA file; its state keeps the LoRA
    done = _train_pair(comfyui, sd2, "toy-resumed", steps=4, seed=5, if_exists="resume")
    torch.testing.assert_close(done.args[0].vectors["clip_h"], whole.args[0].vectors["clip_h"])
    a, _ = load_lora(lora_file)
    b, _ = load_lora(comfyui.mod("nodes.lora_nodes").lora_path("toy-whole"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the pair's files: Save / Load LoRA + Embedding

def _cond(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=False).clone()


@pytest.mark.parametrize("layout", ["A1111 bundle (one LoRA file)", "two files (every UI)"])
def test_the_saved_pair_loads_back_as_the_trained_model_and_word(comfyui, sd2, caplog, layout):
    import comfy.sd
    from devtools import harness

    nodes = _nodes(comfyui)
    out = _train_pair(comfyui, sd2, "toypair")
    emb, model_out, lora_file = out.args[0], out.args[5], out.args[6]
    name = "toypair_b" if layout.startswith("A1111") else "toypair_two"
    saved = harness.run_node(nodes["SaveLoraEmbedding"], lora_path=lora_file, embedding=emb, name=name,
                             layout=layout, overwrite=False)
    written = Path(saved.args[0])
    assert written.name == f"{name}.safetensors" and written.is_file()
    tensors, _ = comfyui.mod("inversion.files.safefile").read_safetensors(written)
    bundled = [k for k in tensors if k.startswith("bundle_emb.")]
    assert bundled == (["bundle_emb.toypair.string_to_param.*"] if layout.startswith("A1111") else [])
    if bundled:
        comfyui.mod("inversion.files.bundle").a1111_bundle_words(tensors)
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # what ComfyUI's own LoraLoader makes of a bundle
            comfy.sd.load_lora_for_models(sd2.model, sd2.clip, tensors, 1.0, 1.0)
        assert any("bundle_emb" in r.getMessage() for r in caplog.records)
    else:
        assert saved.args[1] == str(Path(comfyui.embeddings_dir) / f"{name}.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = harness.run_node(nodes["LoadLoraEmbedding"], model=sd2.model, clip=sd2.clip,
                                  lora_name=written.name, strength_model=1.0, strength_clip=1.0,
                                  embedding="auto", embedding_strength=1.0)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    model, clip, triggers = loaded.args
    word = "toypair" if bundled else name
    assert triggers == word
    applied = harness.run_node(nodes["ApplyLearnedEmbedding"], clip=sd2.clip, embedding=emb, trigger=word,
                               strength=1.0).args[0]
    torch.testing.assert_close(_cond(clip, f"a photo of {word}"), _cond(applied, f"a photo of {word}"))
    assert not torch.allclose(_cond(clip, f"a photo of {word}"), _cond(sd2.clip, f"a photo of {word}"))
    assert torch.allclose(_eps(comfyui, model, sd2.clip, emb.vectors), _eps(comfyui, model_out, sd2.clip, emb.vectors),
                          atol=1e-5)


def test_a_bundle_of_two_concepts_gives_two_words_and_nothing_is_overwritten(comfyui, sd2):
    from devtools import harness

    nodes = _nodes(comfyui)
    out = _train_pair(comfyui, sd2, "toyone")
    other = comfyui.mod("inversion.embedding").LearnedEmbedding(
        "toytwo", {"clip_h": torch.randn(2, out.args[0].vectors["clip_h"].shape[1])})
    other_file = comfyui.mod("inversion.files.formats").save_embedding(
        other, Path(comfyui.embeddings_dir) / "toytwo.safetensors", overwrite=True)
    save = dict(lora_path=out.args[6], embedding=out.args[0], name="toyboth", layout="A1111 bundle (one LoRA file)",
                overwrite=False, paths=f"{out.args[2]}\n{other_file}")
    written = Path(harness.run_node(nodes["SaveLoraEmbedding"], **save).args[0])
    before = written.read_bytes()
    with pytest.raises(ValueError, match="exists; nothing was written"):
        harness.run_node(nodes["SaveLoraEmbedding"], **save)
    assert written.read_bytes() == before
    loaded = harness.run_node(nodes["LoadLoraEmbedding"], model=sd2.model, clip=sd2.clip, lora_name=written.name,
                              strength_model=1.0, strength_clip=0.0, embedding="auto", embedding_strength=1.0)
    assert loaded.args[2] == "toyone, toytwo"
    clip = loaded.args[1]
    assert not torch.allclose(_cond(clip, "a photo of toyone"), _cond(clip, "a photo of toytwo"))
    with pytest.raises(ValueError, match="cannot hold a '.'"):
        harness.run_node(nodes["SaveLoraEmbedding"], **{**save, "name": "x", "embedding": other.__class__(
            "toy.v2", other.vectors)})
