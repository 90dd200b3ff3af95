"""OVI (seeds/004): pseudo-tokens through a CLIP vision tower, optimised toward a text embedding."""

from __future__ import annotations

import pytest
import torch

from inversion import ovi
from inversion.data.imageprep import clip_preprocess
from vl_models import make_clip_towers


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    vdir, tdir = make_clip_towers(tmp_path_factory.mktemp("clip"))
    return ovi.load_hf_vision_tower(vdir), ovi.load_hf_text_tower(tdir)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 40, 48, generator=g)


def test_pseudo_tokens_are_patch_embeddings(towers):
    """All patches of a real image fed as pseudo-tokens reproduce the model's own image embedding."""
    vision, _ = towers
    px = clip_preprocess(_images(2), vision.image_size, vision.mean, vision.std)
    patches = vision.model.vision_model.embeddings.patch_embedding(px).flatten(2).transpose(1, 2)
    assert patches.shape[1] == vision.max_tokens
    torch.testing.assert_close(vision.embed_tokens(patches), vision.encode_images(_images(2)))


def test_ovi_raises_cosine_similarity_to_the_text(towers):
    vision, text = towers
    t = text.encode_text(["a photo of a red toy car"])
    assert t.shape == (1, vision.embed_dim)
    seen = []
    res = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=40), callback=seen.append)
    s = res.similarity[:, 0]
    assert res.embeds.shape == (1, vision.embed_dim) and res.embeds.ndim == 2
    assert s.shape == (41,) and len(seen) == 40 and seen[-1].step == seen[-1].total == 40 and 0 <= seen[-1].similarity <= 1
    q = len(s) // 4
    # monotone in expectation: each quarter's mean above the previous one's
    means = [float(s[i * q:(i + 1) * q].mean()) for i in range(4)]
    assert means == sorted(means) and s[-1] > s[0] + 0.1, means
    # the returned embedding is what the tower makes of the returned tokens
    torch.testing.assert_close(res.embeds, vision.embed_tokens(res.tokens))
    assert torch.isclose(torch.cosine_similarity(res.embeds, t)[0], s[-1], atol=1e-5)


def test_more_pseudo_tokens_reach_higher_similarity(towers):
    vision, text = towers
    t = text.encode_text(["a photo of a blue dog"])
    one = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(num_tokens=1, steps=40, lr=0.1))
    many = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(num_tokens=8, steps=40, lr=0.1))
    assert many.similarity[-1, 0] > one.similarity[-1, 0]


def test_several_targets_are_optimised_independently(towers):
    vision, text = towers
    t = text.encode_text(["a red car", "a small cat"])
    both = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=20))
    assert both.embeds.shape == (2, vision.embed_dim) and both.similarity.shape == (21, 2)


def test_mahalanobis_term_pulls_toward_the_mean(towers):
    vision, text = towers
    stats = ovi.build_image_stats(vision, _images(12, seed=1))
    t = text.encode_text(["a photo of a red toy car"])
    free = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=40))
    held = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=40, lambda_m=0.05), stats)
    assert stats.mahalanobis(held.embeds) < 0.5 * stats.mahalanobis(free.embeds)
    assert torch.dist(held.embeds[0], stats.mean) < torch.dist(free.embeds[0], stats.mean)
    assert held.similarity[-1, 0] < free.similarity[-1, 0]  # the constraint costs text similarity


def test_nearest_neighbour_term_pulls_toward_a_bank_entry(towers):
    vision, text = towers
    stats = ovi.build_image_stats(vision, _images(6, seed=2))
    t = text.encode_text(["a photo of a blue dog"])
    free = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=40))
    held = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=40, lambda_n=5.0), stats)

    def nearest(z):
        return float(torch.cosine_similarity(z, stats.bank).max())

    assert nearest(held.embeds) > nearest(free.embeds)
    assert float(ovi.nearest_neighbour_loss(held.embeds, stats.bank)) < 0.5 * float(
        ovi.nearest_neighbour_loss(free.embeds, stats.bank))


