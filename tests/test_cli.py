"""The command line (issue 26): a config file of concepts trained headless, on the miniature world and on a
diffusers folder; several processes through torchrun (gloo, CPU), sharing the concepts or one batch."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from inversion.cli import config as cfgmod
from inversion.cli.run import main
from inversion.files.formats import load_embedding

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example_configs" / "world" / "two_concepts.toml"


def _write(tmp_path, body: str, name="run.toml") -> pathlib.Path:
    for sub in ("crescent", "blue-star"):  # the example's own image folders, beside the config
        link = tmp_path / sub
        if not link.exists():
            link.symlink_to(EXAMPLE.parent / sub, target_is_directory=True)
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


WORLD = '''
model = "miniature-world"
out = "out/embeddings"
[defaults]
steps = {steps}
batch_size = {batch}
seed = 3
[[concepts]]
name = "w-crescent"
images = "crescent"
init_word = "thing"
[[concepts]]
name = "w-star"
images = "blue-star"
init_text = "blue thing"
method = "vanilla"
'''


def test_config_errors_name_the_concept_and_the_key(tmp_path):
    base = WORLD.format(steps=3, batch=2)
    cases = {
        "stpes = 3": "concept 'w-crescent' (concepts[0]): unknown key 'stpes'",
        'method = "fast"': "concept 'w-crescent' (concepts[0]): method must be one of",
        "steps = 0": "concept 'w-crescent' (concepts[0]): steps must be >= 1",
        'options = { precision = "fp8" }': "concept 'w-crescent' (concepts[0]): options: precision must be one of auto",
        'options = { flipp = true }': "options: unknown option 'flipp'",
        'init_text = "a toy"': "give init_text",  # with init_word already set: not both
        'steps = "many"': "steps must be int",
    }
    for line, message in cases.items():
        body = base.replace('name = "w-crescent"\n', f'name = "w-crescent"\n{line}\n')
        with pytest.raises(cfgmod.ConfigError, match=re.escape(message)):
            cfgmod.load_config(_write(tmp_path, body))
    with pytest.raises(cfgmod.ConfigError, match="'w-star' is given to more than one concept.*each \\[\\[concepts\\]\\]"):
        cfgmod.load_config(_write(tmp_path, base.replace('name = "w-crescent"', 'name = "w-star"')))
    with pytest.raises(cfgmod.ConfigError, match="images: .* is not a folder"):
        cfgmod.load_config(_write(tmp_path, base.replace('images = "crescent"', 'images = "nowhere"')))
    with pytest.raises(cfgmod.ConfigError, match="unknown key 'modle'"):
        cfgmod.load_config(_write(tmp_path, "modle = 'x'\n" + base))


def test_the_shipped_example_checks_and_lists_what_would_run(capsys):
    assert main([str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world-crescent: adaptive, 200 steps" in out and "world-blue-star" in out and "(5 images)" in out
    assert not (EXAMPLE.parent / "output" / "embeddings" / "dummy").exists()


def test_world_concepts_train_write_the_nodes_files_and_resume_exactly(tmp_path, capsys):
    cfg = _write(tmp_path, WORLD.format(steps=4, batch=2))
    assert main([str(cfg), "--quiet", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "out" / "inversion_report.json").read_text())
    assert [c["name"] for c in report["concepts"]] == ["w-crescent", "w-star"]
    for c in report["concepts"]:
        emb = load_embedding(c["path"])
        assert emb.vectors["clip_l"].shape[0] == (1 if c["name"] == "w-crescent" else 2)
        assert emb.metadata["steps"] == "4" and emb.metadata["trainer"] == "inversion-train"
        assert len(c["loss"]) == 4 and c["final_norm"]["clip_l"] > 0
        assert (tmp_path / "out" / "inversion_runs" / c["name"] / "state.safetensors").is_file()
    assert "w-crescent: 4 steps in" in capsys.readouterr().err
    full = load_embedding(tmp_path / "out" / "embeddings" / "w-crescent.safetensors").vectors["clip_l"]
    # the same run in two halves: 2 steps, then resume to 4
    half = tmp_path / "half"
    half.mkdir()
    assert main([str(_write(half, WORLD.format(steps=2, batch=2))), "--quiet", "--threads", "1"]) == 0
    body = WORLD.format(steps=4, batch=2).replace('out = "out/embeddings"', 'out = "out/embeddings"\nif_exists = "resume"')
    assert main([str(_write(half, body, "resume.toml")), "--quiet", "--threads", "1"]) == 0
    resumed = load_embedding(half / "out" / "embeddings" / "w-crescent.safetensors")
    assert resumed.metadata["steps"] == "4" and torch.equal(resumed.vectors["clip_l"], full)
    # and an existing file is never replaced unless the file says so
    assert main([str(cfg), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_diffusers_folder_trains_with_the_same_file(tmp_path):
    """The config's model may be a diffusers pipeline folder (the tests' tiny SD1.5-like one)."""
    from tiny_models import tiny_sd_pipeline_folder

    pipe = tiny_sd_pipeline_folder(str(tmp_path / "model"))
    body = WORLD.format(steps=2, batch=1).replace('"miniature-world"', json.dumps(pipe))
    body = body.replace("[defaults]", "[defaults]\nsize = 32").replace('init_word = "thing"', 'init_word = "cat"')
    body = body.replace('init_text = "blue thing"', 'init_text = "a grey cat"')
    assert main([str(_write(tmp_path, body)), "--quiet", "--threads", "1"]) == 0
    emb = load_embedding(tmp_path / "out" / "embeddings" / "w-star.safetensors")
    assert emb.metadata["model_family"] == "SD1.x" and emb.vectors["clip_l"].shape == (3, 32)


def _torchrun(tmp_path, cfg, *args, nproc=2):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--module", "inversion.train", str(cfg), "--quiet", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_shares_the_concepts_out_and_each_file_is_a_single_process_run(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    assert main([str(_write(one, WORLD.format(steps=3, batch=2))), "--quiet", "--threads", "1"]) == 0
    two = tmp_path / "two"
    two.mkdir()
    proc = _torchrun(two, _write(two, WORLD.format(steps=3, batch=2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((two / "out" / "inversion_report.json").read_text())
    assert report["world_size"] == 2 and [(c["name"], c["rank"]) for c in report["concepts"]] == [
        ("w-crescent", 0), ("w-star", 1)]  # each concept trained exactly once, concept i by rank i mod 2
    for name in ("w-crescent", "w-star"):
        a = load_embedding(one / "out" / "embeddings" / f"{name}.safetensors").vectors["clip_l"]
        b = load_embedding(two / "out" / "embeddings" / f"{name}.safetensors").vectors["clip_l"]
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_data_parallel_matches_one_process_with_the_global_batch(tmp_path):
    body = WORLD.format(steps=3, batch=4).split("[[concepts]]")
    body = "[[concepts]]".join(body[:2])  # one concept, adaptive: its sampler sees the gathered g
    one = tmp_path / "one"
    one.mkdir()
    assert main([str(_write(one, body)), "--quiet", "--threads", "1"]) == 0
    two = tmp_path / "two"
    two.mkdir()
    proc = _torchrun(two, _write(two, body), "--data-parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_embedding(one / "out" / "embeddings" / "w-crescent.safetensors").vectors["clip_l"]
    b = load_embedding(two / "out" / "embeddings" / "w-crescent.safetensors")
    assert b.metadata["steps"] == "3"
    torch.testing.assert_close(b.vectors["clip_l"], a, rtol=1e-4, atol=1e-5)
    init = cfgmod.load_config(one / "run.toml").concepts[0]
    assert init.init_word == "thing" and not torch.allclose(a, b.vectors["clip_l"] * 0)  # it trained


def test_a_failing_rank_stops_the_job_with_its_error_and_finished_files_stay_valid(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    body = WORLD.format(steps=3, batch=2).replace('images = "blue-star"', 'images = "broken"')
    proc = _torchrun(tmp_path, _write(tmp_path, body))
    assert proc.returncode != 0
    assert "w-star: no readable images in folder" in proc.stderr, proc.stderr[-3000:]
    for f in (tmp_path / "out" / "embeddings").glob("*.safetensors"):  # what was written is whole
        assert load_embedding(f).vectors["clip_l"].shape[0] == 1
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_the_console_script_is_declared():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, _, func = scripts["inversion-train"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_an_sdxl_diffusers_folder_trains_both_encoders(tmp_path):
    """An SDXL pipeline folder: vectors for clip_l and clip_g, pooled from clip_g, with SDXL's size conditioning."""
    from tiny_models import tiny_sdxl_pipeline_folder

    pipe = tiny_sdxl_pipeline_folder(str(tmp_path / "model"))
    body = WORLD.format(steps=2, batch=1).replace('"miniature-world"', json.dumps(pipe))
    body = body.replace("[defaults]", "[defaults]\nsize = 32").replace('init_word = "thing"', 'init_word = "cat"')
    body = body.split("[[concepts]]")
    assert main([str(_write(tmp_path, "[[concepts]]".join(body[:2]))), "--quiet", "--threads", "1"]) == 0
    emb = load_embedding(tmp_path / "out" / "embeddings" / "w-crescent.safetensors")
    assert emb.metadata["model_family"] == "SDXL"
    assert emb.vectors["clip_l"].shape == (1, 32) and emb.vectors["clip_g"].shape == (1, 48)
