"""Several concepts in one run from the graph (issue 13 item 3): Add Concept nodes into the trainer.

- two concepts write two files, each loadable, each with its own vectors, trained in shared batches
  (every step's batch holds ``batch_size`` draws of each concept);
- Training Options' contrast is seeds/003 Eq. 2 across the concepts (``ConceptContrast``);
- two concepts of one name are refused, with what to do;
- Cancel leaves every existing file byte-identical, and resume continues the run exactly;
- the chart (final payload, live events, the PIL image, the JS maths) has a series per concept.
Everything trains the tiny SD2 model at 64 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from devtools import harness

STEPS = 4


def _nodes(comfyui):
    return {n.__name__: n for n in comfyui.mod("nodes").NODES}


def _images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _init(comfyui, clip, text: str):
    return harness.run_node(_nodes(comfyui)["CaptionInit"], clip=clip, mode="manual", text=text)[0]


def _add(comfyui, clip, name: str, *, seed: int = 1, text: str = "a red cup", upstream=None):
    """An Add Concept node's output: ``name`` with its own init and images, after ``upstream``."""
    extra = {} if upstream is None else {"concepts": upstream}
    return harness.run_node(_nodes(comfyui)["AddConcept"], init=_init(comfyui, clip, text), name=name,
                            images=_images(seed), **extra)[0]


def _train(comfyui, sd2, name: str, concepts=None, *, steps: int = STEPS, seed: int = 3, if_exists="overwrite",
           **options):
    inputs = harness.train_inputs(model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(0),
                                  init=_init(comfyui, sd2.clip, "a toy"), name=name, method="vanilla", steps=steps,
                                  batch_size=1, learning_rate=0.0, seed=seed, if_exists=if_exists, **options)
    if concepts is not None:
        inputs["concepts"] = concepts
    return harness.run_node(_nodes(comfyui)["TrainTextualInversion"], **inputs)


def _files(comfyui, *names: str) -> list[Path]:
    return [Path(comfyui.embeddings_dir) / f"{n}.safetensors" for n in names]


def _mean_norm(vectors: dict[str, torch.Tensor]) -> float:
    norms = [float(n) for v in vectors.values() for n in v.float().norm(dim=-1)]
    return sum(norms) / len(norms)


def test_two_concepts_write_two_files_with_their_own_vectors_in_shared_batches(comfyui, sd2):
    formats = comfyui.mod("inversion.files.formats")
    out = _train(comfyui, sd2, "duo-a", _add(comfyui, sd2.clip, "duo-b"))
    a, b = _files(comfyui, "duo-a", "duo-b")
    assert out.args[4].splitlines() == [str(a), str(b)] and out.args[2] == str(a)
    ea, eb = formats.load_embedding(a), formats.load_embedding(b)
    assert (ea.name, eb.name) == ("duo-a", "duo-b")
    assert ea.vectors["clip_h"].shape[0] == 2 and eb.vectors["clip_h"].shape[0] == 3  # "a toy", "a red cup"
    torch.testing.assert_close(out.args[0].vectors["clip_h"], ea.vectors["clip_h"])
    init_b = _init(comfyui, sd2.clip, "a red cup").vectors["clip_h"].float()
    assert not torch.allclose(eb.vectors["clip_h"], init_b)  # B's own rows were trained
    assert ea.metadata["steps"] == eb.metadata["steps"] == str(STEPS)
    assert ea.metadata["concepts"] == "duo-a,duo-b" and eb.metadata["images"] == "2"
    payload = out.ui["inversion_chart"][0]
    # shared batches: each step's UNet batch holds batch_size (1) draws of each of the 2 concepts
    assert [len(t) for t in payload["timesteps"]] == [2] * STEPS
    assert all(None not in row for row in payload["concept_loss"])
    # each file works in ComfyUI's own prompt syntax, and the two are different concepts
    def encode(text):
        with torch.inference_mode():
            return comfyui.nodes.CLIPTextEncode().encode(sd2.clip, text)[0][0][0]

    plain, via_a, via_b = encode("a photo of"), encode("a photo of embedding:duo-a"), encode("a photo of embedding:duo-b")
    assert (via_a - plain).abs().max() > 1e-4 and (via_b - plain).abs().max() > 1e-4
    assert not torch.allclose(via_a, via_b)


