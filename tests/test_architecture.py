"""docs/architecture.md stays true: every module of the library and the node layer is listed with its
one job, and every module it lists exists."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _listed(section: str) -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    part = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_/]+(?:\.py)?/?)` \|", part, re.M))


def _modules(package: str) -> set[str]:
    root = ROOT / package
    out = set()
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if p.name == "__init__.py" and p.parent == root:
            continue
        if rel.startswith("world/"):
            out.add("world/")
        elif p.name != "__init__.py":
            out.add(rel)
    return out


def test_every_library_module_is_listed_and_every_listed_module_exists():
    listed = _listed("The library")
    assert listed == _modules("inversion"), (sorted(_modules("inversion") - listed), sorted(listed - _modules("inversion")))


def test_every_node_module_is_listed_and_every_listed_module_exists():
    listed = _listed("The node layer")
    assert listed == _modules("nodes"), (sorted(_modules("nodes") - listed), sorted(listed - _modules("nodes")))


def test_the_doc_can_tell_a_missing_module():
    assert "methods/loss.py" in _listed("The library") and "nowhere.py" not in _listed("The library")
