"""Bad inputs through the real nodes (issue 17's probe): each is caught early, named, and shown in the UI.

Toasts are captured at ``comfy_run._send``, the one place ``warn_user`` reaches the browser. Anything
that trains uses the tiny SD2 model.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from devtools import harness

SIZE = 64


def run(comfyui, node_cls, node_id="7", **inputs):
    return harness.run_node(node_cls, node_id, **inputs)


def nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}




def _images(n=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def _train(comfyui, bundle, name, **extra):
    n = nodes(comfyui)
    init = run(comfyui, n["CaptionInit"], clip=bundle.clip, mode="manual", text="a toy")[0]
    kw = dict(model=bundle.model, clip=bundle.clip, vae=bundle.vae, images=_images(), init=init, name=name,
              method="vanilla", steps=1, batch_size=1, learning_rate=0.0, seed=3, if_exists="overwrite",
              checkpoint_every=0)
    kw.update(extra)
    return run(comfyui, n["TrainTextualInversion"], **harness.train_inputs(**kw))


def _folder(comfyui, name):
    folder = os.path.join(comfyui.folder_paths.get_input_directory(), name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def _rgba(path, opaque: bool):
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 0] = 255
    if opaque:
        a[8:24, 8:24, 3] = 255
    Image.fromarray(a, "RGBA").save(path)


@pytest.mark.parametrize("alpha_as_mask", [True, False])
def test_skipped_files_are_one_toast_that_names_them(comfyui, toasts, alpha_as_mask):
    folder = _folder(comfyui, f"bad-inputs-{alpha_as_mask}")
    _rgba(os.path.join(folder, "a_ok.png"), opaque=True)
    _rgba(os.path.join(folder, "b_clear.png"), opaque=False)
    with open(os.path.join(folder, "c_broken.jpg"), "wb") as f:
        f.write(b"not an image")
    gradient = np.broadcast_to(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 32)).copy()
    Image.fromarray(gradient).save(os.path.join(folder, "d_gray16.png"))  # 16-bit grayscale
    out = run(comfyui, nodes(comfyui)["LoadConceptImages"], node_id="9", folder=os.path.basename(folder),
              size=SIZE, fit="crop", alpha_as_mask=alpha_as_mask)
    images, masks, count, _dataset = out.args
    assert count == 2 and images.shape == (2, SIZE, SIZE, 3) and masks.shape == (2, SIZE, SIZE)
    gray = images[1]  # d_gray16.png: a dark-to-light ramp, not white
    assert gray[:, :4].mean() < 0.1 and gray[:, -4:].mean() > 0.9
    torch.testing.assert_close(gray[..., 0], gray[..., 2])
    assert len(toasts) == 1
    event, payload = toasts[0]
    assert event == comfyui.mod("nodes.comfy_run").WARNING_EVENT and payload["node"] == "9"
    message = payload["message"]
    assert "skipped 2 file(s)" in message and "b_clear.png: fully transparent" in message
    assert "c_broken.jpg: unreadable" in message
    assert out.ui["text"][0] == "loaded 2 image(s)" and "b_clear.png" in out.ui["text"][1]


def test_a_folder_of_only_bad_files_says_why(comfyui, toasts):
    folder = _folder(comfyui, "bad-inputs-none")
    _rgba(os.path.join(folder, "clear.png"), opaque=False)
    with pytest.raises(ValueError, match=r"no readable images in folder .*every image was skipped: "
                                         r"clear.png: fully transparent"):
        run(comfyui, nodes(comfyui)["LoadConceptImages"], folder=folder, size=SIZE, fit="crop", alpha_as_mask=False)


def test_a_clean_folder_sends_no_toast(comfyui, toasts):
    folder = _folder(comfyui, "bad-inputs-clean")
    _rgba(os.path.join(folder, "a_ok.png"), opaque=True)
    out = run(comfyui, nodes(comfyui)["LoadConceptImages"], folder=folder, size=SIZE, fit="pad", alpha_as_mask=True)
    assert out.args[2] == 1 and toasts == [] and out.ui["text"] == ["loaded 1 image(s)"]


def test_empty_mask_names_the_image_before_training(comfyui, sd2, toasts):
    masks = torch.ones(2, SIZE, SIZE)
    masks[1] = 0  # e.g. the MASK of Load Image for an opaque picture (1 = transparent there)
    with pytest.raises(ValueError, match=r"mask of image 2 of 2 is empty.*Invert Mask"):
        _train(comfyui, sd2, "bad-inputs-mask", masks=masks)
    assert toasts == []  # no progress event: it stopped before the first step
    assert not os.path.exists(os.path.join(comfyui.embeddings_dir, "bad-inputs-mask.safetensors"))


def test_custom_template_with_other_braces_fails_before_training(comfyui, sd2, toasts):
    with pytest.raises(ValueError, match="custom_templates") as e:
        _train(comfyui, sd2, "bad-inputs-template", templates="custom", custom_templates="a photo of {}\n{} in {style}")
    assert "'{} in {style}'" in str(e.value) and "'{style}'" in str(e.value) and "write '{} in style'" in str(e.value)
    assert toasts == []
    assert not os.path.exists(os.path.join(comfyui.embeddings_dir, "bad-inputs-template.safetensors"))
    ok = _train(comfyui, sd2, "bad-inputs-braces", templates="custom", custom_templates="{{literal}} photo of {}")
    assert ok.args[0].name == "bad-inputs-braces"


def test_renamed_copies_load_as_two_words(comfyui, sd2):
    formats = comfyui.mod("inversion.files.formats")
    LearnedEmbedding = comfyui.mod("inversion.embedding").LearnedEmbedding
    n = nodes(comfyui)
    g = torch.Generator().manual_seed(0)
    first = LearnedEmbedding("xqtoy", {"clip_h": torch.randn(2, 48, generator=g)})
    retrained = LearnedEmbedding("xqtoy", {"clip_h": torch.randn(2, 48, generator=g)})
    sub = os.path.join(comfyui.embeddings_dir, "bad-inputs-sub")
    os.makedirs(sub, exist_ok=True)
    formats.save_embedding(first, os.path.join(sub, "xqtoya.safetensors"), overwrite=True)
    formats.save_embedding(retrained, os.path.join(comfyui.embeddings_dir, "xqtoy.safetensors"), overwrite=True)
    shutil.copy(os.path.join(comfyui.embeddings_dir, "xqtoy.safetensors"),
                os.path.join(comfyui.embeddings_dir, "xqtoyb.safetensors"))  # renamed copy: header still says xqtoy
    a = run(comfyui, n["LoadEmbedding"], file="bad-inputs-sub/xqtoya.safetensors").args[0]
    b = run(comfyui, n["LoadEmbedding"], file="xqtoyb.safetensors").args[0]
    assert (a.name, b.name) == ("xqtoya", "xqtoyb") and b.metadata["stored_name"] == "xqtoy"

    def encode(clip, text):
        with torch.inference_mode():
            return comfyui.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]

    apply = n["ApplyLearnedEmbedding"]
    clip_a, word_a = run(comfyui, apply, clip=sd2.clip, embedding=a, trigger="", strength=1.0).args
    clip_ab, word_b = run(comfyui, apply, clip=clip_a, embedding=b, trigger="", strength=1.0).args
    assert (word_a, word_b) == ("xqtoya", "xqtoyb")
    with_a, with_b = encode(clip_ab, "a photo of xqtoya"), encode(clip_ab, "a photo of xqtoyb")
    assert (with_a - with_b).abs().max() > 1e-4
    torch.testing.assert_close(with_a, encode(clip_a, "a photo of xqtoya"), rtol=0, atol=0)
    torch.testing.assert_close(with_b, encode(sd2.clip, "a photo of embedding:xqtoyb"), rtol=0, atol=0)