def test_ledoit_wolf_is_invertible_with_few_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g)  # 4 samples in 32-d: the sample covariance is singular
    sigma, delta = ovi.ledoit_wolf(x)
    assert 0.0 < delta <= 1.0
    assert torch.linalg.eigvalsh(sigma.double()).min() > 0
    many = torch.randn(4000, 8, generator=g) * torch.tensor([1, 1, 1, 1, 2, 2, 3, 3.0])
    sigma, delta = ovi.ledoit_wolf(many)  # plenty of data: little shrinkage, close to the truth
    assert delta < 0.05
    torch.testing.assert_close(torch.diagonal(sigma), torch.tensor([1, 1, 1, 1, 4, 4, 9, 9.0]), rtol=0.1, atol=0.1)


def test_mahalanobis_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    stats = ovi.stats_from_embeddings(torch.randn(50, 6, generator=g), shrinkage=0.2)
    z = torch.randn(3, 6, generator=g)
    d = z - stats.mean
    expect = torch.einsum("nd,de,ne->n", d.double(), torch.linalg.inv(stats.covariance.double()), d.double())
    torch.testing.assert_close(stats.mahalanobis(z).double(), expect, rtol=1e-4, atol=1e-4)


def test_stats_round_trip_through_safetensors(towers, tmp_path):
    vision, _ = towers
    stats = ovi.build_image_stats(vision, _images(5), batch_size=2, metadata={"source": "unit test"})
    assert stats.count == 5 and stats.bank.shape == (5, vision.embed_dim)
    path = ovi.save_image_stats(stats, tmp_path / "stats.safetensors")
    back = ovi.load_image_stats(path)
    torch.testing.assert_close(back.mean, stats.mean)
    torch.testing.assert_close(back.covariance, stats.covariance)
    torch.testing.assert_close(back.bank, stats.bank)
    assert back.shrinkage == pytest.approx(stats.shrinkage) and back.metadata["source"] == "unit test"
    with pytest.raises(FileExistsError):
        ovi.save_image_stats(stats, path)


def test_errors_name_the_input(towers):
    vision, _ = towers
    with pytest.raises(ValueError, match="same CLIP"):
        ovi.optimize_visual_inversion(vision, torch.randn(1, vision.embed_dim + 1))
    with pytest.raises(ValueError, match="need image statistics"):
        ovi.optimize_visual_inversion(vision, torch.randn(vision.embed_dim), ovi.OVISettings(lambda_m=0.01))
    with pytest.raises(ValueError, match="patch positions"):
        ovi.optimize_visual_inversion(vision, torch.randn(vision.embed_dim),
                                      ovi.OVISettings(num_tokens=vision.max_tokens + 1))
    with pytest.raises(ValueError, match="at least 2"):
        ovi.stats_from_embeddings(torch.randn(1, 4))
    with pytest.raises(ValueError, match="num_tokens"):
        ovi.OVISettings(num_tokens=0)


def test_runs_from_an_inference_mode_context(towers):
    """A UI executor (ComfyUI) calls nodes under torch.inference_mode(); OVI still optimises."""
    vision, text = towers
    stats = ovi.build_image_stats(vision, _images(4, seed=5))
    with torch.inference_mode():
        t = text.encode_text(["a red car"])
        stats.mahalanobis(t)  # caches the Cholesky factor as an inference tensor
        res = ovi.optimize_visual_inversion(vision, t, ovi.OVISettings(steps=5, lambda_m=0.01, lambda_n=0.1), stats)
    assert res.similarity.shape == (6, 1) and torch.isfinite(res.embeds).all()


