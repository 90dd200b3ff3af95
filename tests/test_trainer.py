"""The training core on tiny real-architecture models (transformers CLIPTextModel + a cross-attention denoiser)."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch

from inversion.embedding import LearnedEmbedding
from inversion.methods.init import from_text, make_embedding, random_init, vocab_mean_norm
from inversion.trainer import (TrainConfig, Trainer, TrainingDiverged, lr_at,
                               prepare_concept)
from tiny_models import concept_images

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _trainer(world, steps=30, k=2, **cfg):
    emb = make_embedding(world.text, "toy", init_word="toy", k=k)
    concept = prepare_concept(world.latents, concept_images(4), emb)
    return Trainer(world.text, world.denoiser, [concept], TrainConfig(steps=steps, batch_size=4, **cfg))


def test_loss_falls(tiny):
    tr = _trainer(tiny, steps=40, lr=5e-2)
    before = tr.evaluate()
    res = tr.run()
    after = tr.evaluate()
    assert res.steps_done == 40 and len(res.history.loss) == 40
    assert all(math.isfinite(x) for x in res.history.loss)
    assert after < before - 1e-3, (before, after)


def test_only_learned_vectors_change(tiny):
    tables = {e.key: e.token_table().detach().clone() for e in tiny.text.encoders}
    net = {k: v.clone() for k, v in tiny.net.state_dict().items()}
    te = {k: v.clone() for k, v in tiny.encoder.model.state_dict().items()}
    tr = _trainer(tiny, steps=5, lr=1e-1)
    init = {k: v.clone() for k, v in tr.params.items()}
    tr.run()
    for e in tiny.text.encoders:
        assert torch.equal(e.token_table(), tables[e.key])  # every row bit-identical
        assert e.token_table().grad is None
    assert all(torch.equal(v, net[k]) for k, v in tiny.net.state_dict().items())
    assert all(torch.equal(v, te[k]) for k, v in tiny.encoder.model.state_dict().items())
    assert not any(p.grad is not None for p in tiny.net.parameters())
    assert not any(p.grad is not None for p in tiny.encoder.model.parameters())
    assert not torch.equal(tr.params["clip_l"], init["clip_l"])
    # optimiser state exists only for the K learned rows, never for the token table
    state = tr.optimizer.state_dict()
    assert {tuple(v.shape) for k, v in state.items() if k != "t"} == {(2, 32)}


def test_seeded_runs_are_reproducible_and_seeds_differ(tiny):
    a = _trainer(tiny, steps=6, seed=3).run().embedding.vectors["clip_l"]
    b = _trainer(tiny, steps=6, seed=3).run().embedding.vectors["clip_l"]
    c = _trainer(tiny, steps=6, seed=4).run().embedding.vectors["clip_l"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resume_continues_exactly(tiny):
    full = _trainer(tiny, steps=8, seed=1)
    full.run()
    part = _trainer(tiny, steps=8, seed=1)
    part.run(lambda info: info.step < 4)  # stop after step 4
    assert part.step == 4
    resumed = _trainer(tiny, steps=8, seed=1)
    resumed = Trainer(resumed.text, resumed.denoiser, resumed.concepts, resumed.config, resume=part.state())
    res = resumed.run()
    assert res.steps_done == 8 and res.history.step == list(range(1, 9))
    assert torch.allclose(resumed.params["clip_l"], full.params["clip_l"], atol=1e-6)


def test_callback_gets_plain_step_data_and_can_stop(tiny):
    seen = []
    tr = _trainer(tiny, steps=10)
    res = tr.run(lambda info: (seen.append(info), info.step < 3)[1])
    assert res.stopped_early and res.steps_done == 3 and len(seen) == 3
    info = seen[-1]
    assert info.total == 10 and len(info.timesteps) == 4 and len(info.grad_norms) == 4
    assert all(0 <= t < 1000 for t in info.timesteps)
    assert info.grad_norm > 0 and info.lr == pytest.approx(5e-3)
    assert set(info.vector_norms) == {"clip_l"} and len(info.vector_norms["clip_l"]) == 2


def test_exception_in_callback_keeps_last_good_vectors(tiny):
    tr = _trainer(tiny, steps=10, lr=1e-1)

    def cb(info):
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.run(cb)
    emb = tr.embeddings()[0]
    assert emb.metadata["steps"] == "2"
    assert torch.equal(emb.vectors["clip_l"], tr.params["clip_l"].detach())


def test_nan_loss_raises_clear_error_and_keeps_vectors(tiny, monkeypatch):
    tr = _trainer(tiny, steps=10)
    tr.run(lambda info: info.step < 2)
    good = tr.params["clip_l"].detach().clone()
    orig = tiny.denoiser.predict_eps
    monkeypatch.setattr(tiny.denoiser, "predict_eps", lambda *a: orig(*a) * float("nan"))
    with pytest.raises(ValueError, match="NaN") as ei:
        tr.run()
    assert isinstance(ei.value, TrainingDiverged)
    assert "learning rate" in str(ei.value)
    assert torch.equal(ei.value.embeddings[0].vectors["clip_l"], good)
    assert torch.equal(tr.params["clip_l"].detach(), good)


def test_text_encoder_runs_once_per_distinct_prompt(tiny):
    calls = []
    enc = tiny.encoder
    orig = enc.encode

    def counting(ids, slots, vectors):
        calls.append(ids.shape[0])
        return orig(ids, slots, vectors)

    enc.encode = counting
    tr = _trainer(tiny, steps=1, templates=("a photo of a {}",))
    tr.run()
    assert calls == [1]  # batch of 4, one template: encoded once


def test_sdxl_like_two_encoders_and_pooled(tiny_sdxl):
    emb = make_embedding(tiny_sdxl.text, "toy", init_text="red toy car")
    assert emb.num_vectors == 3 and emb.widths() == {"clip_l": 32, "clip_g": 48}
    tr = Trainer(tiny_sdxl.text, tiny_sdxl.denoiser, [prepare_concept(tiny_sdxl.latents, concept_images(2), emb)],
                 TrainConfig(steps=3, batch_size=2, lr=1e-1))
    res = tr.run()
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(res.embedding.vectors[key], emb.vectors[key])


def test_captions_masks_accumulation_and_schedules(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    imgs = concept_images(2)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    c = prepare_concept(tiny.latents, imgs, emb, captions=["a photo of <toy>", "a red <toy>"], masks=masks)
    assert c.latents.shape[0] == 4 and c.masks.shape == (4, 1, 16, 16) and len(c.captions) == 4
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=2, warmup_steps=2, lr_schedule="cosine", lr=1e-2)
    res = Trainer(tiny.text, tiny.denoiser, [c], cfg).run()
    assert res.history.lr[0] == pytest.approx(5e-3) and res.history.lr[1] == pytest.approx(1e-2)
    assert lr_at(cfg, 3) < 1e-2
    assert len(res.history.timesteps[0]) == 4  # 2 micro-batches of 2


def test_two_concepts_train_together(tiny):
    a = prepare_concept(tiny.latents, concept_images(2, seed=1), make_embedding(tiny.text, "a", init_word="cat"))
    b = prepare_concept(tiny.latents, concept_images(2, seed=2), make_embedding(tiny.text, "b", init_word="dog", k=2))
    res = Trainer(tiny.text, tiny.denoiser, [a, b], TrainConfig(steps=2, batch_size=2)).run()
    assert [e.name for e in res.embeddings] == ["a", "b"]
    assert [e.num_vectors for e in res.embeddings] == [1, 2]


def test_init_schemes(tiny):
    enc = tiny.encoder
    v = from_text(tiny.text, "red toy car")["clip_l"]
    ids = enc.tokenize("red toy car")
    assert v.shape == (3, 32) and torch.equal(v, enc.token_table()[ids].float())
    r = random_init(tiny.text, k=3)["clip_l"]
    assert torch.allclose(r.norm(dim=-1), torch.full((3,), vocab_mean_norm(enc)), rtol=1e-5)


# ---- bad input -------------------------------------------------------------------------------

def test_no_images_is_a_clear_error(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    with pytest.raises(ValueError, match="at least one image"):
        prepare_concept(tiny.latents, torch.zeros(0, 3, 16, 16), emb)


def test_k_zero_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="at least one"):
        make_embedding(tiny.text, "toy", k=0)
    with pytest.raises(ValueError, match="k = 0"):
        LearnedEmbedding("toy", {"clip_l": torch.zeros(0, 32)})


def test_width_mismatch_is_a_clear_error(tiny):
    emb = LearnedEmbedding("toy", {"clip_l": torch.zeros(1, 768)})
    c = prepare_concept(tiny.latents, concept_images(1), emb)
    with pytest.raises(ValueError, match="768-d but the encoder expects 32-d"):
        Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=1))


def test_missing_encoder_is_a_clear_error(tiny_sdxl, tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")  # clip_l only
    c = prepare_concept(tiny_sdxl.latents, concept_images(1), emb)
    with pytest.raises(ValueError, match="clip_g"):
        Trainer(tiny_sdxl.text, tiny_sdxl.denoiser, [c], TrainConfig(steps=1))


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(lr=0.0), "learning rate"),
    (dict(batch_size=0), "batch_size"),
    (dict(templates=("a photo",)), "exactly one"),
    (dict(lr_schedule="step"), "lr_schedule"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_caption_without_placeholder_is_a_clear_error(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    with pytest.raises(ValueError, match="placeholder"):
        prepare_concept(tiny.latents, concept_images(1), emb, captions=["a photo of a toy"])


def test_library_never_imports_comfyui():
    banned = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
              "execution", "node_helpers", "latent_preview"}
    offenders = []
    for path in (ROOT / "inversion").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in banned]
    assert not offenders, offenders
    assert len(list((ROOT / "inversion").rglob("*.py"))) >= 8  # the scan really saw the library


def test_checkpoint_files_resume_exactly_and_embedding_alone_resumes(tiny, tmp_path):
    from inversion.files.checkpoint import load_state, save_checkpoint, state_from_embedding, state_path_for
    from inversion.files.formats import load_embedding
    from inversion.methods.timesteps import Adaptive

    def make(**kw):
        emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
        c = prepare_concept(tiny.latents, concept_images(4), emb)
        return Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=8, batch_size=4, seed=2),
                       timesteps=Adaptive(1000, bins=4), **kw)

    full = make()
    full.run()
    saved = []
    part = make(checkpoint=lambda tr: saved.append(save_checkpoint(tr, [tmp_path / f"toy-{tr.step}"])))
    part.config = TrainConfig(steps=8, batch_size=4, seed=2, checkpoint_every=3)
    part.run(lambda info: info.step < 5)
    assert [p[0].name for p in saved] == ["toy-3.safetensors"]
    assert state_path_for(saved[0][0]).exists()
    emb = load_embedding(saved[0][0])  # a normal embedding file other UIs read
    assert emb.metadata["steps"] == "3" and emb.vectors["clip_l"].shape == (2, 32)
    resumed = make(resume=load_state(saved[0][0]))
    assert resumed.step == 3 and resumed.history.step == [1, 2, 3]
    resumed.run()
    assert torch.allclose(resumed.params["clip_l"], full.params["clip_l"], atol=1e-6)
    assert torch.equal(resumed.sampler.count, full.sampler.count)
    warm = make(resume=state_from_embedding(saved[0][0]))
    assert warm.step == 3 and torch.equal(warm.params["clip_l"].detach(), emb.vectors["clip_l"])
    assert warm.run().steps_done == 8


@pytest.mark.parametrize("flip", [True, False])
def test_empty_mask_error_names_the_image(tiny, flip):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    masks = torch.ones(5, 16, 16)
    masks[2] = 0  # image 3 of 5: e.g. a fully transparent image, or Load Image's (inverted) MASK
    masks[4] = 0
    with pytest.raises(ValueError, match=r"masks: the concept masks of image 3 of 5, image 5 of 5 are empty") as e:
        prepare_concept(tiny.latents, concept_images(5), emb, masks=masks, flip=flip)
    assert "Invert Mask" in str(e.value) and "remove that image" in str(e.value)


@pytest.mark.parametrize("template, words", [
    ("{} in {style}", ["'{} in {style}'", "'{style}'", "write '{} in style'", "'{{style}}'"]),
    ("a {0} photo", ["'{0}'", "write 'a {} photo'"]),
    ("a {!r}", ["'{!r}'", "write 'a {}'"]),
    ("a {:>9}", ["'{:>9}'"]),
    ("a { photo of {}", ["lone '{'", "'{{'"]),
    ("a photo of {}}", ["lone", "'}}'"]),
    ("a {} and a {}", ["has 2 '{}'"]),
    ("a photo", ["has no '{}'"]),
])
def test_templates_need_one_plain_field(template, words):
    from inversion.data.prompts import check_templates

    with pytest.raises(ValueError, match="exactly one") as e:
        check_templates(["a photo of {}", template])
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(templates=(template,)).validate()


def test_templates_may_have_literal_braces():
    from inversion.data.prompts import check_templates

    ok = ("{{style}} a photo of {}", "a {} in {{braces}}")
    assert check_templates(ok) == ok
    assert [t.format("<x>") for t in ok] == ["{style} a photo of <x>", "a <x> in {braces}"]


def test_norm_guard_warns_once_then_stops_and_keeps_the_last_sane_vectors(tiny):
    # lr 0.05 on the tiny model: the ratio climbs ~1.9, 2.9, 3.7, ... 6.3 (step 7): a warning, then a stop
    tr = _trainer(tiny, steps=40, lr=0.05, norm_warn=3.0, norm_stop=6.0)
    warned, seen = [], []

    def cb(info):
        seen.append(tr.norm_ratio()[0])
        warned.extend((info.step, w) for w in info.warnings)

    with pytest.raises(TrainingDiverged, match=r"exploded.*times the largest word.*Lower the learning rate") as e:
        tr.run(cb)
    assert len(warned) == 1 and "times the largest word" in warned[0][1]  # once, not every step
    assert seen[warned[0][0] - 1] > 3.0 >= max(seen[:warned[0][0] - 1], default=0)
    # rolled back to the last step within norm_warn: the step count, history and vectors agree
    sane = warned[0][0] - 1
    assert tr.step == sane and tr.history.step == list(range(1, sane + 1))
    assert tr.norm_ratio()[0] <= 3.0 and sane >= 1
    kept = e.value.embeddings[0]
    assert kept.metadata["steps"] == str(sane)
    assert torch.equal(kept.vectors["clip_l"], tr.params["clip_l"].detach().cpu())
    assert tr.state().optimizer == {}  # its moments belong to later steps: a resume restarts it


def test_norm_guard_is_off_at_zero_and_quiet_in_a_normal_run(tiny):
    quiet = _trainer(tiny, steps=10, lr=5e-3)
    assert not [w for info in [quiet.train_step() for _ in range(10)] for w in info.warnings]
    assert quiet.norm_ratio()[0] < 8
    off = _trainer(tiny, steps=5, lr=0.5, norm_warn=0, norm_stop=0)
    assert off.run().steps_done == 5
    with pytest.raises(ValueError, match="norm_stop >= norm_warn"):
        TrainConfig(norm_warn=10, norm_stop=5).validate()


def test_state_file_goes_where_asked_and_a_bad_one_says_what_to_do(tiny, tmp_path):
    from inversion.files.checkpoint import StateFileError, is_state_file, load_state, read_state_meta, save_checkpoint

    tr = _trainer(tiny, steps=2)
    tr.run()
    state = tmp_path / "runs" / "toy" / "state.safetensors"
    written = save_checkpoint(tr, [tmp_path / "emb" / "toy.safetensors"], state_path=state)
    assert [p.name for p in written] == ["toy.safetensors"] and is_state_file(state) and not is_state_file(written[0])
    assert read_state_meta(state)["embeddings_written"] == "1"
    assert not list((tmp_path / "emb").glob("*.state.*"))
    assert save_checkpoint(tr, [tmp_path / "other.safetensors"], state_path=state, write_embeddings=False) == []
    assert not (tmp_path / "other.safetensors").exists() and read_state_meta(state)["embeddings_written"] == "0"
    assert load_state(state).step == 2
    state.write_bytes(b"not a safetensors file")
    with pytest.raises(StateFileError, match="Delete it.*if_exists = overwrite"):
        load_state(state)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(state), metadata={"history": "{}"})
    with pytest.raises(StateFileError, match="not a state this trainer wrote"):
        load_state(state)


def test_names_ending_in_state_are_refused():
    from inversion.embedding import validate_name

    with pytest.raises(ValueError, match=r"ends in '\.state'.*choose a name without it"):
        validate_name("my-concept.State")
    assert validate_name("my.stately") == "my.stately"


# ---- dynamic loss scaling (fp16) -------------------------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward: what an fp16 UNet's backward overflow looks like."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _overflow_on(denoiser, monkeypatch, calls, kind="grad"):
    """Make the denoiser's ``calls``-th forward passes (1-based) overflow: in backward ("grad") or
    already in the loss ("loss")."""
    orig = denoiser.predict_eps
    n = [0]

    def predict_eps(*a):
        n[0] += 1
        out = orig(*a)
        if n[0] not in calls:
            return out
        return _InfGrad.apply(out) if kind == "grad" else out * float("inf")

    monkeypatch.setattr(denoiser, "predict_eps", predict_eps)


def test_loss_scale_none_and_dynamic_train_the_same_vectors_in_fp32(tiny):
    plain = _trainer(tiny, steps=4, seed=5)
    infos = []
    plain.run(infos.append)
    assert plain.scaler is None and all(i.loss_scale is None and not i.skipped for i in infos)
    assert not any(k.startswith("loss_scale.") for k in plain.state().optimizer)
    scaled = _trainer(tiny, steps=4, seed=5, loss_scale="dynamic")
    sinfos = []
    scaled.run(sinfos.append)
    assert [i.loss_scale for i in sinfos] == [2.0 ** 16] * 4 and not any(i.skipped for i in sinfos)
    # A power-of-two scale is exact in fp32: the same gradients, the same vectors, the same g(t).
    assert torch.equal(scaled.params["clip_l"], plain.params["clip_l"])
    assert [g for i in sinfos for g in i.grad_norms] == pytest.approx([g for i in infos for g in i.grad_norms],
                                                                      rel=1e-6)


def test_dynamic_loss_scale_skips_an_overflow_halves_and_grows_back(tiny, monkeypatch):
    tr = _trainer(tiny, steps=8, seed=1, loss_scale="dynamic")
    tr.scaler.growth_interval = 3
    _overflow_on(tiny.denoiser, monkeypatch, {2})  # step 2's backward overflows
    before = {}
    infos = []

    def cb(info):
        infos.append(info)
        before[info.step] = tr.params["clip_l"].detach().clone()

    tr.run(cb)
    skipped = [i.step for i in infos if i.skipped]
    assert skipped == [2]
    assert torch.equal(before[2], before[1])  # the skipped step left the vectors unchanged
    assert not torch.equal(before[3], before[2])  # and training went on
    assert all(torch.isfinite(v).all() for v in before.values())
    # 2**16 halves at the skip; 3 good steps in a row (3, 4, 5) double it, then (6, 7, 8) again
    assert [i.loss_scale for i in infos] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 15, 2.0 ** 16,
                                             2.0 ** 16, 2.0 ** 16, 2.0 ** 17]
    assert len(infos[1].warnings) == 1 and "skipped" in infos[1].warnings[0] and "bf16" in infos[1].warnings[0]
    assert infos[1].grad_norms == [0.0] * 4 and math.isfinite(infos[1].loss)
    assert tr.optimizer.t == 7  # the optimiser never saw the skipped step
    assert tr.sampler is not None and tr.history.step == list(range(1, 9))


def test_dynamic_loss_scale_skips_a_nan_loss_instead_of_stopping(tiny, monkeypatch):
    tr = _trainer(tiny, steps=3, loss_scale="dynamic")
    _overflow_on(tiny.denoiser, monkeypatch, {1}, kind="loss")
    infos = []
    res = tr.run(infos.append)
    assert [i.skipped for i in infos] == [True, False, False] and res.steps_done == 3
    assert infos[0].loss == 0.0 and infos[0].loss_scale == 2.0 ** 15  # never a NaN in a report
    assert all(torch.isfinite(v).all() for v in res.embedding.vectors.values())


def test_dynamic_loss_scale_gives_up_after_many_overflows_in_a_row(tiny):
    tr = _trainer(tiny, steps=40, loss_scale="dynamic")
    tr.run(lambda info: info.step < 2)
    good = tr.params["clip_l"].detach().clone()
    tr.scaler.scale = 2.0 ** 200  # loss * scale is inf in fp32: every step overflows
    with pytest.raises(TrainingDiverged, match="fp16") as ei:
        tr.run()
    assert "bf16" in str(ei.value) and "20 steps in a row" in str(ei.value)
    assert tr.step == 2 + 19 and tr.scaler.skips == 20
    assert torch.equal(ei.value.embeddings[0].vectors["clip_l"], good)
    assert torch.equal(tr.params["clip_l"].detach(), good)


def test_dynamic_loss_scale_resumes_exactly_through_checkpoint_files(tiny, tmp_path, monkeypatch):
    from inversion.files.checkpoint import load_state, save_checkpoint

    def make(resume=None, loss_scale="dynamic"):
        emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
        c = prepare_concept(tiny.latents, concept_images(4), emb)
        tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=8, batch_size=4, seed=2, loss_scale=loss_scale),
                     resume=resume)
        if tr.scaler is not None and resume is None:
            tr.scaler.growth_interval = 2
        return tr

    _overflow_on(tiny.denoiser, monkeypatch, {2})  # step 2's backward overflows
    full = make()
    full_infos = []
    full.run(full_infos.append)
    monkeypatch.undo()
    _overflow_on(tiny.denoiser, monkeypatch, {2})
    part = make()
    part.run(lambda info: info.step < 3)
    save_checkpoint(part, [tmp_path / "toy.safetensors"])
    state = load_state(tmp_path / "toy.safetensors")
    assert float(state.optimizer["loss_scale.scale"]) == part.scaler.scale == 2.0 ** 15
    assert int(state.optimizer["loss_scale.good"]) == 1
    monkeypatch.undo()
    _overflow_on(tiny.denoiser, monkeypatch, set())
    resumed = make(resume=state)
    resumed.scaler.growth_interval = 2  # a knob, not state (as the run's settings are)
    assert (resumed.scaler.scale, resumed.scaler.good, resumed.optimizer.t) == (2.0 ** 15, 1, 2)
    infos = []
    resumed.run(infos.append)
    assert [i.loss_scale for i in infos] == [i.loss_scale for i in full_infos[3:]]
    assert torch.equal(resumed.params["clip_l"], full.params["clip_l"])
    # a run without loss scaling ignores the scale in a state it resumes from
    plain = make(resume=load_state(tmp_path / "toy.safetensors"), loss_scale="none")
    assert plain.scaler is None and plain.optimizer.t == 2


# ---- per-image captions and aspect buckets ---------------------------------------------------

# What ConceptSet.draw gave before captions options and buckets existed (two concepts, one masked,
# batch 3, seed 7, steps 0-4): idx, templates, t, and the noise's sum. Recorded on the old code path.
_OLD_DRAWS = [
    ([3, 4, 4], ["a close-up photo of the <a>", "a photo of the cool <a>", "a bright photo of the <a>"],
     [329, 845, 565], 49.293442, 768.0),
    ([0, 0, 1], ["a cropped photo of the <a>", "a good photo of a <a>", "a rendering of a <a>"],
     [865, 380, 611], 43.349684, 768.0),
    ([3, 6, 8], ["a good photo of the <a>", "the photo of a <b>", "a photo of my <b>"], [625, 721, 355], 64.906215, 384.0),
    ([6, 1, 7], ["a rendering of a <b>", "a cropped photo of the <a>", "a rendition of the <b>"], [823, 995, 20],
     7.671215, 384.0),
    ([9, 4, 9], ["a photo of a nice <b>", "a photo of the cool <a>", "a cropped photo of a <b>"], [789, 905, 165],
     -5.464713, 384.0),
]


def _two_concepts(world, captions_a=None, **cfg):
    from inversion.data.prompts import CaptionOptions

    a = prepare_concept(world.latents, concept_images(3, seed=1), make_embedding(world.text, "a", init_word="cat"),
                        captions=captions_a)
    m = torch.zeros(2, 16, 16)
    m[:, 2:10, 2:10] = 1
    b = prepare_concept(world.latents, concept_images(2, seed=2), make_embedding(world.text, "b", init_word="dog", k=2),
                        masks=m)
    return Trainer(world.text, world.denoiser, [a, b],
                   TrainConfig(steps=3, batch_size=3, seed=7, captions=CaptionOptions(**cfg)))


@pytest.mark.parametrize("captions", [None, ["<a> one", "<a> two", "<a> three"]])
def test_square_draws_without_caption_options_are_as_before(tiny, captions):
    from inversion.data.batch import step_generator

    tr = _two_concepts(tiny, captions_a=captions)
    for step, (idx, prompts, t, noise, mask) in enumerate(_OLD_DRAWS):
        d = tr.data.draw(step_generator(7, step, 0), 3, tr.sampler.sample)
        assert d.idx.tolist() == idx and d.t.tolist() == t
        assert float(d.noise.double().sum()) == pytest.approx(noise, abs=1e-5) and float(d.mask.sum()) == mask
        if captions is None:
            assert d.prompts == prompts
        else:  # a's rows 0-5 (images, then flips) use their captions; b's still the same templates
            assert d.prompts == [captions[i % 3] if i < 6 else p for i, p in zip(idx, prompts)]


def test_captions_per_image_mix_with_templates(tiny):
    from inversion.data.batch import step_generator
    from inversion.data.prompts import OBJECT_TEMPLATES

    emb = make_embedding(tiny.text, "toy", init_word="toy")
    c = prepare_concept(tiny.latents, concept_images(4), emb, captions=["<toy> on grass", None, "red <toy>", None])
    assert c.captions == ["<toy> on grass", None, "red <toy>", None] * 2
    tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=3, batch_size=4))
    templated = {t.format("<toy>") for t in OBJECT_TEMPLATES}
    for step in range(10):
        d = tr.data.draw(step_generator(0, step, 0), 4, tr.sampler.sample)
        for i, p in zip(d.idx.tolist(), d.prompts):
            assert p == c.captions[i] if i % 2 == 0 else p in templated
    assert all(math.isfinite(x) for x in tr.run().history.loss)
    with pytest.raises(ValueError, match="must contain the placeholder '<toy>'"):
        prepare_concept(tiny.latents, concept_images(2), emb, captions=[None, "no concept here"])


def test_caption_shuffle_keeps_the_first_parts_and_is_fixed_by_seed_and_step(tiny):
    from inversion.data.batch import ConceptSet, step_generator
    from inversion.data.prompts import CaptionOptions, shuffle_caption

    g = torch.Generator().manual_seed(0)
    assert shuffle_caption("<t>, a, b", 3, g) == "<t>, a, b" and shuffle_caption("<t>, a", 1, g) == "<t>, a"
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    cap = "<toy>, red, on grass, at noon, small, blurry"
    c = prepare_concept(tiny.latents, concept_images(2), emb, captions=[cap, cap], flip=False)

    def prompts(keep, seed, step):
        data = ConceptSet(tiny.text, [c], ("a photo of {}",), captions=CaptionOptions(shuffle=True, keep=keep))
        return data.draw(step_generator(seed, step, 0), 2, lambda n, gen: torch.zeros(n, dtype=torch.long)).prompts

    seen = set()
    for step in range(12):
        p = prompts(2, 5, step)
        assert p == prompts(2, 5, step)  # the same (seed, step): the same order, so resume is exact
        for q in p:
            parts = q.split(", ")
            assert parts[:2] == ["<toy>", "red"] and sorted(parts) == sorted(cap.split(", "))
            seen.add(q)
    assert len(seen) > 5
    assert prompts(0, 5, 1) != prompts(0, 6, 1)


def test_caption_dropout_uses_templates_at_its_rate(tiny):
    from inversion.data.batch import ConceptSet
    from inversion.data.prompts import CaptionOptions

    emb = make_embedding(tiny.text, "toy", init_word="toy")
    c = prepare_concept(tiny.latents, concept_images(2), emb, captions=["<toy> x", "<toy> y"])
    data = ConceptSet(tiny.text, [c], ("a photo of {}",), captions=CaptionOptions(dropout=0.3))
    gen = torch.Generator().manual_seed(0)
    out = data.prompts(torch.randint(0, len(data), (4000,), generator=gen), gen)
    rate = out.count("a photo of <toy>") / len(out)
    assert 0.27 < rate < 0.33, rate
    none = ConceptSet(tiny.text, [c], ("a photo of {}",), captions=CaptionOptions(dropout=0.0))
    assert "a photo of <toy>" not in none.prompts(torch.arange(4), gen)


def _bucket_images():
    """Two square 16x16 images and two wide 12x20 ones (the tiny world's latents are its pixels)."""
    wide = torch.nn.functional.interpolate(concept_images(2, seed=3), size=(12, 20), mode="bilinear")
    return [*concept_images(2), wide[0], wide[1]]


def test_buckets_cache_latents_per_bucket_and_never_mix_in_a_batch(tiny):
    from inversion.data.batch import step_generator

    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    masks = [None, None, torch.ones(12, 20), torch.zeros(12, 20).index_fill_(1, torch.arange(10), 1.0)]
    c = prepare_concept(tiny.latents, _bucket_images(), emb, masks=masks,
                        captions=["<toy> a", None, "<toy> wide", None])
    assert [tuple(t.shape) for t in c.tables()] == [(4, 3, 16, 16), (4, 3, 12, 20)]
    assert [tuple(m.shape) for m in c.mask_tables()] == [(4, 1, 16, 16), (4, 1, 12, 20)]
    assert c.mask_tables()[0].min() == 1 and c.mask_tables()[1][1, 0, 0, 0] == 1 and c.mask_tables()[1][3, 0, 0, 0] == 0
    assert c.captions == ["<toy> a", None, "<toy> a", None, "<toy> wide", None, "<toy> wide", None] and len(c) == 8
    tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=3, batch_size=3, seed=2))
    shapes = set()
    for step in range(30):
        d = tr.data.draw(step_generator(2, step, 0), 3, tr.sampler.sample)
        b = tr.data.bucket[d.idx]
        assert (b == b[0]).all() and d.x0.shape[-2:] == d.mask.shape[-2:]
        for i, p in zip(d.idx.tolist(), d.prompts):
            assert p == c.captions[i] if c.captions[i] is not None else p.endswith("<toy>")
        shapes.add(tuple(d.x0.shape[-2:]))
    assert shapes == {(16, 16), (12, 20)}
    idx = tr.data.sample_rows(torch.Generator().manual_seed(0), 12, 3)
    assert all(len(set(tr.data.bucket[idx[s:s + 3]].tolist())) == 1 for s in range(0, 12, 3))
    with pytest.raises(ValueError, match="aspect buckets"):
        tr.data.latents  # noqa: B018
    same = prepare_concept(tiny.latents, list(concept_images(3)), emb)  # one size: one table, as a batch gives
    assert isinstance(same.latents, torch.Tensor)
    assert torch.equal(same.latents, prepare_concept(tiny.latents, concept_images(3), emb).latents)


