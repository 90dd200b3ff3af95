"""Shared fixtures: tiny real-architecture models built on the CPU with random weights."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):  # the library, and this folder's helper modules (tiny_models)
    if p not in sys.path:
        sys.path.insert(0, p)

from tiny_models import TinyWorld, make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def tiny(tiny_tokenizer_dir) -> TinyWorld:
    """A tiny SD1-like host: CLIPTextModel (32-d), a cross-attention denoiser, pixel latents."""
    torch.manual_seed(0)
    return make_tiny(tiny_tokenizer_dir)


@pytest.fixture()
def tiny_sdxl(tiny_tokenizer_dir) -> TinyWorld:
    """A tiny SDXL-like host: two text encoders (32-d and 48-d) concatenated, pooled from the second."""
    torch.manual_seed(0)
    return make_tiny(tiny_tokenizer_dir, dual=True)
