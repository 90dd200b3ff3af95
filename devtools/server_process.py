"""A real ComfyUI server in a subprocess, with this repository installed in its ``custom_nodes``.

Used by ``tests/test_workflows.py`` (the real ``/object_info``), ``tests/comfy/test_server.py``,
``tests/comfy/test_browser.py`` (the page, the workflows, a training run) and
``tools/build_examples.py``, as ``from devtools import server_process``.

Everything the server writes goes to a temporary ``--base-directory`` (models, inputs, outputs,
user settings) and an in-memory database; the ComfyUI checkout at ``COMFYUI_PATH`` is only read.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_FOLDER = "comfyui-inversion"  # the folder name the Comfy Registry / Manager install uses
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy")):
        return os.path.abspath(path)
    return None


def comfyui_version(path: str | None = None) -> str:
    """The version of the ComfyUI checkout at ``path`` (default ``COMFYUI_PATH``), from its
    ``comfyui_version.py``; "unknown" where it has none."""
    path = path or comfyui_path()
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as f:
            found = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read())
    except (OSError, TypeError):
        return "unknown"
    return found.group(1) if found else "unknown"


def frontend_args() -> tuple[str, ...]:
    """``--front-end-root`` when ``INVERSION_FRONTEND_ROOT`` names a frontend's ``static`` folder (another
    frontend than the venv's ``comfyui-frontend-package``, e.g. ``pip install --target DIR
    comfyui-frontend-package==1.49.6`` and ``DIR/comfyui_frontend_package/static``); else none."""
    root = os.environ.get("INVERSION_FRONTEND_ROOT")
    if not root:
        return ()
    if not os.path.isfile(os.path.join(root, "index.html")):
        raise RuntimeError(f"INVERSION_FRONTEND_ROOT={root} has no index.html: point it at a frontend's static folder")
    return ("--front-end-root", os.path.abspath(root))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with a private base directory; a context manager."""

    def __init__(self, base_dir: str, *, comfy_path: str | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ("--disable-api-nodes",)):
        self.comfy_path = comfy_path or comfyui_path()
        if self.comfy_path is None:
            raise RuntimeError("COMFYUI_PATH is not set to a ComfyUI checkout")
        self.base_dir = os.path.abspath(base_dir)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.base_dir, "server.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def install_pack(self) -> str:
        for sub in ("custom_nodes", "models/checkpoints", "models/embeddings", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        settings = os.path.join(self.base_dir, "user", "default", "comfy.settings.json")
        if not os.path.exists(settings):  # a returning user: no first-run template dialog, no minimap
            os.makedirs(os.path.dirname(settings), exist_ok=True)
            with open(settings, "w") as f:
                json.dump(SETTINGS, f)
        link = os.path.join(self.base_dir, "custom_nodes", PACK_FOLDER)
        if not os.path.lexists(link):
            os.symlink(ROOT, link, target_is_directory=True)
        return link

    def link_model(self, path: str, folder: str = "checkpoints") -> str:
        """Make ``path`` visible as ``models/<folder>/<basename>``; returns the name to use."""
        name = os.path.basename(path)
        dst = os.path.join(self.base_dir, "models", folder, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(path), dst)
        return name

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.install_pack()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *frontend_args(), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, data: Any, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None


def object_info(base_dir: str, timeout: float = 180.0) -> dict[str, Any]:
    """The ``/object_info`` of a fresh server with this pack installed (started and stopped here)."""
    with ComfyServer(base_dir) as server:
        return server.get("/object_info", timeout=timeout)


if __name__ == "__main__":  # python -m devtools.server_process OUT.json: dump /object_info
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        info = object_info(tmp)
    with open(sys.argv[1], "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    print(f"{len(info)} node types")
