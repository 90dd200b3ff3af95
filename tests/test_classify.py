"""Class mode: zero-shot classification with an open_clip model loaded from a local file (seeds/001)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from inversion.vision_language import classify as cls
from open_clip_env import import_open_clip
from vl_models import make_open_clip

LABELS = ["red toy car", "tabby cat", "teapot", "golden retriever", "sneaker"]


@pytest.fixture(scope="module")
def open_clip():
    return import_open_clip()


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 36, 44, generator=g)


def _pre_projection(clip, texts):
    """The text tower's pooled features before ``text_projection`` (so a projection can be solved for)."""
    proj = clip.model.text_projection
    width = proj.shape[0]
    with torch.no_grad():
        saved = proj.data.clone()
        clip.model.text_projection = torch.nn.Parameter(torch.eye(width), requires_grad=False)
        try:
            return clip.text_features(texts)
        finally:
            clip.model.text_projection = torch.nn.Parameter(saved, requires_grad=False)


def test_shipped_imagenet_names():
    names = cls.imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet paper"


def test_parse_labels():
    assert cls.parse_labels("cat\n dog \n\n# comment\ncat") == ["cat", "dog"]
    assert cls.parse_labels("cat, dog,teapot") == ["cat", "dog", "teapot"]
    with pytest.raises(ValueError, match="label list is empty"):
        cls.parse_labels(" \n ")


@pytest.mark.parametrize("layout", ["folder", "file"])
def test_class_mode_picks_the_constructed_label(open_clip, tmp_path, layout):
    """Set the text projection so label j's embedding is image j's: each image must pick its label."""
    name = "tiny-oc" if layout == "folder" else "tiny-oc.safetensors"
    path = make_open_clip(open_clip, tmp_path / name, layout)
    clip = cls.load_open_clip(name, [tmp_path])
    images = _images(3)
    templates = ("a photo of a {}.",)
    img = clip.encode_images(images)  # [3, D], what the classifier will see
    h = _pre_projection(clip, [templates[0].format(label) for label in LABELS])  # [5, width]
    g = torch.Generator().manual_seed(1)
    targets = torch.cat([img, -img.mean(0, keepdim=True) + 0.1 * torch.randn(2, img.shape[1], generator=g)])
    proj = torch.linalg.lstsq(h.double(), targets.double()).solution.float()  # h @ proj == targets
    sd = {k: v.detach().contiguous() for k, v in clip.model.state_dict().items()}
    sd["text_projection"] = proj.contiguous()
    weights = path / "open_clip_model.safetensors" if layout == "folder" else path
    save_file(sd, str(weights))

    clip = cls.load_open_clip(name, [tmp_path])  # back through the loader users hit
    for j in range(3):
        res = cls.classify_images(clip, images[j:j + 1], LABELS, templates=templates)
        assert res.text == LABELS[j], res.top(3)
        assert abs(float(res.probs.sum()) - 1.0) < 1e-5
    res = cls.classify_images(clip, images, LABELS, templates=templates)
    assert res.per_image == [0, 1, 2]
    assert res.image_probs.shape == (3, len(LABELS))
    assert res.choose(1) == LABELS[1] and res.choose(-1) == res.text
    with pytest.raises(ValueError, match="out of range"):
        res.choose(3)


def test_mask_region_decides_the_class(open_clip, tmp_path):
    """Two objects side by side: the mask picks which one is classified."""
    make_open_clip(open_clip, tmp_path / "m", "folder")
    clip = cls.load_open_clip("m", [tmp_path])
    left, right = _images(2, seed=3)
    scene = torch.cat([left, right], dim=-1)  # [3, 36, 88]
    feats = clip.encode_images([left, right])
    m = torch.zeros(36, 88)
    m[:, 44:] = 1.0
    res = cls.classify_images(clip, scene, ["left", "right"], masks=m, features=feats, margin=0.0)
    assert res.text == "right"
    res = cls.classify_images(clip, scene, ["left", "right"], masks=1 - m, features=feats, margin=0.0)
    assert res.text == "left"


def test_loader_errors_name_the_problem(open_clip, tmp_path):
    with pytest.raises(ValueError, match="no open_clip model found; looked in"):
        cls.load_open_clip("x", [tmp_path])
    (tmp_path / "mystery.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the open_clip architecture of mystery.safetensors"):
        cls.load_open_clip("mystery.safetensors", [tmp_path])
    with pytest.raises(ValueError, match="available: mystery.safetensors"):
        cls.load_open_clip("nope", [tmp_path])


def test_architecture_from_a_builtin_name_prefix(open_clip, tmp_path):
    arch = cls._architecture(open_clip, tmp_path / "ViT-B-32-laion2b_s34b_b79k.safetensors", None)
    assert arch == "ViT-B-32"
