"""The README's library example runs as written (on tiny diffusers/transformers models)."""

from __future__ import annotations

import pathlib
import re
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_pipe(tok_dir):
    from tiny_models import tiny_sd_components

    return types.SimpleNamespace(**tiny_sd_components(tok_dir))


def test_readme_library_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    code = next(b for b in blocks if "Trainer(" in b)
    code = code.replace("steps=500", "steps=3")  # the only change: a short run
    monkeypatch.chdir(tmp_path)
    ns = {"pipe": _tiny_pipe(str(tmp_path / "tok")), "images": torch.rand(2, 3, 16, 16)}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - executing our own README example
    assert ns["result"].steps_done == 3
    from inversion.files.formats import load_embedding
    emb = load_embedding(tmp_path / "models/embeddings/my-cat.safetensors")
    assert emb.num_vectors == 4 and emb.metadata["steps"] == "3"


def test_readme_results_are_the_measured_ones():
    """The README's results table is the one the benchmark wrote (docs/results/world_methods.md),
    and every chart and command it points at exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = (ROOT / "docs" / "results" / "world_methods.md").read_text(encoding="utf-8").strip()
    assert any(line.startswith("| method |") for line in table.splitlines()), "the benchmark wrote no methods table"
    assert table in readme, "README's results table differs from docs/results/world_methods.md: paste it again"
    for img in re.findall(r"\]\((docs/results/[^)]+\.png)\)", readme):
        assert (ROOT / img).is_file(), img
    assert re.findall(r"\]\((docs/results/[^)]+\.png)\)", readme), "README shows no result chart"
    for module in set(re.findall(r"python -m (inversion[\w.]*)", readme)):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for script in set(re.findall(r"python (benchmarks/\w+\.py)", readme)):
        assert (ROOT / script).is_file(), script


def test_tested_versions_agree_in_pyproject_readme_and_ci():
    """pyproject.toml's tested ComfyUI and frontend versions are what README states and .ci/run runs."""
    import tomllib

    tested = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfyui-inversion"]["tested"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    statement = re.search(r"\*\*Tested on\*\* (.*?)\n\n", readme, flags=re.S).group(1)
    for v in tested["comfyui"]:
        assert f"ComfyUI v{v}" in statement and f"ComfyUI v{v}" in ci, v
    for v in tested["frontend"]:
        assert v in statement and v in ci, v
    assert re.search(r"^NEW_FRONTEND=(\S+)$", ci, flags=re.M).group(1) in tested["frontend"]
    assert re.search(r"^MID_FRONTEND=(\S+)$", ci, flags=re.M).group(1) in tested["frontend"]
