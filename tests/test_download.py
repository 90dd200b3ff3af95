"""inversion.vision_language.download against a local HTTP server laid out like the Hub (``<repo>/resolve/<rev>/<file>``)."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading

import pytest

from inversion.vision_language import download as dl

MODEL = dl.HubModel("tiny-model", "org/tiny-model", files=("weights.safetensors", "config.json"),
                    optional=("tokenizer.json", "vocab.txt"), size="1 MB")
FILES = {"weights.safetensors": os.urandom(3 * dl.CHUNK + 123), "config.json": b'{"model_type": "blip"}',
         "tokenizer.json": b"{}"}  # vocab.txt is optional and absent: skipped


class Hub:
    def __init__(self, root, url, requests):
        self.root, self.url, self.requests = root, url, requests


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1 serving MODEL's files; HF_ENDPOINT points at it."""
    root = tmp_path / "hub"
    folder = root / MODEL.repo / "resolve" / MODEL.revision
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    requests: list[tuple[str, str]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet test output
            pass

        def send_head(self):
            requests.append((self.command, self.path))
            return super().send_head()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield Hub(folder, url, requests)
    finally:
        server.shutdown()
        server.server_close()


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_download_lands_the_files_with_progress(hub, tmp_path):
    parent = tmp_path / "models" / "captioners"
    plan = dl.plan(MODEL, parent)
    assert [f.name for f in plan] == ["tokenizer.json", "weights.safetensors", "config.json"]  # config last
    total = sum(len(FILES[f.name]) for f in plan)
    assert sum(f.size for f in plan) == total
    seen = []
    dest = dl.download(MODEL, parent, lambda p: seen.append((p.step, p.total)), files=plan)
    assert dest == parent / "tiny-model"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == FILES
    assert _leftovers(parent) == ["tiny-model"]  # no .partial folder left
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 4  # chunked, monotone
    assert dl.is_installed(MODEL, parent)


def test_second_call_uses_the_folder_without_the_network(hub, tmp_path):
    parent = tmp_path / "models"
    dl.download(MODEL, parent)
    n = len(hub.requests)
    assert dl.download(MODEL, parent) == parent / "tiny-model"
    assert len(hub.requests) == n


def test_missing_needed_file_is_a_clear_error_and_leaves_nothing(hub, tmp_path):
    (hub.root / "config.json").unlink()
    parent = tmp_path / "models"
    with pytest.raises(dl.DownloadError) as e:
        dl.download(MODEL, parent)
    msg = str(e.value)
    assert f"{hub.url}/org/tiny-model/resolve/main/config.json" in msg and "HTTP 404" in msg
    assert "by hand" in msg and "weights.safetensors, config.json" in msg and str(parent / "tiny-model") in msg
    assert _leftovers(parent) == []


def test_failure_mid_download_removes_the_partial_folder(hub, tmp_path):
    parent = tmp_path / "models"
    files = dl.plan(MODEL, parent)
    (hub.root / "config.json").unlink()  # gone between the plan and the download: fails after the weights
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download(MODEL, parent, files=files)
    assert _leftovers(parent) == []

    class Cancel(Exception):
        pass

    def cancel(p):
        if p.step > dl.CHUNK:
            raise Cancel()

    (hub.root / "config.json").write_bytes(FILES["config.json"])
    with pytest.raises(Cancel):
        dl.download(MODEL, parent, cancel)
    assert _leftovers(parent) == []


def test_connection_refused_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    parent = tmp_path / "models"
    with pytest.raises(dl.DownloadError) as e:
        dl.download(MODEL, parent)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/org/tiny-model/resolve/main/" in msg and "cannot be reached" in msg
    assert "by hand" in msg and "tree/main" in msg
    assert _leftovers(parent) == []


def test_offline_mode_refuses_without_a_request(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE"):
        dl.download(MODEL, tmp_path / "models")
    assert hub.requests == [] and _leftovers(tmp_path / "models") == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    dest = dl.download(MODEL, tmp_path / "models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.download(MODEL, tmp_path / "models") == dest  # on disk: offline is fine


def test_an_incomplete_folder_is_not_overwritten(hub, tmp_path):
    (tmp_path / "models" / "tiny-model").mkdir(parents=True)
    with pytest.raises(dl.DownloadError, match="lacks weights.safetensors, config.json"):
        dl.download(MODEL, tmp_path / "models")


def test_curated_models_and_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.endpoint() == "https://huggingface.co"
    for m in dl.CAPTIONERS + dl.OPEN_CLIP:
        assert m.label == f"{m.folder} (download)" and "/" in m.repo and m.size
        assert m.files[-1].endswith("config.json")  # a folder looks like a model only once complete
        assert all(f.endswith((".json", ".txt", ".safetensors")) for f in m.files + m.optional)
    assert dl.OPEN_CLIP[0].url("open_clip_config.json") == \
        "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_config.json"
    assert dl.format_size(1_900_000_000) == "1.9 GB" and dl.format_size(None) == "unknown size"