def _reference_ledoit_wolf(x):
    """The estimator written out in one pass over all rows (the pre-chunking formula)."""
    x = x.double()
    m, d = x.shape
    xc = x - x.mean(0, keepdim=True)
    s = xc.T @ xc / m
    mu = float(torch.trace(s)) / d
    d2 = float((s - mu * torch.eye(d, dtype=s.dtype)).pow(2).sum())
    sq = xc.pow(2).sum(1)
    b2 = float((sq.pow(2) - 2 * ((xc @ s) * xc).sum(1) + s.pow(2).sum()).sum()) / m ** 2
    delta = min(max(b2, 0.0), d2) / d2
    return ((1 - delta) * s + delta * mu * torch.eye(d, dtype=s.dtype)).float(), delta


def test_ledoit_wolf_in_chunks_equals_one_pass():
    """A large bank is summed a chunk of rows at a time; the estimate does not depend on the chunking."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g) * torch.linspace(0.5, 3, 7) + 2.0
    ref, ref_delta = _reference_ledoit_wolf(x)
    for chunk in (1, 7, 50, 4096):
        sigma, delta = ovi.ledoit_wolf(x, chunk=chunk)
        assert delta == pytest.approx(ref_delta, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(sigma, ref)


def test_blank_image_embedding_is_the_encoder_on_a_zero_input(towers):
    """seeds/004 Fig. 1's fix (the ECLIPSE default): the negative embedding is f_img(0), the encoder's own
    output for an all-zero normalised input, not a zero vector."""
    vision, _ = towers
    z = ovi.blank_image_embedding(vision)
    ref = vision.model(pixel_values=torch.zeros(1, 3, vision.image_size, vision.image_size)).image_embeds
    assert z.shape == (1, vision.embed_dim)
    torch.testing.assert_close(z, ref.float())
    assert z.norm() > 0
    # the same as an image filled with CLIP's mean colour, through the ordinary preprocessing
    mean_colour = torch.tensor(vision.mean).view(1, 3, 1, 1).expand(1, 3, 40, 48)
    torch.testing.assert_close(vision.encode_images(mean_colour), z)
    with pytest.raises(ValueError, match="normalised pixels"):
        vision.encode_pixels(torch.zeros(1, 3, vision.image_size + 1, vision.image_size))


def test_image_folder_is_streamed_in_batches(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    rng = torch.Generator().manual_seed(0)
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/d.webp", ".hidden/e.png", "f.png"):
        pixels = (torch.rand(30 + len(name), 50, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("not an image either")
    flat = ovi.image_files(tmp_path)
    deep = ovi.image_files(tmp_path, recursive=True)
    assert [p.name for p in flat] == ["a.png", "b.jpg", "broken.png", "f.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == ["a.png", "b.jpg", "broken.png", "f.png",
                                                                  "sub/c.png", "sub/d.webp"]
    skipped = []
    batches = list(ovi.image_batches(deep, 24, batch_size=2, on_skip=lambda p, why: skipped.append(p.name)))
    assert [b.shape for b, _ in batches] == [(2, 3, 24, 24)] * 2 + [(1, 3, 24, 24)]
    assert [p.name for _, files in batches for p in files] == ["a.png", "b.jpg", "f.png", "c.png", "d.webp"]
    assert skipped == ["broken.png"]
    assert all(0 <= float(b.min()) and float(b.max()) <= 1 for b, _ in batches)
    with pytest.raises(ValueError, match="does not exist"):
        ovi.image_files(tmp_path / "missing")


def test_stats_from_a_lazy_stream_equal_stats_from_a_batch(towers, tmp_path):
    """build_image_stats takes an iterable of batches (a folder read lazily) and gets the same statistics."""
    vision, _ = towers
    imgs = _images(5, seed=2)
    whole = ovi.build_image_stats(vision, imgs)
    streamed = ovi.build_image_stats(vision, (imgs[i:i + 2] for i in range(0, 5, 2)))
    torch.testing.assert_close(streamed.bank, whole.bank)
    torch.testing.assert_close(streamed.covariance, whole.covariance)
