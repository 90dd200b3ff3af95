"""Shared fixtures: tiny real-architecture models built on the CPU with random weights."""

from __future__ import annotations

import os

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


def pytest_report_header(config) -> list[str]:
    """Which ComfyUI (and frontend) the real-ComfyUI and browser tests run against: a failure names it."""
    from devtools import server_process as sp

    path = sp.comfyui_path()
    if path is None:
        return ["ComfyUI: none (COMFYUI_PATH unset): the real-ComfyUI and browser tests skip"]
    frontend = os.environ.get("INVERSION_FRONTEND_ROOT") or "the venv's comfyui-frontend-package"
    try:
        from importlib.metadata import version
        if not os.environ.get("INVERSION_FRONTEND_ROOT"):
            frontend += f" {version('comfyui-frontend-package')}"
    except Exception:  # noqa: BLE001 - not installed: the browser tests say so themselves
        pass
    return [f"ComfyUI: v{sp.comfyui_version(path)} at {path}; frontend: {frontend}"]
