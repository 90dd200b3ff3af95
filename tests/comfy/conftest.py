"""Fixtures for tests against a real ComfyUI checkout; everything skips when COMFYUI_PATH is unset.

ComfyUI is imported once per session on the CPU with all its folders (models/embeddings, input,
output, user) in a temporary base directory; the pack is imported as ComfyUI imports a custom-node
folder. The random SD1.5 checkpoint is built once and cached outside the repository
(``~/.cache/comfyui-inversion-tests`` or ``COMFYUI_INVERSION_TEST_CACHE``).
"""

from __future__ import annotations

import importlib
import os
import types

import pytest

from devtools import harness  # the repository root is on sys.path (pytest's pythonpath)

SKIP_REASON = ("COMFYUI_PATH is not set to a ComfyUI checkout (see DEVELOPERS.md); the tests against a "
               "real ComfyUI are skipped")


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory) -> types.SimpleNamespace:
    """ComfyUI booted in a temp base folder, plus the pack's modules (``comfyui.mod("nodes.comfy_host")``)."""
    if harness.comfyui_path() is None:
        pytest.skip(SKIP_REASON)
    env = harness.boot(str(tmp_path_factory.mktemp("comfy-base")))
    env.harness = harness
    env.pack = harness.import_pack()
    env.mod = lambda name: importlib.import_module(f"{harness.PACK_MODULE}.{name}")
    env.embeddings_dir = os.path.join(env.base_dir, "models", "embeddings")
    return env


@pytest.fixture(scope="session")
def sd15(comfyui) -> types.SimpleNamespace:
    """The random full-size SD1.5 checkpoint, loaded by CheckpointLoaderSimple (inference tensors)."""
    name = harness.install_checkpoint(comfyui, harness.sd15_checkpoint())
    model, clip, vae = harness.load_checkpoint(comfyui, name)
    return types.SimpleNamespace(ckpt_name=name, model=model, clip=clip, vae=vae)


@pytest.fixture(scope="session")
def sdxl(comfyui) -> types.SimpleNamespace:
    model, clip, vae = harness.tiny_sdxl(comfyui.folder_paths.get_folder_paths("embeddings"))
    return types.SimpleNamespace(model=model, clip=clip, vae=vae)


@pytest.fixture(scope="session")
def sd2(comfyui) -> types.SimpleNamespace:
    model, clip, vae = harness.tiny_sd2(comfyui.folder_paths.get_folder_paths("embeddings"))
    return types.SimpleNamespace(model=model, clip=clip, vae=vae)


@pytest.fixture(params=["sd15", "sdxl", "sd2"])
def family(request) -> types.SimpleNamespace:
    """Each model family in turn (SD1.5 full size, SDXL and SD2-v tiny)."""
    bundle = request.getfixturevalue(request.param)
    bundle.name = request.param
    return bundle


@pytest.fixture()
def toasts(comfyui, monkeypatch) -> list[tuple[str, dict]]:
    """Every (event, payload) the pack sends to the browser through ``comfy_run`` (toasts included)."""
    comfy_run = comfyui.mod("nodes.comfy_run")
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(comfy_run, "_send", lambda event, payload: sent.append((event, payload)))
    return sent
