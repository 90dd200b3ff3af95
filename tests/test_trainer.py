"""The training core on tiny real-architecture models (transformers CLIPTextModel + a cross-attention denoiser)."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch

from inversion.embedding import LearnedEmbedding
from inversion.init import from_text, make_embedding, random_init, vocab_mean_norm
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
    from inversion.checkpoint import load_state, save_checkpoint, state_from_embedding, state_path_for
    from inversion.formats import load_embedding
    from inversion.timesteps import Adaptive

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
    from inversion.prompts import check_templates

    with pytest.raises(ValueError, match="exactly one") as e:
        check_templates(["a photo of {}", template])
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(templates=(template,)).validate()


def test_templates_may_have_literal_braces():
    from inversion.prompts import check_templates

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
    from inversion.checkpoint import StateFileError, is_state_file, load_state, read_state_meta, save_checkpoint

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
