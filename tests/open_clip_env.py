"""Import open_clip in test environments whose torchvision is an instance-based stub.

open_clip (and timm, which it imports) subclass torchvision classes at import time. In CI the
installed torchvision is an import-only stub (PyPI's torchvision cannot load beside the CPU torch);
if that stub's attributes are not classes, this puts the pack's class-based stub
(``.ci/torchvision_stub``, see its docstring) in front of it. With a real torchvision nothing changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

STUB_DIR = Path(__file__).resolve().parent.parent / ".ci" / "torchvision_stub"


def _torchvision_subclassable() -> bool:
    try:
        import torchvision.transforms as T
    except Exception:  # noqa: BLE001 - a broken real torchvision counts as unusable
        return False
    return isinstance(getattr(T, "ToTensor", None), type)


def import_open_clip():
    """The open_clip module, or skip the test with the reason."""
    if "open_clip" not in sys.modules and not _torchvision_subclassable():
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(STUB_DIR))
        try:
            import torchvision  # noqa: F401 - the class-based stub now
        finally:
            sys.path.remove(str(STUB_DIR))
    try:
        import open_clip
    except ImportError as e:
        pytest.skip(f"open_clip_torch is not installed ({e}); CI installs it with "
                    "`pip install --no-deps open_clip_torch timm ftfy wcwidth`")
    return open_clip
