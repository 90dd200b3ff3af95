"""Import-only stand-in for torchvision whose attributes are *classes*, for tests and CI only.

Why this exists
- The CI venv runs the CPU build of torch, and PyPI's torchvision wheels are linked against the
  CUDA build, so a real ``import torchvision`` fails there. The harness ships an import-only stub
  (``/work/shared/ci-stubs/torchvision``) whose attributes are *instances*; that is enough for
  ComfyUI, which only imports torchvision at module level.
- open_clip and timm (which open_clip imports) go further at import time: they *subclass*
  torchvision classes (``class MaybeToTensor(transforms.ToTensor)``) and read class attributes
  (``InterpolationMode.BICUBIC``). With an instance-based stub that raises ``TypeError`` at import.
- Here every attribute of every ``torchvision[.x]`` module is a class (created on first access and
  cached), so it can be subclassed, used as a dict key, and its attributes read; *calling or
  instantiating* anything raises ``RuntimeError`` with a clear message. The pack never calls
  torchvision (it does its own resize/crop/normalise with torch), so tests that import open_clip
  work, and anything that really needs torchvision fails loudly instead of silently.
- Like the harness stub it has no dist-info, so libraries that check the installed version
  treat torchvision as absent. Never install it next to a real torchvision.

The same file also stands in for torchaudio, which ComfyUI v0.2x-v0.33 imports at module level
(``comfy.sd`` -> the audio VAE) and which has no build for the CPU torch either: CI copies it to
``site-packages/torchaudio/__init__.py``. Every name in it comes from ``__name__``, so each copy
serves its own package.

How it is used: ``tests/open_clip_env.py`` puts this folder first on ``sys.path`` when the
torchvision that is installed cannot be subclassed; CI may instead install it as
``site-packages/torchvision`` in place of the harness stub (a superset of what ComfyUI needs).
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+inversion.ci.stub"
HARNESS_STUB = True  # same marker as the harness stub: "this is not a real torchvision"
SUBCLASSABLE_STUB = True
_MSG = (f"{__name__} is not available here: this is ComfyUI-Inversion's import-only CI stub "
        f"(.ci/torchvision_stub); install a {__name__} that matches your torch to use it")


class _StubMeta(type):
    """Metaclass of the stand-in classes: any attribute read gives another stand-in class."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        sub = _make(f"{cls.__qualname__}.{attr}")
        setattr(cls, attr, sub)
        return sub

    def __repr__(cls):
        return f"<unavailable {cls.__qualname__}>"


class _Unavailable(metaclass=_StubMeta):
    def __new__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__}: {_MSG}")


def _make(qualname: str) -> type:
    name = qualname.rsplit(".", 1)[-1]
    cls = _StubMeta(name, (_Unavailable,), {"__module__": __name__})
    cls.__qualname__ = qualname
    return cls


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = _make(f"{self.__name__}.{attr}")
        setattr(self, attr, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve every ``torchvision.<anything>`` submodule as a stub module."""

    _inversion_stub = __name__  # the package this finder serves (one finder per stubbed package)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


# First on the meta path, so this stub (not another one installed earlier) serves submodules.
if not any(getattr(f, "_inversion_stub", None) == __name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    value = _make(f"{__name__}.{attr}")
    globals()[attr] = value
    return value