def test_contrastive_weight_with_two_concepts_is_eq2_across_them(comfyui, sd2, monkeypatch):
    regs = comfyui.mod("inversion.methods.regularizers")
    calls: list[tuple[str, int]] = []
    for cls in (regs.ConceptContrast, regs.VocabularyContrast):
        original = cls.__call__

        def spy(self, vectors, ctx, _original=original, _name=cls.__name__):
            calls.append((_name, len(ctx.concept_rows)))
            return _original(self, vectors, ctx)

        monkeypatch.setattr(cls, "__call__", spy)
    _train(comfyui, sd2, "eq2-a", _add(comfyui, sd2.clip, "eq2-b"), steps=2, contrastive_weight=0.01)
    assert calls == [("ConceptContrast", 2)] * 2
    calls.clear()
    _train(comfyui, sd2, "eq2-alone", steps=1, contrastive_weight=0.01)
    assert calls == [("VocabularyContrast", 1)]


def test_two_concepts_of_one_name_are_refused(comfyui, sd2):
    with pytest.raises(ValueError, match="given to more than one concept.*give each concept its own name"):
        _train(comfyui, sd2, "same-name", _add(comfyui, sd2.clip, "same-name"), steps=1)
    first = _add(comfyui, sd2.clip, "twice")
    with pytest.raises(ValueError, match="'twice' is given to more than one concept"):
        _add(comfyui, sd2.clip, "twice", seed=2, upstream=first)
    assert not _files(comfyui, "same-name")[0].exists()
    with pytest.raises(TypeError, match="connect the 'concepts' output of an Add Concept node"):
        _train(comfyui, sd2, "bad-wire", concepts=[1, 2], steps=1)


def test_cancel_leaves_every_existing_file_byte_identical_and_resume_finishes_exactly(comfyui, sd2, toasts):
    import comfy.model_management

    formats = comfyui.mod("inversion.files.formats")
    runs = comfyui.mod("nodes.run_files").runs_dir()
    _train(comfyui, sd2, "keep-a", _add(comfyui, sd2.clip, "keep-b"), steps=6)
    files = _files(comfyui, "keep-a", "keep-b")
    before = [f.read_bytes() for f in files]

    with pytest.MonkeyPatch.context() as mp:
        harness.cancel_at_step(mp, 2)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _train(comfyui, sd2, "keep-a", _add(comfyui, sd2.clip, "keep-b"), seed=5)
    assert [f.read_bytes() for f in files] == before
    for n in ("keep-a", "keep-b"):  # each concept's unfinished vectors wait in its own run folder
        assert formats.load_embedding(runs / n / f"{n}.safetensors").metadata["steps"] == "2"
    assert (runs / "keep-a" / "state.safetensors").is_file() and not (runs / "keep-b" / "state.safetensors").exists()
    assert any("keep-a.safetensors, keep-b.safetensors (an earlier run) unchanged" in p["message"]
               for e, p in toasts if e == "inversion.warning")

    with pytest.raises(ValueError, match="same concepts in the same order"):  # another order cannot resume it
        harness.run_node(_nodes(comfyui)["TrainTextualInversion"], **{
            **harness.train_inputs(model=sd2.model, clip=sd2.clip, vae=sd2.vae, images=_images(1),
                                   init=_init(comfyui, sd2.clip, "a red cup"), name="keep-b", method="vanilla",
                                   steps=STEPS, batch_size=1, learning_rate=0.0, seed=5, if_exists="resume"),
            "concepts": _add(comfyui, sd2.clip, "keep-a", seed=0, text="a toy")})

    done = _train(comfyui, sd2, "keep-a", _add(comfyui, sd2.clip, "keep-b"), seed=5, if_exists="resume")
    assert done.ui["inversion_chart"][0]["step"] == [1, 2, 3, 4]
    assert [f.read_bytes() for f in files] != before
    assert not (runs / "keep-a" / "keep-a.safetensors").exists()
    fresh = _train(comfyui, sd2, "keep-c", _add(comfyui, sd2.clip, "keep-d"), seed=5)
    for resumed, uninterrupted in zip(files, _files(comfyui, "keep-c", "keep-d")):
        torch.testing.assert_close(formats.load_embedding(resumed).vectors["clip_h"],
                                   formats.load_embedding(uninterrupted).vectors["clip_h"])
    torch.testing.assert_close(torch.tensor(done.ui["inversion_chart"][0]["concept_vector_norm"]),
                               torch.tensor(fresh.ui["inversion_chart"][0]["concept_vector_norm"]))


