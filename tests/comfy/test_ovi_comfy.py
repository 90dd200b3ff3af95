"""The vision-language nodes inside a real ComfyUI (``COMFYUI_PATH``), on small ComfyUI model objects.

- OVIPrior's CLIP_VISION_OUTPUT is accepted by the stock unCLIPConditioning node, its 2-D
  ``image_embeds`` becomes the unCLIP ADM vector, and sampling an SD2.1-unCLIP-style model runs
  and is steered by it;
- example 08's negative conditioning carries its own unCLIP image embedding, the blank image's
  (seeds/004 Fig. 1), not ComfyUI's zero ADM vector; or OVI of the negative prompt;
- Build Image Stats streams a folder in batches, with a progress bar and Cancel;
- an SD1 CLIP is refused with a message that names the problem;
- CaptionInit gives one vector per token for the CLIP's text encoder (manual and caption modes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import pytest
import torch

from devtools import harness

pytestmark = pytest.mark.skipif(harness.comfyui_path() is None,
                                reason="COMFYUI_PATH is not set to a ComfyUI checkout (see DEVELOPERS.md)")

EMBED = 48  # the tiny SD2 CLIP's clip_h projection width: the joint space of this test


@pytest.fixture(scope="module")
def env(comfyui):
    """The session's ComfyUI (one boot: a second one would move models/ under the other tests' feet)."""
    env = types.SimpleNamespace(**vars(comfyui))
    env.vl, env.ovi, env.adapters = (sys.modules[f"{comfyui.pack.__name__}.nodes.{name}"]
                                     for name in ("caption_nodes", "ovi_nodes", "vision_adapters"))
    return env


def _tiny_clip_vision(tmp_path, seed=0):
    """A ComfyUI CLIP_VISION (ClipVisionModel, as CLIPVisionLoader makes it): ViT 32 px, 2 layers, 48-d projection."""
    import comfy.clip_vision

    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 32,
           "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
           "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
           "projection_dim": EMBED}
    path = tmp_path / "clip_vision_tiny.json"
    path.write_text(json.dumps(cfg))
    with torch.inference_mode():  # loaders run inside a prompt: the weights are inference tensors
        cv = comfy.clip_vision.ClipVisionModel(str(path))
        harness.randomize_(cv.model, seed)
    return cv


def _tiny_unclip(seed=0):
    """A small SD2.1-unCLIP-H-style MODEL: v-prediction UNet whose ADM input is [image embed, noise-level emb]."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cpu = torch.device("cpu")
    with torch.inference_mode():
        config = comfy.supported_models.SD21UnclipH(harness._tiny_unet(EMBED, 2 * EMBED))
        config.unet_config["num_head_channels"] = 16
        aug = {"noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
               "timestep_dim": EMBED}
        model = comfy.model_base.SD21UNCLIP(config, aug, comfy.model_base.ModelType.V_PREDICTION, device=cpu)
        harness.randomize_(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _tiny_sd1_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": harness._tiny_te(32)})
        harness.randomize_(clip.cond_stage_model, 3, text_std=0.02)
    return clip


def test_ovi_output_drives_unclip_sampling(env, tmp_path):
    import comfy.model_base

    cv = _tiny_clip_vision(tmp_path)
    _, clip, _ = harness.tiny_sd2()
    with torch.inference_mode():  # as the executor runs a node
        out = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a photo of a red car", clip=clip, steps=25)
    cvo, chart, sim, negative = out.args
    emb = cvo["image_embeds"]
    assert emb.ndim == 2 and tuple(emb.shape) == (1, EMBED)
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    assert isinstance(sim, float) and -1.0 <= sim <= 1.0
    assert negative["image_embeds"].ndim == 2 and tuple(negative["image_embeds"].shape) == (1, EMBED)

    model = _tiny_unclip()
    nodes = env.nodes
    with torch.inference_mode():
        (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a red car")
        (neg,) = nodes.CLIPTextEncode().encode(clip, "")
        (cond,) = nodes.unCLIPConditioning().apply_adm(pos, cvo, 1.0, 0.0)
        unclip = cond[0][1]["unclip_conditioning"]
        adm = comfy.model_base.unclip_adm(unclip, torch.device("cpu"), model.model.noise_augmentor)
        assert tuple(adm.shape) == (1, 2 * EMBED)  # one row per image embedding: the 2-D layout

        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        (a,) = nodes.common_ksampler(model, 7, 2, 2.0, "euler", "normal", cond, neg, latent)
        other = comfy.clip_vision.Output()
        other["image_embeds"] = -emb
        (cond2,) = nodes.unCLIPConditioning().apply_adm(pos, other, 1.0, 0.0)
        (b,) = nodes.common_ksampler(model, 7, 2, 2.0, "euler", "normal", cond2, neg, latent)
    assert torch.isfinite(a["samples"]).all()
    assert not torch.allclose(a["samples"], b["samples"])  # the image embedding steers the sample


def test_ovi_raises_similarity_inside_comfy(env, tmp_path):
    cv = _tiny_clip_vision(tmp_path, seed=1)
    _, clip, _ = harness.tiny_sd2()
    with torch.inference_mode():
        short = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a blue dog", clip=clip, steps=1)
        long = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a blue dog", clip=clip, steps=40, lr=0.1)
    assert long.args[2] > short.args[2] + 0.05


def test_ovi_refuses_an_sd1_clip(env, tmp_path):
    cv = _tiny_clip_vision(tmp_path)
    with torch.inference_mode(), pytest.raises(ValueError, match="SD1 CLIP"):
        env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a cat", clip=_tiny_sd1_clip(), steps=2)


def test_build_image_stats_then_constrained_ovi(env, tmp_path):
    cv = _tiny_clip_vision(tmp_path, seed=2)
    _, clip, _ = harness.tiny_sd2()
    images = torch.rand(4, 40, 48, 3)
    with torch.inference_mode():
        (name,) = env.ovi.BuildImageStats.execute(clip_vision=cv, name="tiny_stats", images=images).args
        assert name == "tiny_stats.safetensors"
        assert name in env.ovi._stats_names()
        with pytest.raises(FileExistsError):
            env.ovi.BuildImageStats.execute(clip_vision=cv, name="tiny_stats", images=images)
        out = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a cat", clip=clip, steps=10, image_stats=name,
                                      lambda_m=0.01, lambda_n=0.5)
    assert out.args[0]["image_embeds"].shape == (1, EMBED)

    from PIL import Image

    folder = os.path.join(env.folder_paths.get_input_directory(), "stats_images")
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        Image.fromarray((torch.rand(30, 50, 3) * 255).byte().numpy()).save(os.path.join(folder, f"{i}.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not an image")
    with torch.inference_mode():
        (name2,) = env.ovi.BuildImageStats.execute(clip_vision=cv, name="from_folder", folder="stats_images").args
    stats = harness_stats(env, name2)
    assert stats.count == 3 and stats.metadata["source"] == "stats_images"


def harness_stats(env, name):
    path = env.folder_paths.get_full_path(env.ovi.OVI_STATS, name)
    return sys.modules[env.vl.__name__.rsplit(".nodes.", 1)[0] + ".inversion.ovi"].load_image_stats(path)


def test_caption_init_manual_and_caption_modes(env, tmp_path):
    from vl_models import make_blip
    make_blip(os.path.join(env.vl.model_dirs(env.vl.CAPTIONERS)[0], "tiny-blip"))
    assert "tiny-blip" in env.vl.captioner_names()
    _, clip, _ = harness.tiny_sd2()
    with torch.inference_mode():
        init, text, word, _ = env.vl.CaptionInit.execute(clip=clip, mode="manual", text="a red toy car").args
        assert text == "a red toy car" and word == "car"
        ids = clip.tokenizer.clip_h.tokenizer("a red toy car")["input_ids"][1:-1]  # CLIP BPE: 4 words, 4 tokens
        assert len(ids) == 4 and init.vectors["clip_h"].shape == (4, 48)
        table = clip.cond_stage_model.clip_h.transformer.get_input_embeddings().weight
        assert torch.equal(init.vectors["clip_h"], table[torch.tensor(ids)].float())
        assert not init.vectors["clip_h"].is_inference()
        images = torch.rand(2, 40, 56, 3)
        init, text, word, listing = env.vl.CaptionInit.execute(clip=clip, mode="caption", text="", images=images,
                                                               captioner="tiny-blip", max_new_tokens=4).args
    assert text and listing.count("\n") == 1
    assert init.metadata["init_text"] == text and init.metadata["init"] == "caption"


def test_converted_vision_tower_matches_comfy_encoder(env, tmp_path):
    """The transformers copy OVI optimises through computes ComfyUI's own image embeddings."""
    cv = _tiny_clip_vision(tmp_path, seed=4)
    images = torch.rand(2, 40, 48, 3)
    with torch.inference_mode():
        ref = cv.encode_image(images)["image_embeds"].float()
    with torch.inference_mode(False):
        tower = env.adapters.comfy_vision_tower(cv, torch.device("cpu"), torch.float32)
        ours = tower.encode_images((images * 255).round().div(255).movedim(-1, 1))  # comfy quantises to 8 bits
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=4e-3 * float(ref.abs().max()))  # fp16 weights in ComfyUI
    assert not any(p.is_inference() for p in tower.model.parameters())


def test_caption_init_class_mode(env, tmp_path):
    from open_clip_env import import_open_clip
    from vl_models import make_open_clip
    open_clip = import_open_clip()
    make_open_clip(open_clip, os.path.join(env.vl.model_dirs(env.vl.OPEN_CLIP)[0], "tiny-oc"), "folder")
    assert "tiny-oc" in env.vl.open_clip_names()
    _, clip, _ = harness.tiny_sd2()
    labels = "red toy car\ntabby cat\nteapot"
    with torch.inference_mode():
        init, text, word, listing = env.vl.CaptionInit.execute(
            clip=clip, mode="class", text="", images=torch.rand(2, 36, 36, 3), open_clip_model="tiny-oc",
            labels=labels).args
    assert text in labels.splitlines() and word == text
    assert init.vectors["clip_h"].shape[0] == len(clip.tokenizer.clip_h.tokenizer(text)["input_ids"]) - 2
    assert listing.startswith("0: ") and "\nall: " in listing


def test_node_schemas_are_valid_with_tooltips(env):
    for node in env.vl.NODES + env.ovi.NODES:
        info = node.GET_NODE_INFO_V1()  # validates the schema as ComfyUI does when listing nodes
        assert info["name"].startswith("Inversion")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{info['name']}.{name} has no tooltip"
        assert all(n and n == n.lower() for n in info["output_name"]), info["output_name"]


def test_ovi_with_an_open_clip_text_encoder_checks_the_joint_space(env, tmp_path):
    from open_clip_env import import_open_clip
    from vl_models import OPEN_CLIP_TINY, make_open_clip
    make_open_clip(import_open_clip(), os.path.join(env.vl.model_dirs(env.vl.OPEN_CLIP)[0], "tiny-oc-text"), "folder")
    cv = _tiny_clip_vision(tmp_path)  # 48-d; the tiny open_clip model is 16-d: not the same CLIP
    assert OPEN_CLIP_TINY["embed_dim"] != EMBED
    with torch.inference_mode(), pytest.raises(ValueError, match="same CLIP"):
        env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a cat", text_encoder="tiny-oc-text", steps=2)


def _example(stem):
    """A workflow spec of tools/example_specs.py (loaded by path: ComfyUI has a ``tools`` of its own)."""
    path = os.path.join(harness.ROOT, "tools", "example_specs.py")
    spec = importlib.util.spec_from_file_location("inversion_example_specs", path)
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
    return next(w for w in mod.WORKFLOWS if w.stem == stem)


def _source(wf, key, inp):
    """(node, output name) that feeds input ``inp`` of node ``key`` in a spec."""
    (a, out), = [(a, out) for a, out, b, i in wf.links if b == key and i == inp]
    return next(n for n in wf.nodes if n.key == a), out


def test_example_08_negative_conditioning_gets_the_blank_image_embedding(env, tmp_path):
    """seeds/004 Fig. 1: the negative side needs its own image embedding (a zero one casts violet). In
    example 08 the sampler's negative is unCLIPConditioning(negative prompt, OVI Prior's negative output),
    and that entry holds f_img(0), ComfyUI's own encoder on an all-zero normalised input."""
    wf = _example("08_ovi_prior_sd21_unclip")
    unclip_neg, out = _source(wf, "sampler", "negative")
    assert (unclip_neg.type, out) == ("unCLIPConditioning", "CONDITIONING")
    text_node, _ = _source(wf, unclip_neg.key, "conditioning")
    ovi_node, ovi_out = _source(wf, unclip_neg.key, "clip_vision_output")
    assert text_node.type == "CLIPTextEncode" and (ovi_node.type, ovi_out) == ("InversionOVIPrior",
                                                                               "negative_clip_vision_output")
    widgets = unclip_neg.widgets

    cv = _tiny_clip_vision(tmp_path, seed=5)
    _, clip, _ = harness.tiny_sd2()
    model = _tiny_unclip()
    nodes = env.nodes
    with torch.inference_mode():
        names = [o.id for o in env.ovi.OVIPrior.define_schema().outputs]
        out = env.ovi.OVIPrior.execute(clip_vision=cv, prompt=ovi_node.widgets["prompt"], clip=clip, steps=3)
        negative = out.args[names.index(ovi_out)]
        (neg,) = nodes.CLIPTextEncode().encode(clip, text_node.widgets["text"])
        (cond,) = nodes.unCLIPConditioning().apply_adm(neg, negative, widgets["strength"],
                                                       widgets["noise_augmentation"])
        entries = cond[0][1]["unclip_conditioning"]
        ref = cv.model(pixel_values=torch.zeros(1, 3, cv.image_size, cv.image_size), intermediate_output=-2)[2]
        adm = model.model.encode_adm(unclip_conditioning=entries, device=torch.device("cpu"))
        zero = model.model.encode_adm(device=torch.device("cpu"))  # what the negative got before
    emb = entries[0]["clip_vision_output"].image_embeds
    assert len(entries) == 1 and emb.shape == (1, EMBED)
    torch.testing.assert_close(emb.float(), ref.float(), rtol=1e-2, atol=4e-3 * float(ref.abs().max()))
    assert not torch.equal(out.args[0]["image_embeds"], emb)  # not the prompt's embedding either
    assert zero.abs().max() == 0 and adm[:, :EMBED].abs().max() > 0


def test_ovi_negative_prompt_mode_optimises_toward_the_negative_text(env, tmp_path):
    cv = _tiny_clip_vision(tmp_path, seed=6)
    _, clip, _ = harness.tiny_sd2()
    tower_text = env.adapters.ComfyClipTextTower(clip)
    with torch.inference_mode():
        blank = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a red car", clip=clip, steps=40, lr=0.1)
        own = env.ovi.OVIPrior.execute(clip_vision=cv, prompt="a red car", clip=clip, steps=40, lr=0.1,
                                       negative=env.ovi.NEG_PROMPT, negative_prompt="a green sofa indoors")
        t_pos, t_neg = tower_text.encode_text(["a red car", "a green sofa indoors"]).split(1)
    ovi_lib = sys.modules[env.ovi.__name__.rsplit(".nodes.", 1)[0] + ".inversion.ovi"]
    with torch.inference_mode(False):
        ref = ovi_lib.optimize_visual_inversion(env.ovi.vision_tower(cv), torch.cat([t_pos, t_neg]),
                                                ovi_lib.OVISettings(steps=40, lr=0.1))
    # the negative output is OVI toward the negative text, optimised as the second row beside the prompt
    torch.testing.assert_close(own.args[3]["image_embeds"].float(), ref.embeds[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(own.args[0]["image_embeds"].float(), ref.embeds[0:1], rtol=1e-4, atol=1e-5)
    cos = lambda o, t: float(torch.cosine_similarity(o["image_embeds"].float(), t)[0])  # noqa: E731
    assert cos(own.args[3], t_neg) > cos(blank.args[3], t_neg) + 0.1  # moved toward its text
    assert own.args[3]["image_embeds"].shape == (1, EMBED)


def test_build_image_stats_streams_a_folder_in_batches_and_cancels(env, tmp_path, monkeypatch):
    """A folder is decoded batch_size images at a time (never all at once), sub-folders on request; Cancel
    stops it between batches and writes nothing."""
    import comfy.model_management
    from PIL import Image

    folder = os.path.join(env.folder_paths.get_input_directory(), "stats_stream")
    os.makedirs(os.path.join(folder, "more"), exist_ok=True)
    for i in range(5):
        sub = "more" if i >= 3 else ""
        Image.fromarray((torch.rand(30, 40, 3) * 255).byte().numpy()).save(os.path.join(folder, sub, f"{i}.png"))
    cv = _tiny_clip_vision(tmp_path, seed=7)
    seen = []
    encode = cv.encode_image
    monkeypatch.setattr(cv, "encode_image", lambda image, crop=True: seen.append(image.shape[0]) or encode(image, crop))
    with torch.inference_mode():
        flat = env.ovi.BuildImageStats.execute(clip_vision=cv, name="stream_flat", folder="stats_stream",
                                               batch_size=2).args[0]
        assert seen == [2, 1] and harness_stats(env, flat).count == 3
        seen.clear()
        deep = env.ovi.BuildImageStats.execute(clip_vision=cv, name="stream_deep", folder="stats_stream",
                                               batch_size=2, recursive=True).args[0]
        assert seen == [2, 2, 1] and harness_stats(env, deep).count == 5
        with pytest.raises(FileExistsError, match="overwrite"):  # refused before any encoding
            seen.clear()
            env.ovi.BuildImageStats.execute(clip_vision=cv, name="stream_deep", folder="stats_stream")
        assert seen == []

        def cancel_after_first(image, crop=True):
            seen.append(image.shape[0])
            comfy.model_management.interrupt_current_processing(True)
            return encode(image, crop)

        monkeypatch.setattr(cv, "encode_image", cancel_after_first)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            env.ovi.BuildImageStats.execute(clip_vision=cv, name="stream_cancelled", folder="stats_stream",
                                            batch_size=2, recursive=True)
    comfy.model_management.interrupt_current_processing(False)
    assert seen == [2] and "stream_cancelled.safetensors" not in env.ovi._stats_names()
