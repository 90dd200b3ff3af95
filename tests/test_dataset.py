"""inversion.data.dataset: reading and fitting concept images (no ComfyUI needed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from inversion.data import dataset


def _save_rgb(path, h, w, left=(255, 0, 0), right=(0, 0, 255), orientation=None):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    im = Image.fromarray(a)
    if orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("mode", dataset.SQUARE_MODES)
def test_fit_gives_the_size_and_keeps_content(mode):
    img = torch.zeros(3, 30, 60)
    img[0, :, :30] = 1.0  # left half red
    out, mask = dataset.fit(img, 32, mode)
    assert out.shape == (3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert out[0, 16, 2] > 0.9 and out[0, 16, 29] < 0.1  # red stays on the left
    if mode == "pad":  # white borders above and below, excluded by the mask
        assert mask.shape == (32, 32) and mask[0, 16] == 0 and mask[16, 16] == 1
        assert out[:, 0, 16].min() > 0.99
    else:
        assert mask is None


def test_fit_resizes_a_mask_with_its_image():
    img = torch.rand(3, 40, 40)
    m = torch.zeros(40, 40)
    m[10:30, 10:30] = 1
    _, mask = dataset.fit(img, 20, "crop", m)
    assert mask.shape == (20, 20) and mask[10, 10] == 1 and mask[0, 0] == 0
    with pytest.raises(ValueError, match="fit must be one of crop, pad, stretch"):
        dataset.fit(img, 20, "zoom")


def test_fit_batch_checks_mask_count():
    imgs = torch.rand(3, 3, 16, 16)
    out, masks = dataset.fit_batch(imgs, 8, "stretch", torch.ones(16, 16))
    assert out.shape == (3, 3, 8, 8) and masks.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="got 2 masks for 3 images"):
        dataset.fit_batch(imgs, 8, "crop", torch.ones(2, 16, 16))


def test_folder_exif_alpha_and_unreadable_files(tmp_path, caplog):
    _save_rgb(tmp_path / "a.jpg", 20, 40, orientation=6)  # displayed rotated 90 deg clockwise
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[4:12, 4:12, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"broken")
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        ci = dataset.load_concept_folder(tmp_path, 16, "crop", alpha_as_mask=True)
    assert "c.png" in caplog.text
    assert ci.names == ["a.jpg", "b.png"] and ci.images.shape == (2, 3, 16, 16)
    assert ci.images[0, 0, :5].mean() > 0.8 and ci.images[0, 2, -5:].mean() > 0.8  # red on top after EXIF
    assert ci.masks[0].min() == 1 and ci.masks[1, 8, 8] == 1 and ci.masks[1, 0, 0] == 0
    assert ci.images[1, :, 0, 0].min() > 0.99  # transparent pixels composited on white
    no_alpha = dataset.load_concept_folder(tmp_path, 16, "crop", alpha_as_mask=False)
    assert no_alpha.masks is None


def test_empty_or_missing_folder_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ValueError, match="no readable images in folder"):
        dataset.load_concept_folder(tmp_path, 16)
    with pytest.raises(ValueError, match="does not exist"):
        dataset.load_concept_folder(tmp_path / "nope", 16)


def _write_png16(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): 2 = RGB, 4 = gray + alpha."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _gradient16(h=8, w=64) -> np.ndarray:
    return np.broadcast_to(np.linspace(0, 65535, w).round().astype(np.uint16), (h, w)).copy()


def test_16bit_grayscale_png_keeps_its_values(tmp_path):
    g = _gradient16()
    Image.fromarray(g).save(tmp_path / "gray16.png")  # Pillow opens it as mode "I;16"
    rgb, alpha = dataset.read_image(tmp_path / "gray16.png")
    expected = torch.from_numpy(g.astype(np.float32) / 65535)
    assert rgb.shape == (3, 8, 64) and alpha is None
    for c in range(3):
        torch.testing.assert_close(rgb[c], expected, rtol=0, atol=1 / 255)
    big_endian = Image.frombytes("I;16B", (64, 8), g.astype(">u2").tobytes())
    big_endian.save(tmp_path / "gray16b.tif")
    torch.testing.assert_close(dataset.read_image(tmp_path / "gray16b.tif")[0][1], expected, rtol=0, atol=1 / 255)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_grayscale_uses_its_range(tmp_path, scale):
    g = np.linspace(0, 1, 32, dtype=np.float32)[None].repeat(4, 0)
    Image.fromarray(g * scale, "F").save(tmp_path / "f.tif")
    rgb, _ = dataset.read_image(tmp_path / "f.tif")
    torch.testing.assert_close(rgb, torch.from_numpy(g)[None].expand(3, -1, -1), rtol=0, atol=1 / 255)


def test_16bit_rgb_and_gray_alpha_pngs_still_load(tmp_path):
    g = _gradient16(4, 16)
    rgb16 = np.stack([g, np.zeros_like(g), 65535 - g], -1)
    _write_png16(tmp_path / "rgb16.png", rgb16, 2)
    rgb, alpha = dataset.read_image(tmp_path / "rgb16.png")
    expected = torch.from_numpy(g.astype(np.float32) / 65535)
    torch.testing.assert_close(rgb[0], expected, rtol=0, atol=1 / 255)
    torch.testing.assert_close(rgb[2], 1 - expected, rtol=0, atol=1 / 255)
    assert alpha is None and rgb[1].max() == 0
    la = np.stack([g, np.full_like(g, 65535)], -1)
    la[:, :4, 1] = 0  # the left quarter transparent
    _write_png16(tmp_path / "la16.png", la, 4)
    rgb, alpha = dataset.read_image(tmp_path / "la16.png")
    assert alpha[:, :4].max() == 0 and alpha[:, 4:].min() == 1
    assert rgb[:, :, :4].min() == 1  # transparent: white
    torch.testing.assert_close(rgb[1, :, 4:], expected[:, 4:], rtol=0, atol=1 / 255)


def _save_rgba(path, h, w, box=None):
    """Red RGBA image, transparent except ``box`` = (top, bottom, left, right) opaque."""
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 0] = 255
    if box is not None:
        t, b, left, r = box
        a[t:b, left:r, 3] = 255
    Image.fromarray(a, "RGBA").save(path)


@pytest.mark.parametrize("alpha_as_mask", [True, False])
def test_transparent_and_unreadable_images_are_skipped_with_a_reason(tmp_path, alpha_as_mask):
    _save_rgba(tmp_path / "a_ok.png", 32, 32, (8, 24, 8, 24))
    _save_rgba(tmp_path / "b_clear.png", 32, 32)  # fully transparent
    _save_rgba(tmp_path / "c_speck.png", 32, 32, (10, 12, 10, 12))  # 4 opaque pixels: nothing to learn
    _save_rgba(tmp_path / "d_edge.png", 32, 64, (0, 32, 0, 16))  # visible only where crop cuts
    (tmp_path / "e_broken.png").write_bytes(b"broken")
    ci = dataset.load_concept_folder(tmp_path, 32, "crop", alpha_as_mask=alpha_as_mask)
    assert ci.names == ["a_ok.png"] and ci.images.shape == (1, 3, 32, 32)
    reasons = dict(ci.skipped)
    assert list(reasons) == ["b_clear.png", "c_speck.png", "d_edge.png", "e_broken.png"]
    assert "fully transparent" in reasons["b_clear.png"] and "plain white image" in reasons["b_clear.png"]
    assert "fit=pad" not in reasons["b_clear.png"]
    assert "almost fully transparent: 4 pixel(s)" in reasons["c_speck.png"]
    assert "fit=pad" in reasons["d_edge.png"]
    assert reasons["e_broken.png"].startswith("unreadable")
    padded = dataset.load_concept_folder(tmp_path, 32, "pad", alpha_as_mask=alpha_as_mask)
    assert padded.names == ["a_ok.png", "d_edge.png"]  # the whole image: its visible strip stays


def test_every_image_skipped_error_says_why(tmp_path):
    _save_rgba(tmp_path / "clear.png", 16, 16)
    (tmp_path / "broken.jpg").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"no readable images in folder .*every image was skipped: "
                                         r"broken.jpg: unreadable.*; clear.png: fully transparent"):
        dataset.load_concept_folder(tmp_path, 16, alpha_as_mask=False)


# ---- captions and aspect buckets ------------------------------------------------------------


def test_captions_are_read_per_image_with_markers_and_notes(tmp_path):
    from inversion.data.prompts import caption_for

    for name in ("a", "b", "c", "d"):
        _save_rgb(tmp_path / f"{name}.png", 16, 16)
    (tmp_path / "a.txt").write_text("a photo of [name] on a table,\nred\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\ufeffsitting, {} in snow", encoding="utf-8")  # a BOM is not part of it
    (tmp_path / "c.txt").write_text("  blue background, close-up  ", encoding="utf-8")  # no marker
    (tmp_path / "orphan.txt").write_text("no image", encoding="utf-8")
    ci = dataset.load_concept_folder(tmp_path, 16)
    assert ci.captions == ["a photo of [name] on a table, red", "sitting, {} in snow",
                           "blue background, close-up", None]
    assert ci.captions_for("<toy>") == ["a photo of <toy> on a table, red", "sitting, <toy> in snow",
                                        "<toy>, blue background, close-up", None]
    assert caption_for("[name] and [name]", "<x>") == "<x> and <x>"
    assert len(ci.notes) == 2
    assert "1 caption(s) have no [name] or {} marker" in ci.notes[0] and "c.txt" in ci.notes[0]
    assert "orphan.txt" in ci.notes[1]
    assert isinstance(ci.images, torch.Tensor) and len(ci) == 4  # square modes: still one batch
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").unlink()
    assert dataset.load_concept_folder(tmp_path, 16).captions_for("<toy>") is None


def test_bucket_table_at_512_and_its_pixel_counts():
    assert dataset.buckets(512) == ((704, 384), (640, 384), (576, 448), (512, 512), (448, 576), (384, 640),
                                    (384, 704))
    for size in (64, 96, 128, 512, 768, 1024):
        table = dataset.buckets(size)
        assert (size, size) in table and len(table) >= 5
        step = dataset.bucket_step(size)
        for h, w in table:
            assert abs(h * w / size**2 - 1) <= 0.1 and 0.5 <= w / h <= 2 and h % step == 0 and w % step == 0
            assert h % 8 == 0 and w % 8 == 0


@pytest.mark.parametrize("hw, bucket", [((512, 512), (512, 512)), ((300, 400), (448, 576)), ((400, 300), (576, 448)),
                                        ((500, 1000), (384, 704)), ((100, 1000), (384, 704)), ((1000, 600), (640, 384))])
def test_bucket_choice_follows_the_aspect_ratio(hw, bucket):
    assert dataset.bucket_for(*hw, 512) == bucket
    out, mask = dataset.fit(torch.rand(3, *hw), 512, "bucket", torch.ones(hw))
    assert out.shape == (3, *bucket) and mask.shape == bucket


def test_bucket_folder_gives_per_image_tensors_and_square_modes_stay_batches(tmp_path):
    _save_rgb(tmp_path / "a.png", 64, 64)
    _save_rgb(tmp_path / "b.png", 48, 96)  # wide: red left, blue right
    _save_rgba(tmp_path / "c.png", 96, 48, (10, 80, 10, 40))
    ci = dataset.load_concept_folder(tmp_path, 64, "bucket")
    assert isinstance(ci.images, list) and ci.sizes() == [(64, 64), (48, 88), (88, 48)]
    assert [tuple(m.shape) for m in ci.masks] == ci.sizes() and ci.masks[0].min() == 1
    assert ci.images[1][0, 24, 2] > 0.9 and ci.images[1][2, 24, -3] > 0.9  # left stays left
    with pytest.raises(ValueError, match="different sizes"):
        ci.stacked()
    square = dataset.load_concept_folder(tmp_path, 64, "crop")
    assert square.images.shape == (3, 3, 64, 64) and square.stacked()[0] is square.images
    images, masks = dataset.fit_batch(torch.rand(2, 3, 30, 60), 64, "bucket")
    assert images.shape == (2, 3, 48, 88) and masks is None
