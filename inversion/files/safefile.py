"""Files on disk, safely: atomic safetensors writes and reads that never run code from a file.

Writing: ``atomic_save_safetensors`` writes a temporary file in the target's folder, fsyncs it and
renames it over the target (then fsyncs the folder), so a reader, a crash or an error mid-save sees
either the old file or the complete new one, never a half-written or clobbered file. An existing
target is replaced only when asked (``overwrite=True``), and a target that appears during the write
is not clobbered either (the rename is a create-if-absent hard link).

Reading: ``read_safetensors`` / ``read_safetensors_header`` open a safetensors file (tensors on the
CPU, as stored; the header's string metadata) and turn any failure into one ``ValueError``;
``torch_load_safely`` opens a pickle (``.pt`` / ``.bin`` / ``.ckpt``) with
``torch.load(weights_only=True)`` only, so a file that carries code or objects is refused, never run.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import safetensors.torch
import torch
from safetensors import safe_open

__all__ = [
    "atomic_write_text", "atomic_save_safetensors", "read_safetensors", "read_safetensors_header", "torch_load_safely"]


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists and was left untouched; pass overwrite=True (the node's 'overwrite' "
        "toggle) to replace it, or choose another name"
    )


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, without a check-then-write race."""
    try:
        os.link(tmp, path)  # atomic create-if-absent
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # a filesystem without hard links (FAT, some network shares)
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (and string ``metadata`` in the header) to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk and renamed over
    the target, so readers see either the old file or the complete new one. On any error the
    temporary file is removed and an existing target is untouched. An existing target is only
    replaced with ``overwrite=True`` (else ``FileExistsError``). Parent folders are created.
    Tensors are stored detached, contiguous and on the CPU, in their own dtype.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name ending in .safetensors")
    if not overwrite and path.exists():
        raise _exists_error(path)
    clean: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must map str to torch.Tensor; got {key!r}: {type(t).__name__}")
        # clone: safetensors refuses tensors that share storage, and a view would drag its base.
        clean[key] = t.detach().to("cpu").contiguous().clone()
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}

    return _write_atomically(path, lambda tmp: safetensors.torch.save_file(clean, str(tmp), metadata=meta), overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """``text`` (UTF-8) to ``path`` atomically, as ``atomic_save_safetensors`` writes: readers see the old
    file or the whole new one."""
    return _write_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def _write_atomically(path: Path, write, overwrite: bool) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path`` (only
    if absent unless ``overwrite``); on any error the temporary file goes and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:  # mkstemp makes the file owner-only; give it the mode a normal save would
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        except OSError:
            pass
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# ---------------------------------------------------------------------------------------------
# Safe reads
# ---------------------------------------------------------------------------------------------


def _invalid(path: str | os.PathLike, e: Exception, what: str) -> ValueError:
    return ValueError(f"{path} is not a valid safetensors file ({e}); {what} is corrupt or truncated")


def read_safetensors(
    path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    *,
    what: str = "the file",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (CPU, dtype as stored; only ``keys`` if given) and header metadata.

    Any failure to read (not safetensors, truncated, a key it lacks) raises ``ValueError``
    "<path> is not a valid safetensors file (...); <what> is corrupt or truncated". Callers check
    that the file exists first, to give their own "does not exist" message.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except Exception as e:
        raise _invalid(path, e, what) from None
    return tensors, meta


def read_safetensors_header(path: str | os.PathLike, *, what: str = "the file") -> tuple[dict[str, str], list[str]]:
    """A safetensors file's header metadata and tensor names, without reading the tensors.

    Raises ``ValueError`` like ``read_safetensors``.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:
        raise _invalid(path, e, what) from None


def _unpickle_reason(e: Exception) -> str:
    """The useful line of torch's long weights-only error ("Unsupported global: GLOBAL x.y ...")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error: (.*)", text)
    reason = m.group(1).split(" Please use")[0] if m else (text.strip().splitlines() or [type(e).__name__])[0]
    return "it holds pickled code or objects: " + reason.strip()[:200]


def torch_load_safely(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is refused (``ValueError``)."""
    hint = (
        "it was NOT loaded, for safety (unpickling can run arbitrary code). If you trust its source, "
        "convert it to .safetensors with a trusted tool and load that instead"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is not a plain tensor file ({_unpickle_reason(e)}); {hint}") from None
    except Exception as e:  # zip/pickle structure errors: corrupt, truncated or not a torch file
        raise ValueError(
            f"{path} could not be read as a plain PyTorch tensor file ({type(e).__name__}: {e}); it may be "
            f"corrupt or another format; {hint}"
        ) from None