def test_two_bucket_concept_trains_and_its_loss_falls(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    c = prepare_concept(tiny.latents, _bucket_images(), emb)
    tr = Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=40, batch_size=2, lr=5e-2))
    before = tr.evaluate()
    res = tr.run()
    after = tr.evaluate()
    assert res.steps_done == 40 and all(math.isfinite(x) for x in res.history.loss)
    assert after < before - 1e-3, (before, after)


def test_a_caption_too_long_is_an_error_before_training(tiny):
    emb = make_embedding(tiny.text, "toy", init_word="toy")
    long = "<toy> " + " ".join(["red"] * 200)
    c = prepare_concept(tiny.latents, concept_images(2), emb, captions=[long, None])
    with pytest.raises(ValueError, match="shorten the template or caption"):
        Trainer(tiny.text, tiny.denoiser, [c], TrainConfig(steps=1))


# ---- parameter groups (issue 24) -------------------------------------------------------------------

class _BiasGroup:
    """A toy second group: a per-channel bias added to the denoiser's output, stepped by plain SGD with
    momentum (its state), sitting out the first ``start`` steps."""

    name = "bias"
    max_grad_norm = 0.0

    def __init__(self, channels: int, lr: float = 0.05, start: int = 0):
        self.bias = torch.zeros(channels, requires_grad=True)
        self.momentum = torch.zeros(channels)
        self.lr, self.start = lr, start

    def parameters(self):
        return {"b": self.bias}

    def step(self, step):
        if step < self.start or self.bias.grad is None:
            return 0.0
        with torch.no_grad():
            self.momentum.mul_(0.9).add_(self.bias.grad)
            self.bias.sub_(self.lr * self.momentum)
        return self.lr

    def snapshot(self):
        return {"b": self.bias.detach().clone()}

    def restore(self, snap):
        with torch.no_grad():
            self.bias.copy_(snap["b"])

    def state_dict(self):
        return {"momentum": self.momentum.clone()}

    def load_state_dict(self, state):
        if state:
            self.momentum = state["momentum"].clone()

    def report(self):
        return {"bias_norm": float(self.bias.detach().norm())}


