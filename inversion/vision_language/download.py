"""Fetch a named model from the Hugging Face Hub into a model folder, once, on the user's request.

The loaders (``caption.load_captioner``, ``classify.load_open_clip``) only ever read folders on
disk; this module is the one place that reaches the network, and only for the few models listed in
``CAPTIONERS`` and ``OPEN_CLIP``, when the user picks one of them. Files come from
``<endpoint>/<repo>/resolve/<revision>/<file>`` (the Hub's plain-HTTP layout), with the endpoint
taken from ``HF_ENDPOINT`` (default https://huggingface.co) and ``HF_HUB_OFFLINE=1`` refusing, as
in ``huggingface_hub``. The standard library's ``urllib`` streams each file in chunks and reports
``progress(Progress(done_bytes, total_bytes))``.

A download is atomic: the files land in ``<parent>/<folder>.partial`` and the folder is renamed to
``<parent>/<folder>`` once every file is complete, so an interrupted or failed download leaves
nothing that looks like a model. A folder already on disk is used as it is, without the network.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..progress import Progress

__all__ = ["CAPTIONERS", "OPEN_CLIP", "DownloadError", "HubModel", "RemoteFile", "download", "endpoint",
           "format_size", "is_installed", "offline", "plan"]

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_SUFFIX = ".partial"
USER_AGENT = "ComfyUI-Inversion (urllib)"
CHUNK = 1 << 20  # 1 MiB reads: ~2000 progress calls for a 2 GB model, few enough to draw each one



class DownloadError(RuntimeError):
    """A model could not be fetched; the message names the URL, the cause and the manual install."""


@dataclass(frozen=True)
class HubModel:
    """A model repository on the Hub that becomes the folder ``<models sub-folder>/<folder>``."""

    folder: str  # the folder name on disk, also the name the loaders list it under
    repo: str  # "<org>/<name>" on the Hub
    files: tuple[str, ...]  # needed: a missing one is an error (config last: a folder is a model once it has one)
    optional: tuple[str, ...] = ()  # fetched when the repository has them (tokenizer/processor layouts vary)
    revision: str = "main"
    size: str = ""  # roughly, for the tooltip; the real size is read before downloading

    @property
    def label(self) -> str:
        """The combo entry that stands for this model before it is on disk."""
        return f"{self.folder} (download)"

    def url(self, file: str, base: str | None = None) -> str:
        return f"{base or endpoint()}/{self.repo}/resolve/{self.revision}/{urllib.parse.quote(file)}"

    def page(self) -> str:
        """The repository's file list, for the manual install."""
        return f"{endpoint()}/{self.repo}/tree/{self.revision}"


# Curated: small enough to be a sensible first download, transformers/open_clip-native (no remote
# code), safetensors weights. Order inside `files`: weights first, config last.
CAPTIONERS: tuple[HubModel, ...] = (
    HubModel("blip-image-captioning-large", "Salesforce/blip-image-captioning-large",
             files=("model.safetensors", "config.json"),
             optional=("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "vocab.txt",
                       "tokenizer.json", "special_tokens_map.json", "generation_config.json"),
             size="1.9 GB"),
)
OPEN_CLIP: tuple[HubModel, ...] = (
    HubModel("ViT-B-32-laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
             files=("open_clip_model.safetensors", "open_clip_config.json"), size="0.6 GB"),
)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    size: int | None  # bytes, None when the server did not say


def endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` (a mirror, or a local server in tests) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: no network access at all (huggingface_hub's switch)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def format_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} bytes"


def is_installed(model: HubModel, parent: str | os.PathLike) -> bool:
    """The folder ``parent/model.folder`` exists with every needed file."""
    dest = Path(parent) / model.folder
    return all((dest / f).is_file() for f in model.files)


def _manual(model: HubModel, dest: Path) -> str:
    optional = f" (and, where the repository has them, {', '.join(model.optional)})" if model.optional else ""
    return (f"To install it by hand, download {', '.join(model.files)}{optional} from {model.page()} "
            f"into {dest}{os.sep}")


def _fail(model: HubModel, dest: Path, url: str, err: BaseException) -> DownloadError:
    if isinstance(err, urllib.error.HTTPError):
        cause = f"HTTP {err.code} {err.reason}"
    elif isinstance(err, urllib.error.URLError):
        cause = f"{err.reason} (offline, or the server cannot be reached)"
    else:
        cause = f"{type(err).__name__}: {err}"
    return DownloadError(f"could not download {model.repo}: {url} failed with {cause}. {_manual(model, dest)}")


def _open(url: str, method: str, timeout: float):
    req = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs built from endpoint()


def _refuse_offline(model: HubModel, dest: Path) -> None:
    if offline():
        raise DownloadError(f"{model.repo} is not on disk and HF_HUB_OFFLINE is set, so it is not downloaded. "
                            f"Unset HF_HUB_OFFLINE to let it download, or install it by hand. {_manual(model, dest)}")


def plan(model: HubModel, parent: str | os.PathLike, timeout: float = 30.0) -> list[RemoteFile]:
    """The files to fetch with their sizes (one HEAD request each); optional files the repository
    lacks are left out. Raises ``DownloadError`` when a needed file or the server is unreachable."""
    dest = Path(parent) / model.folder
    _refuse_offline(model, dest)
    base = endpoint()
    out = []
    for name in model.optional + model.files:  # optional first: the needed config stays last
        url = model.url(name, base)
        try:
            with _open(url, "HEAD", timeout) as r:
                length = r.headers.get("Content-Length")
                out.append(RemoteFile(name, url, int(length) if length and length.isdigit() else None))
        except urllib.error.HTTPError as e:
            if e.code == 404 and name in model.optional:
                continue
            if e.code in (403, 405, 501) and name in model.optional:  # a server without HEAD: try GET later
                out.append(RemoteFile(name, url, None))
                continue
            raise _fail(model, dest, url, e) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise _fail(model, dest, url, e) from e
    return out


def download(
    model: HubModel,
    parent: str | os.PathLike,
    progress: Callable[[Progress], object] | None = None,
    files: Sequence[RemoteFile] | None = None,
    timeout: float = 60.0,
) -> Path:
    """``parent/model.folder``, downloaded first if it is not there (see the module docstring).

    ``files`` is the result of ``plan`` when the caller already asked (to show the size first).
    ``progress(Progress(done_bytes, total_bytes))`` is called after every chunk; an exception it raises (a
    Cancel) stops the download and, like any failure, removes the partial folder.
    """
    parent = Path(parent)
    dest = parent / model.folder
    if is_installed(model, parent):
        return dest
    if dest.exists():
        raise DownloadError(f"{dest} exists but lacks {', '.join(f for f in model.files if not (dest / f).is_file())}; "
                            f"complete it or delete it to download again. {_manual(model, dest)}")
    _refuse_offline(model, dest)
    files = list(files) if files is not None else plan(model, parent)
    total = sum(f.size or 0 for f in files)
    partial = parent / f"{model.folder}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)  # a previous run killed mid-download
    partial.mkdir(parents=True)
    done = 0
    try:
        for f in files:
            url = f.url
            try:
                with _open(url, "GET", timeout) as r, open(partial / f.name, "wb") as out:
                    length = r.headers.get("Content-Length")
                    expected = int(length) if length and length.isdigit() else None
                    if f.size is None and expected is not None:
                        total += expected
                    got = 0
                    while chunk := r.read(CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(Progress(done, max(total, done)))
                    if expected is not None and got != expected:
                        raise OSError(f"connection closed after {got} of {expected} bytes")
            except urllib.error.HTTPError as e:
                if e.code == 404 and f.name in model.optional:
                    continue
                raise _fail(model, dest, url, e) from e
            except (urllib.error.URLError, OSError) as e:
                raise _fail(model, dest, url, e) from e
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest
