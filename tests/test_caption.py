"""Caption mode: a local captioning folder -> captions -> init text and one vector per token (seeds/001)."""

from __future__ import annotations

import pytest
import torch

from inversion.vision_language import caption as cap
from inversion.data.imageprep import crop_to_masks, mask_box
from inversion.methods.init import from_text
from vl_models import make_blip, make_blip2, make_git


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    make_blip(root / "tiny-blip")
    make_git(root / "org" / "tiny-git")  # the org/name layout of a hub download
    make_blip2(root / "tiny-blip2")
    (root / "not-a-model").mkdir()
    return root


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 56, generator=g)


def test_find_captioners_lists_supported_folders(captioners):
    found = cap.find_captioners([captioners])
    assert set(found) == {"tiny-blip", "tiny-blip2", "org/tiny-git"}


@pytest.mark.parametrize("name,arch", [("tiny-blip", "blip"), ("tiny-blip2", "blip-2"), ("org/tiny-git", "git")])
def test_caption_mode_gives_text_and_one_vector_per_token(captioners, tiny, name, arch):
    c = cap.load_captioner(name, [captioners])
    assert c.architecture == arch
    res = cap.caption_images(c, _images(3), settings=cap.CaptionSettings(max_new_tokens=5, num_beams=1))
    assert len(res.captions) == 3 and all(isinstance(t, str) and t for t in res.captions)
    assert res.text == res.captions[res.index]
    vectors = from_text(tiny.text, res.text)
    enc = tiny.encoder
    ids = enc.tokenize(res.text)
    assert vectors["clip_l"].shape == (len(ids), enc.width)
    assert torch.equal(vectors["clip_l"], enc.token_table().detach()[torch.tensor(ids)].float())


def test_no_captioner_error_lists_the_folders_searched(tmp_path):
    empty1, empty2 = tmp_path / "a", tmp_path / "b"
    empty1.mkdir()
    with pytest.raises(ValueError) as e:
        cap.load_captioner("anything", [empty1, empty2])
    msg = str(e.value)
    assert str(empty1) in msg and str(empty2) in msg and "BLIP" in msg


def test_unknown_name_lists_what_is_available(captioners):
    with pytest.raises(ValueError, match="available: org/tiny-git, tiny-blip, tiny-blip2"):
        cap.load_captioner("nope", [captioners])


def test_unsupported_architecture_is_refused(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert"}')
    assert cap.find_captioners([tmp_path]) == {}
    with pytest.raises(ValueError, match="'bert' model; captioning supports"):
        cap.load_captioner(str(d))


def test_mask_crops_the_region_of_interest():
    img = torch.zeros(3, 100, 200)
    mask = torch.zeros(100, 200)
    mask[20:40, 50:90] = 1.0  # a 20 x 40 box
    assert mask_box(mask) == (20, 50, 40, 90)
    (crop,) = crop_to_masks(img, mask, margin=0.1)
    assert tuple(crop.shape) == (3, 24, 48)  # grown by 10 % of the box per side
    (whole,) = crop_to_masks(img, torch.zeros(100, 200))  # empty mask: the whole image
    assert tuple(whole.shape) == (3, 100, 200)
    small = torch.zeros(1, 50, 100)  # another resolution: resized to the image
    small[0, 10:20, 25:45] = 1.0
    (crop2,) = crop_to_masks(img, small, margin=0.0)
    assert tuple(crop2.shape) == (3, 20, 40)


def test_mask_changes_what_the_captioner_sees(captioners, monkeypatch):
    c = cap.load_captioner("tiny-blip", [captioners])
    seen = []
    real = cap.Captioner.generate

    def spy(self, pils, settings):
        seen.append([p.size for p in pils])
        return real(self, pils, settings)

    monkeypatch.setattr(cap.Captioner, "generate", spy)
    imgs = _images(2)
    masks = torch.zeros(2, 40, 56)
    masks[0, 5:15, 10:30] = 1.0
    masks[1, 20:40, 0:8] = 1.0
    settings = cap.CaptionSettings(max_new_tokens=3, num_beams=1, margin=0.0)
    cap.caption_images(c, imgs, settings=settings)
    cap.caption_images(c, imgs, masks, settings=settings)
    assert seen[0] == [(56, 40), (56, 40)]  # PIL sizes are (width, height)
    assert seen[1] == [(20, 10), (8, 20)]


def test_consensus_picks_the_most_common_then_the_most_central():
    caps = ["a red toy car", "a blue dog", "a red toy car", "a cat"]
    assert cap.consensus_index(caps) == 0
    caps = ["a red car on a road", "a red toy car", "a toy car", "a dog"]
    assert caps[cap.consensus_index(caps)] == "a red toy car"
    res = cap.CaptionResult(caps, 1)
    assert res.choose(3).text == "a dog" and res.choose(-1).text == "a red toy car"
    with pytest.raises(ValueError, match="out of range"):
        res.choose(9)


@pytest.mark.parametrize("caption,word", [
    ("a red plush toy with eyes and legs", "toy"),
    ("a pair of sunglasses with a gold frame and brown lenses", "sunglasses"),
    ("the image shows a cat sitting on a couch", "cat"),
    ("a close up of a white sneaker", "sneaker"),
    ("a toy car with a boy in it", "car"),
    ("the elephant is carved in a natural stone", "elephant"),
    ("hershel supply co backpack", "backpack"),
])
def test_class_word_from_caption(caption, word):
    assert cap.class_word_from_caption(caption) == word


def test_clean_caption():
    assert cap.clean_caption("  A Cat  sitting on\na mat. ") == "a cat sitting on a mat"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_new_tokens"):
        cap.CaptionSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="margin"):
        cap.CaptionSettings(margin=-1)
