"""Shared fixtures: tiny real-architecture models built on the CPU with random weights."""

from __future__ import annotations

import pytest
import torch

# pytest's pythonpath (pyproject.toml) puts the repository root (inversion, devtools) and tests/
# (this folder's helper modules: tiny_models, vl_models, open_clip_env) on sys.path.
from tiny_models import TinyWorld, make_tiny


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