class _BiasedDenoiser:
    """The tiny denoiser with the group's bias on its epsilon."""

    def __init__(self, den, group):
        self.den, self.group, self.num_timesteps = den, group, den.num_timesteps

    def add_noise(self, x0, noise, t):
        return self.den.add_noise(x0, noise, t)

    def predict_eps(self, x_t, t, cond):
        return self.den.predict_eps(x_t, t, cond) + self.group.bias.view(1, -1, 1, 1)


def _group_run(tiny, steps, resume=None, start=2, group=None):
    group = group or _BiasGroup(3, start=start)
    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    concept = prepare_concept(tiny.latents, concept_images(4), emb)
    tr = Trainer(tiny.text, _BiasedDenoiser(tiny.denoiser, group), [concept],
                 TrainConfig(steps=steps, batch_size=2, seed=5, lr=5e-2), groups=[group], resume=resume)
    return tr, group


def test_a_second_parameter_group_trains_checkpoints_and_resumes_exactly(tiny, tmp_path):
    """A group beside the vectors: stepped with its own optimiser and schedule (here: from step 3), reported
    per step, saved in the checkpoint and resumed exactly; the vectors-only layout is unchanged."""
    from inversion.files.checkpoint import load_state, save_checkpoint

    full, g_full = _group_run(tiny, 6)
    infos = []
    full.run(infos.append)
    assert [i.groups["bias"]["lr"] for i in infos] == [0.0, 0.0, 0.05, 0.05, 0.05, 0.05]
    assert infos[-1].groups["bias"]["bias_norm"] > 0 and float(g_full.bias.detach().norm()) > 0

    part, _ = _group_run(tiny, 3)
    part.run()
    save_checkpoint(part, [tmp_path / "toy.safetensors"], state_path=tmp_path / "state.safetensors")
    state = load_state(tmp_path / "state.safetensors")
    assert set(state.groups) == {"bias"} and set(state.groups["bias"]) == {"param.b", "state.momentum"}
    resumed, g_res = _group_run(tiny, 6, resume=state)
    resumed.run()
    assert torch.equal(g_res.bias.detach(), g_full.bias.detach())
    assert torch.equal(resumed.embeddings()[0].vectors["clip_l"], full.embeddings()[0].vectors["clip_l"])
    emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
    with pytest.raises(ValueError, match="parameter groups \\['bias'\\] that this run does not train"):
        Trainer(tiny.text, tiny.denoiser, [prepare_concept(tiny.latents, concept_images(4), emb)],
                TrainConfig(steps=6, batch_size=2, seed=5), resume=state)


