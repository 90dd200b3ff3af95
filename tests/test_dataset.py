"""inversion.dataset: reading and fitting concept images (no ComfyUI needed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from inversion import dataset


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


@pytest.mark.parametrize("mode", dataset.FIT_MODES)
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
