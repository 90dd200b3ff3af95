"""Caption Init's "(download)" entries inside a real ComfyUI (``COMFYUI_PATH``), against a local hub.

A ThreadingHTTPServer on 127.0.0.1 serves tiny random models under the repository paths the entries
name (``<repo>/resolve/main/<file>``) and ``HF_ENDPOINT`` points at it: picking the entry downloads
the model into the ComfyUI base's ``models/captioners`` / ``models/open_clip`` with a toast and a
byte progress bar, the node runs on it, and the next run finds it on disk without a request.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch


from devtools.harness import run_node as _run  # execute as ComfyUI's executor calls it


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(root folder served, request log); HF_ENDPOINT points at the server."""
    root = tmp_path / "hub"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            requests.append(f"{self.command} {self.path}")
            return super().send_head()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield root, requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ui(comfyui, monkeypatch):
    """The node module, with its toasts and progress-bar updates recorded."""
    import comfy.utils

    vl = comfyui.mod("nodes.caption_nodes")
    toasts, bar = [], []
    monkeypatch.setattr(comfyui.mod("nodes.downloads"), "warn_user", lambda node, msg: toasts.append((node, msg)))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: bar.append((value, total, node_id)))
    return vl, toasts, bar


def _check_download(vl, kind, entry, toasts, bar, requests):
    import folder_paths  # ComfyUI's, importable once the comfyui fixture booted it

    dest = Path(vl.model_dirs(kind)[0]) / entry.folder
    assert dest.is_dir() and not dest.with_name(dest.name + ".partial").exists()
    assert Path(folder_paths.models_dir) in dest.parents
    total = sum(p.stat().st_size for p in dest.iterdir())
    (node, msg), = toasts
    assert node == "7" and entry.repo in msg and str(dest) in msg and vl.download.format_size(total) in msg
    assert bar and bar[-1] == (total, total, "7")
    assert entry.folder in (vl.captioner_names() if kind == vl.CAPTIONERS else vl.open_clip_names())
    assert requests and all(r.split()[1].startswith(f"/{entry.repo}/resolve/main/") for r in requests)
    return dest


def test_downloadable_captioner_is_fetched_once_then_used_from_disk(comfyui, sd2, hub, ui):
    from vl_models import make_blip
    root, requests = hub
    vl, toasts, bar = ui
    entry = vl.download.CAPTIONERS[0]
    make_blip(root / entry.repo / "resolve" / "main")
    assert entry.label in vl.captioner_names()
    images = torch.rand(2, 40, 56, 3)
    dest = Path(vl.model_dirs(vl.CAPTIONERS)[0]) / entry.folder
    try:
        init, text, _, listing = _run(vl.CaptionInit, clip=sd2.clip, mode="caption", text="", images=images,
                                      captioner=entry.label, max_new_tokens=4).args
        assert text and listing.count("\n") == 1 and init.metadata["init_text"] == text
        _check_download(vl, vl.CAPTIONERS, entry, toasts, bar, requests)
        assert vl.CaptionInit.fingerprint_inputs(mode="caption", captioner=entry.label) > 0
        n = len(requests)
        again = _run(vl.CaptionInit, clip=sd2.clip, mode="caption", text="", images=images,
                     captioner=entry.label, max_new_tokens=4).args
        assert again[1] == text and len(requests) == n and len(toasts) == 1  # from disk, no network
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_downloadable_open_clip_is_fetched_and_offline_errors_say_what_to_do(comfyui, sd2, hub, ui, monkeypatch):
    from open_clip_env import import_open_clip
    from vl_models import make_open_clip
    open_clip = import_open_clip()
    root, requests = hub
    vl, toasts, bar = ui
    entry = vl.download.OPEN_CLIP[0]
    make_open_clip(open_clip, root / entry.repo / "resolve" / "main", "folder")
    dest = Path(vl.model_dirs(vl.OPEN_CLIP)[0]) / entry.folder
    labels = "red toy car\ntabby cat\nteapot"
    kw = dict(clip=sd2.clip, mode="class", text="", images=torch.rand(2, 36, 36, 3), open_clip_model=entry.label,
              labels=labels)
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(RuntimeError) as e:
            _run(vl.CaptionInit, **kw)
        msg = str(e.value)
        assert "HF_HUB_OFFLINE" in msg and "open_clip_model.safetensors" in msg and str(dest) in msg
        assert not dest.exists() and requests == [] and toasts == []
        monkeypatch.delenv("HF_HUB_OFFLINE")
        _, text, word, _ = _run(vl.CaptionInit, **kw).args
        assert text in labels.splitlines() and word == text
        _check_download(vl, vl.OPEN_CLIP, entry, toasts, bar, requests)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_unreachable_hub_names_the_url_and_the_manual_install(comfyui, sd2, hub, ui):
    root, requests = hub  # serves nothing: every file is a 404
    vl, toasts, _ = ui
    entry = vl.download.CAPTIONERS[0]
    with pytest.raises(RuntimeError) as e:
        _run(vl.CaptionInit, clip=sd2.clip, mode="caption", text="", images=torch.rand(1, 32, 32, 3),
             captioner=entry.label)
    msg = str(e.value)
    assert f"/{entry.repo}/resolve/main/model.safetensors" in msg and "HTTP 404" in msg
    assert "by hand" in msg and "models" in msg and "captioners" in msg and toasts == []
    assert not (Path(vl.model_dirs(vl.CAPTIONERS)[0]) / entry.folder).exists()
