"""Import a test helper module by file path, once, under a name of its own.

The helpers of ``tests/comfy`` (``harness.py``, ``server_process.py``, ``cdp.py``) and the scripts
in ``benchmarks/`` are not packages: importing them by a plain name could shadow, or be shadowed
by, ComfyUI's own top-level modules (``nodes``, ``server``, ``comfy``). So they are loaded from
their path under a unique name and registered in ``sys.modules`` (which dataclasses need, and which
makes a second load return the same module instead of running it again).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["load"]


def load(name: str, path: str | os.PathLike) -> ModuleType:
    """The module at ``path``, imported as ``name`` (the one already imported under that name, if any)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.fspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
