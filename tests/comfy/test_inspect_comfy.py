"""Inspect Embedding inside a real ComfyUI: an embedding made from a known word reads as that word,
other trainers' files are read, a run's snapshots give the drift, a wrong model family is named."""

from __future__ import annotations

import pytest
import torch


def _nodes(comfyui):
    return comfyui.mod("nodes.embedding_nodes")


def _word_vectors(comfyui, clip, text: str, noise: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    """The CLIP's token rows of ``text`` (one vector per token), slightly moved."""
    host, init = comfyui.mod("nodes.comfy_host"), comfyui.mod("inversion.methods.init")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, rows in init.from_text(host.comfy_text_side(clip), text).items():
        out[key] = rows + noise * rows.norm(dim=-1, keepdim=True) * torch.randn(rows.shape, generator=g)
    return out


def _inspect(comfyui, clip, **inputs):
    nodes = _nodes(comfyui)
    inputs = {"file": nodes.FROM_INPUT, "neighbours": 5, **inputs}
    out = comfyui.harness.run_node(nodes.InspectEmbedding, clip=clip, **inputs)
    report, chart = out.args
    assert out.ui == {"text": [report]}
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[3] == 3 and chart.shape[1] >= 120
    assert chart.dtype == torch.float32 and float(chart.min()) >= 0.0 and float(chart.max()) <= 1.0
    return report, chart


def _vector_lines(report: str, key: str) -> list[str]:
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"[{key}]"))
    out = []
    for ln in lines[start + 1:]:
        if not ln.startswith("  v"):
            break
        out.append(ln)
    return out


def test_an_embedding_made_from_a_word_reads_as_that_word(comfyui, sd2):
    emb_mod = comfyui.mod("inversion.embedding")
    emb = emb_mod.LearnedEmbedding("inspect-dog", _word_vectors(comfyui, sd2.clip, "dog"),
                                   metadata={"init": "manual", "init_text": "dog"})
    report, _ = _inspect(comfyui, sd2.clip, embedding=emb)
    (line,) = _vector_lines(report, "clip_h")
    assert line.startswith("  v0: norm ") and "nearest 'dog' " in line
    nearest = line.split("nearest ", 1)[1]
    assert nearest.startswith("'dog' 1.000") and len(nearest.split(", ")) >= 5  # five words
    assert "cos to init 1.000" in line
    assert "initial vectors: recomputed from init text 'dog'" in report
    assert "snapshots: none in" in report
    assert "[clip_h] 48-d; norms of the 49408 vocabulary tokens: min " in report


def test_it_reads_an_a1111_pt_file_from_the_embeddings_folder(comfyui, sd2):
    vectors = _word_vectors(comfyui, sd2.clip, "dog cat", seed=1)["clip_h"]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                "name": "someone's cat", "step": 1500, "sd_checkpoint": "cc6cb27103"},
               f"{comfyui.embeddings_dir}/inspect-a1111.pt")
    nodes = _nodes(comfyui)
    assert nodes.InspectEmbedding.validate_inputs(file="inspect-a1111.pt") is True
    report, _ = _inspect(comfyui, sd2.clip, file="inspect-a1111.pt", neighbours=3)
    v0, v1 = _vector_lines(report, "clip_h")
    assert "nearest 'dog' " in v0 and v0.split("nearest ", 1)[1].startswith("'dog'")
    assert v1.split("nearest ", 1)[1].startswith("'cat'")
    assert "cos to init unknown" in v0 and "initial vectors: unknown (the file records no init_text)" in report
    assert report.startswith("Embedding 'inspect-a1111': 2 vector(s) for clip_h")
    assert "file: inspect-a1111.pt" in report
    assert "is not in models/embeddings" in nodes.InspectEmbedding.validate_inputs(file="nowhere.pt")


def test_sdxl_two_tensor_file_and_run_snapshots(comfyui, sdxl):
    formats, emb_mod = comfyui.mod("inversion.files.formats"), comfyui.mod("inversion.embedding")
    runs = comfyui.mod("nodes.run_files").runs_dir()
    final = _word_vectors(comfyui, sdxl.clip, "red dog")
    name = "inspect-xl"
    formats.save_embedding(emb_mod.LearnedEmbedding(name, final, metadata={"init_text": "red dog", "steps": "300"}),
                           f"{comfyui.embeddings_dir}/{name}", overwrite=True)
    early = _word_vectors(comfyui, sdxl.clip, "blue cat", seed=2)
    for step, vectors in ((200, {k: 0.5 * (v + early[k]) for k, v in final.items()}), (100, early)):
        formats.save_embedding(emb_mod.LearnedEmbedding(name, vectors), runs / name / "snapshots" / f"step-{step:06d}",
                               overwrite=True)
    report, chart = _inspect(comfyui, sdxl.clip, file=f"{name}.safetensors", neighbours=2)
    for key in ("clip_l", "clip_g"):
        v0, v1 = _vector_lines(report, key)
        assert v0.split("nearest ", 1)[1].startswith("'red'") and v1.split("nearest ", 1)[1].startswith("'dog'")
        assert "cos to init 1.000" in v0
        assert "drift (step: cos to final / norm) 100: " in v1 and ", 200: " in v1
    assert f"snapshots: 2 in {runs / name} (steps 100, 200)" in report
    plain, plain_chart = _inspect(comfyui, sdxl.clip, embedding=emb_mod.LearnedEmbedding("inspect-xl-copy", final))
    assert "drift" not in plain and chart.shape[1] > plain_chart.shape[1]  # the drift panel


def test_an_embedding_of_another_family_is_a_clear_error(comfyui, sd2):
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, f"{comfyui.embeddings_dir}/inspect-sd1.pt")
    with pytest.raises(ValueError, match=r"SD1\.x \(clip_l\) but this CLIP is SD2\.x \(clip_h\)"):
        _inspect(comfyui, sd2.clip, file="inspect-sd1.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 40)}}, f"{comfyui.embeddings_dir}/inspect-narrow.pt")
    with pytest.raises(ValueError, match="clip_h has 40 but the CLIP expects 48"):
        _inspect(comfyui, sd2.clip, file="inspect-narrow.pt")
    with pytest.raises(ValueError, match="embedding: connect an embedding, or choose a file"):
        _inspect(comfyui, sd2.clip)