def test_resume_of_a_finished_two_concept_run_continues_exactly(comfyui, sd2):
    formats = comfyui.mod("inversion.files.formats")
    _train(comfyui, sd2, "more-a", _add(comfyui, sd2.clip, "more-b"), steps=2, seed=7)
    resumed = _train(comfyui, sd2, "more-a", _add(comfyui, sd2.clip, "more-b"), steps=STEPS, seed=7,
                     if_exists="resume")
    whole = _train(comfyui, sd2, "more-c", _add(comfyui, sd2.clip, "more-d"), steps=STEPS, seed=7)
    assert resumed.ui["inversion_chart"][0]["step"] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed.ui["inversion_chart"][0]["loss"], whole.ui["inversion_chart"][0]["loss"])
    for x, y in zip(_files(comfyui, "more-a", "more-b"), _files(comfyui, "more-c", "more-d")):
        assert formats.load_embedding(x).metadata["steps"] == str(STEPS)
        torch.testing.assert_close(formats.load_embedding(x).vectors["clip_h"], formats.load_embedding(y).vectors["clip_h"])


def test_the_chart_has_a_series_per_concept(comfyui, sd2, toasts):
    charts = comfyui.mod("inversion.charts")
    formats = comfyui.mod("inversion.files.formats")
    out = _train(comfyui, sd2, "chart-a", _add(comfyui, sd2.clip, "chart-b"))
    payload = out.ui["inversion_chart"][0]
    assert payload["concepts"] == ["chart-a", "chart-b"]
    assert [len(r) for r in payload["concept_vector_norm"]] == [2] * STEPS
    assert [len(r) for r in payload["concept_loss"]] == [2] * STEPS
    # what the curves show is what the files hold: each concept's mean vector norm at the last step
    for i, path in enumerate(_files(comfyui, "chart-a", "chart-b")):
        assert payload["concept_vector_norm"][-1][i] == pytest.approx(_mean_norm(formats.load_embedding(path).vectors))
    # and each concept's loss is the mean of its samples: the step's loss is their mean (one draw each)
    for row, loss in zip(payload["concept_loss"], payload["loss"]):
        assert sum(row) / 2 == pytest.approx(loss, rel=1e-5)
    live = [p for e, p in toasts if e == "inversion.progress" and p.get("kind") == "train"]
    assert [p["concepts"] for p in live] == [["chart-a", "chart-b"]] * STEPS
    assert [p["concept_vector_norm"] for p in live] == payload["concept_vector_norm"]
    single = {k: v for k, v in payload.items() if not k.startswith("concept")}
    assert not torch.equal(charts.loss_chart(payload), charts.loss_chart(single))  # the PIL chart draws them
    assert charts.concept_series(payload, "concept_vector_norm")[1] == ("chart-b", [r[1] for r in
                                                                                    payload["concept_vector_norm"]])


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_chart_reads_the_concept_series_as_the_library_does(tmp_path):
    """web/js/inversion/chart_math.js folds live events and reads outputs into the same per-concept series."""
    events = [{"kind": "train", "step": s, "loss": 1.0, "concepts": ["a", "b"],
               "concept_vector_norm": [0.1 * s, 0.2 * s], "concept_loss": [1.0, None if s == 2 else 2.0]}
              for s in (1, 2, 3)]
    output = {"kind": "train", "step": [1, 2, 3], "loss": [1.0] * 3, "concepts": ["a", "b"],
              "concept_vector_norm": [e["concept_vector_norm"] for e in events],
              "concept_loss": [e["concept_loss"] for e in events]}
    live_norm, live_loss, final_loss, single = harness.run_chart_js(
        tmp_path,
        f"let d = null; for (const e of {json.dumps(events)}) d = m.appendTrain(d, e);\n"
        f"const o = m.fromOutput({json.dumps(output)});\n"
        "const fix = (s) => s.map(([n, v]) => [n, v.map((x) => (Number.isFinite(x) ? x : null))]);\n"
        "console.log(JSON.stringify([fix(m.conceptSeries(d, 'concept_vector_norm')), fix(m.conceptSeries(d, "
        "'concept_loss')), fix(m.conceptSeries(o, 'concept_loss')), m.conceptSeries({concepts: ['a']}, 'x')]));\n")
    from inversion import charts  # the library alone (no ComfyUI needed)

    def py(key, d):
        return [[n, [None if v != v else v for v in vals]] for n, vals in charts.concept_series(d, key)]

    assert live_norm == py("concept_vector_norm", output)
    assert live_loss == final_loss == py("concept_loss", output)
    assert single == []
