"""CLIP similarities of preview images (issue 14 item 2): Textual Inversion's image and text metrics.

The scorer is checked against the definitions computed by hand with the same tiny open_clip model:
S_img is the mean cosine to the concept images (1 for a preview that is the only concept image),
S_txt the cosine to the prompt with the concept omitted, image similarity on the first prompt and
text similarity on the others.
"""

from __future__ import annotations

import pytest
import torch

from inversion.vision_language import classify
from inversion.vision_language.clip_score import ClipPreviewScorer, prompt_without_concept
from open_clip_env import import_open_clip
from vl_models import make_open_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oc")
    make_open_clip(import_open_clip(), folder / "tiny", "folder")
    return classify.load_open_clip("tiny", [folder])


def _images(n, seed, size=40):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_prompt_without_concept_omits_every_marker():
    assert prompt_without_concept("a painting of {} on the beach") == "a painting of on the beach"
    assert prompt_without_concept("[name] and {} , again") == "and , again"
    assert prompt_without_concept("{}") == ""


def test_scores_follow_the_papers_definitions(clip):
    concept = _images(3, 0)
    prompts = ["a photo of {}", "a painting of {} on the beach", "[name] in the snow"]
    scorer = ClipPreviewScorer(clip, concept, prompts)
    previews = [concept[1], _images(1, 5)[0], _images(1, 6)[0]]
    got = scorer(previews)

    img = clip.encode_images(previews)  # normalised [3, D]
    ref = clip.encode_images(concept)
    txt = clip.encode_texts(["a photo of", "a painting of on the beach", "in the snow"])
    expect_image = (img @ ref.T).mean(1)  # pairwise cosine, averaged over the concept images
    expect_text = (img * txt).sum(-1)
    torch.testing.assert_close(torch.tensor(got.per_prompt_image), expect_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.per_prompt_text), expect_text, rtol=0, atol=1e-5)
    assert got.image == pytest.approx(float(expect_image[0]), abs=1e-5)  # the concept prompt's image
    assert got.text == pytest.approx(float(expect_text[1:].mean()), abs=1e-5)  # the edit prompts' images
    # a preview identical to one concept image has cosine 1 with it
    assert float(img[0] @ ref[1]) == pytest.approx(1.0, abs=1e-5)


def test_one_prompt_gives_both_scores_and_a_bare_concept_gives_no_text(clip):
    concept = _images(2, 1)
    one = ClipPreviewScorer(clip, concept, ["a photo of {}"])(list(concept[:1]))
    assert one.text == pytest.approx(one.per_prompt_text[0]) and one.text is not None
    bare = ClipPreviewScorer(clip, concept, ["{}", "a painting of {}"])([concept[0], concept[1]])
    assert bare.per_prompt_text[0] is None and bare.text == pytest.approx(bare.per_prompt_text[1])
    alone = ClipPreviewScorer(clip, concept, ["{}"])([concept[0]])
    assert alone.text is None and alone.image == pytest.approx(alone.per_prompt_image[0])


def test_masks_crop_the_concept_images_and_sizes_may_differ(clip):
    big, small = torch.rand(3, 64, 48), torch.rand(3, 40, 40)
    mask = torch.zeros(64, 48)
    mask[8:30, 10:40] = 1
    scorer = ClipPreviewScorer(clip, [big, small], ["a photo of {}"], masks=[mask, torch.ones(40, 40)])
    crops = classify.crop_to_masks([big], mask[None]) + [small]
    expected = torch.cat([clip.encode_images([c]) for c in crops])
    torch.testing.assert_close(scorer.reference, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(scorer.reference[0], clip.encode_images([big])[0], atol=1e-3)  # the crop mattered


def test_mismatches_are_refused_with_what_to_give(clip):
    concept = _images(2, 2)
    with pytest.raises(ValueError, match="1 preview images for 2 prompts; give one image per prompt"):
        ClipPreviewScorer(clip, concept, ["{}", "a {}"])([concept[0]])
    with pytest.raises(ValueError, match="1 masks for 2 concept images"):
        ClipPreviewScorer(clip, concept, ["{}"], masks=[torch.ones(40, 40)])
    with pytest.raises(ValueError, match="at least one preview prompt"):
        ClipPreviewScorer(clip, concept, [])