def test_a_diverged_step_rolls_every_group_back(tiny):
    """A NaN in the loss restores the vectors and the other group to the last good step."""
    tr, group = _group_run(tiny, 6, start=0)
    tr.train_step()
    tr.train_step()
    good_bias, good_vec = group.bias.detach().clone(), tr.params["clip_l"].detach().clone()
    with torch.no_grad():
        group.bias.fill_(float("nan"))  # as if the step had gone wrong
    with pytest.raises(TrainingDiverged, match="NaN/inf"):
        tr.train_step()
    assert torch.equal(group.bias.detach(), good_bias) and torch.equal(tr.params["clip_l"].detach(), good_vec)


def test_groups_are_checked_when_the_trainer_is_made(tiny):
    group = _BiasGroup(3)
    with pytest.raises(ValueError, match="distinct names"):
        _group_run(tiny, 2, group=type("V", (_BiasGroup,), {"name": "vectors"})(3))
    frozen = _BiasGroup(3)
    frozen.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        _group_run(tiny, 2, group=frozen)
    assert group.parameters()["b"].requires_grad


class _LateHalf:
    """A toy timestep strategy written only here: draws from the upper half of the schedule and leans
    toward whichever half of it showed the larger g. Nothing else in the library knows it exists."""

    reads_g = True

    def __init__(self, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        self.g = torch.ones(2)
        self.seen = 0

    def sample(self, n, generator):
        lo = self.num_timesteps // 2
        upper = torch.rand(n, generator=generator) < self.g[1] / self.g.sum()
        t = torch.randint(lo, lo + lo // 2, (n,), generator=generator)
        return torch.where(upper, t + lo // 2, t)

    def observe(self, t, g):
        half = (t >= self.num_timesteps * 3 // 4).long()
        self.g = 0.9 * self.g + 0.1 * torch.stack([g[half == i].mean() if (half == i).any() else self.g[i]
                                                    for i in range(2)])
        self.seen += len(t)

    def state_dict(self):
        return {"g": self.g.clone(), "seen": self.seen}

    def load_state_dict(self, state):
        self.g, self.seen = state["g"].clone(), state["seen"]

    def describe(self):
        return "late-half"

    def report(self):
        return {}


@pytest.mark.parametrize("reading", ["tokens", "context"])
def test_a_new_timestep_strategy_is_one_class(tiny, reading):
    """A strategy the library has never seen plugs in by declaring reads_g: it gets the run's g reading per
    sample, its draws are used, and its state resumes exactly."""
    def make(steps=6, resume=None):
        emb = make_embedding(tiny.text, "toy", init_word="toy", k=2)
        concept = prepare_concept(tiny.latents, concept_images(4), emb)
        sampler = _LateHalf(tiny.denoiser.num_timesteps)
        return Trainer(tiny.text, tiny.denoiser, [concept], TrainConfig(steps=steps, batch_size=4, seed=2,
                       g_reading=reading), timesteps=sampler, resume=resume), sampler

    full, sampler = make()
    res = full.run()
    drawn = [t for step in res.history.timesteps for t in step]
    assert len(drawn) == 6 * 4 and min(drawn) >= 500 and max(drawn) < 1000
    assert sampler.seen == 6 * 4 and torch.all(sampler.g > 0) and not torch.equal(sampler.g, torch.ones(2))
    assert full.reading.name == reading  # a sampler that reads g gets the run's reading, not the free one
    part, _ = make()
    part.run(lambda info: info.step < 3)
    resumed, again = make(resume=part.state())
    resumed.run()
    assert again.seen == 6 * 4 and torch.allclose(again.g, sampler.g)
    assert torch.allclose(resumed.params["clip_l"], full.params["clip_l"], atol=1e-6)


def test_a_strategy_that_does_not_say_whether_it_reads_g_is_refused(tiny):
    class Silent(_LateHalf):
        reads_g = None

    emb = make_embedding(tiny.text, "toy", init_word="toy")
    concept = prepare_concept(tiny.latents, concept_images(2), emb)
    with pytest.raises(TypeError, match="must declare reads_g"):
        Trainer(tiny.text, tiny.denoiser, [concept], TrainConfig(steps=2, batch_size=2), timesteps=Silent())
