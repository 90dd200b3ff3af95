"""The miniature world: its generator, the shipped model and judge, and the training script."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inversion.embedding import LearnedEmbedding
from inversion.host import Denoiser, TextEncoder, TextSide
from inversion.world import render
from inversion.world.render import (GENERIC, HELD_OUT, HIDDEN_SLOT, NAMED_SHAPES, SHAPES, caption, concept_set, sample_labels,
                                    training_batch)

# Stated accuracy of the shipped judge on fresh renders (it measures 1.00 on 512; see assets/judge.json).
JUDGE_MIN_ACCURACY = 0.97
INVERSION_TEST_STEPS = 60


@pytest.fixture(scope="module")
def world():
    from inversion.world import load_world

    return load_world()


def test_generator_is_deterministic():
    a_img, a_cap, a_lab = training_batch(np.random.default_rng(3), 8)
    b_img, b_cap, b_lab = training_batch(np.random.default_rng(3), 8)
    c_img, _, _ = training_batch(np.random.default_rng(4), 8)
    assert torch.equal(a_img, b_img) and a_cap == b_cap and a_lab == b_lab
    assert not torch.equal(a_img, c_img)
    assert a_img.shape == (8, 3, render.IMAGE_SIZE, render.IMAGE_SIZE)
    assert float(a_img.min()) >= 0 and float(a_img.max()) <= 1


def test_captions_never_name_the_held_out_shape():
    rng = np.random.default_rng(0)
    held, generic_named = [], 0
    for _ in range(600):
        s = sample_labels(rng)
        cap = caption(s, rng)
        if SHAPES[s.shape] == HELD_OUT:
            held.append(cap)
        elif f" {GENERIC}" in cap:
            generic_named += 1
    assert held and all(HELD_OUT not in c for c in held)
    assert all(not any(name in c.split() for name in NAMED_SHAPES) for c in held)
    # its training captions use the lost word's slot or the shared generic word, never a real word
    assert any(HIDDEN_SLOT in c for c in held) and any(f" {GENERIC}" in c for c in held)
    # "thing" is shared with named shapes, so it is not a name for the held-out one
    assert generic_named > len(held)
    full = caption(sample_labels(np.random.default_rng(1), shape=SHAPES.index("star"), colour=0, background=1, size=0))
    assert full == "a photo of a small red star on a gray background"


def test_concept_set_and_errors():
    imgs, samples = concept_set(5, seed=2, colour="yellow")
    assert imgs.shape[0] == 5 and all(s.shape_name == HELD_OUT and s.colour_name == "yellow" for s in samples)
    assert torch.equal(imgs, concept_set(5, seed=2, colour="yellow")[0])
    with pytest.raises(ValueError, match="colour"):
        concept_set(3, colour="teal")
    with pytest.raises(ValueError, match="backgrounds"):
        concept_set(3, colour="blue", backgrounds=("blue",))


def test_shipped_world_loads_and_judge_is_accurate(world):
    from inversion.world.judge import judge_accuracy

    assert world.encoder.key == "clip_l"
    assert isinstance(world.encoder, TextEncoder) and isinstance(world.text, TextSide)
    assert isinstance(world.denoiser, Denoiser) and world.denoiser.num_timesteps == 1000
    acc = judge_accuracy(world.judge, n=128, seed=777, image_size=world.image_size)
    assert min(acc.values()) >= JUDGE_MIN_ACCURACY, acc
    norms = world.vocab_norms()
    assert len(norms) == len(set(world.word_ids())) and float(norms.min()) > 0
    # no word of the tokenizer names the held-out shape
    assert len(world.encoder.tokenize(HELD_OUT)) > 1 and len(world.encoder.tokenize(HIDDEN_SLOT)) > 1


def test_judge_answers_none_for_what_is_no_shape(world):
    """Fresh renders (seeds the training never saw) are named, never "none"; off-distribution images
    (irregular polygons, blobs, ellipses, cut discs, blends, empty backgrounds) are called "none"."""
    from inversion.world.judge import NONE, OFF_KINDS, confusion

    c = confusion(world.judge, n=96, seed=777, image_size=world.image_size)
    assert c["renders_shape_accuracy"] >= JUDGE_MIN_ACCURACY and c["renders_called_none"] <= 0.02, c
    assert c["off_called_a_shape"] <= 0.05, c
    assert set(c["off_called_a_shape_per_kind"]) == set(OFF_KINDS) and NONE in c["rows"]


def test_world_noise_schedule_is_stable_diffusions():
    """World v2 uses SD's scaled-linear betas, so seeds/000's timestep indices mean SD's noise levels:
    log-SNR at t=400 is -0.30 (world v1's cosine schedule reached that only at t~544)."""
    import math

    from inversion.world.model import WorldConfig

    abar = WorldConfig().schedule_obj().alphas_cumprod
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))

    def log_snr(t: int) -> float:
        return math.log(float(abar[t]) / (1 - float(abar[t])))

    assert log_snr(400) == pytest.approx(-0.304, abs=0.002)
    assert log_snr(0) == pytest.approx(7.07, abs=0.01) and log_snr(999) == pytest.approx(-5.36, abs=0.01)


def test_text_reaches_the_unet_only_through_cross_attention(world):
    """As in SD1.x/SD2.x: with every cross-attention output zeroed, the prompt no longer matters
    (world v1 also fed a pooled text summary into every block)."""
    import copy

    from inversion.world.unet import Attention

    unet = copy.deepcopy(world.unet)
    x = torch.randn(2, 3, world.image_size, world.image_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    a = world.conditioning(["a photo of a red star", "a photo of a blue circle"]).context
    b = world.conditioning(["a photo of a big green cross on a white background", ""]).context
    assert not torch.allclose(unet(x, t, a), unet(x, t, b))
    for m in unet.modules():
        if isinstance(m, Attention) and m.cross:
            torch.nn.init.zeros_(m.out.weight)
            torch.nn.init.zeros_(m.out.bias)
    torch.testing.assert_close(unet(x, t, a), unet(x, t, b))


def test_placeholder_vectors_plug_in_like_words(world):
    """A learned vector equal to a word's token row conditions the model exactly as the word does."""
    star = world.encoder.tokenize("star")
    assert len(star) == 1
    emb = LearnedEmbedding("probe", {"clip_l": world.encoder.token_table()[star].detach().clone()}, "<probe>")
    a = world.conditioning(["a photo of a big red <probe> on a black background"], emb).context
    b = world.conditioning(["a photo of a big red star on a black background"]).context
    torch.testing.assert_close(a, b)


def test_generation_follows_the_caption(world):
    """Few images, few DDIM steps: the judge still reads the asked attributes far above chance."""
    from inversion.world.evaluate import caption_accuracy

    acc = caption_accuracy(world, n=14, seed=5, steps=8)
    # the shipped world scores 1.00 on each with 64 images and 20 steps (docs/results/world_curve.md)
    assert acc["colour"] >= 0.85 and acc["background"] >= 0.85, acc  # chance: 1/7
    assert acc["shape"] >= 0.85, acc  # chance: 1/7; the bar of issue 12 is 0.90 at 64 images
    assert acc["size"] >= 0.85, acc  # chance: 1/2


def test_the_deleted_word_draws_the_held_out_shape(world):
    """The reference row's ceiling: the model's own deleted word gives crescents (bar: >= 0.85)."""
    from inversion.world.evaluate import lost_word_rate

    assert lost_word_rate(world, n=16, steps=8) >= 0.85


def test_training_script_round_trip(tmp_path):
    """Two steps of each training loop write assets that ``load_world`` reads back."""
    from inversion.world import load_world
    from inversion.world.judge import JudgeTrainConfig
    from inversion.world.model import TextConfig, WorldConfig
    from inversion.world.train import WorldTrainConfig, train_and_save_judge, train_world
    from inversion.world.unet import UNetConfig

    cfg = WorldConfig(text=TextConfig(hidden=32, layers=1, heads=2, intermediate=64),
                      unet=UNetConfig(base=16, context_dim=32, heads=2))
    train_world(str(tmp_path), cfg, WorldTrainConfig(steps=2, batch_size=4, warmup=1), log=None)
    train_and_save_judge(str(tmp_path), cfg, JudgeTrainConfig(steps=2, batch_size=8), log=None)
    w = load_world(tmp_path)
    assert w.encoder.width == 32 and w.unet.config.base == 16
    out = w.generate(["a photo of a red star"], steps=2)
    assert out.shape == (1, 3, w.image_size, w.image_size) and torch.isfinite(out).all()


def test_ddim_recovers_the_point_an_ideal_denoiser_knows():
    """With the exact eps of a one-point data distribution, DDIM lands on that point (any guidance)."""
    from inversion.host import Conditioning
    from inversion.hosts.hf import ScheduledDenoiser
    from inversion.schedule import DDPMSchedule
    from inversion.world.sample import ddim_sample

    sched = DDPMSchedule.make(1000, "cosine")
    target = torch.linspace(-0.8, 0.8, 3 * 4 * 4).view(1, 3, 4, 4)

    def ideal(x, t, context, pooled):
        a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    den = ScheduledDenoiser(ideal, sched)
    cond = Conditioning(torch.zeros(2, 1, 4))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for guidance in (1.0, 4.0):
        out = ddim_sample(den, cond, cond, noise, steps=10, guidance=guidance)
        torch.testing.assert_close(out, target.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_short_inversion_fits_the_concept_images(world):
    """A short vanilla inversion from 4 concept images lowers the loss on fixed draws (the DVAR score:
    same images, noise and timesteps before and after) below the class word's, and the learned
    vector is no longer the class word's."""
    from inversion.methods.init import make_embedding
    from inversion.methods.presets import build_method
    from inversion.trainer import TrainConfig, Trainer, prepare_concept

    images, _ = concept_set(4, seed=0, size=world.image_size)
    emb = make_embedding(world.text, "probe", init_word=GENERIC, placeholder="<c>")
    data = prepare_concept(world.latents, images, emb)
    method = build_method("vanilla", world.text, world.denoiser.num_timesteps, init_vectors=emb.vectors)
    cfg = TrainConfig(steps=INVERSION_TEST_STEPS, batch_size=4, lr=5e-3, templates=world.templates, seed=0)
    tr = Trainer(world.text, world.denoiser, [data], cfg, timesteps=method.sampler, optimizer=method.optimizer)
    before = tr.evaluate(32, 12345)
    result = tr.run()
    after = tr.evaluate(32, 12345)
    # Measured on fixed sets of 8 to 128 draws: -2.2 % to -3.0 % after 60 steps (and no more after 120: the
    # rest of the loss is the model's own error). The earlier 3 % bar was met by the one set of draws the
    # score used before it became independent of the batch size; 1.5 % leaves room for the set's noise.
    assert after < 0.985 * before, (before, after)
    moved = torch.nn.functional.cosine_similarity(result.embedding.vectors["clip_l"], emb.vectors["clip_l"])
    assert float(moved.max()) < 0.99


def test_demo_runs_end_to_end(tmp_path, world):
    from inversion.demo import DemoConfig, run_demo
    from inversion.files.formats import load_embedding

    summary = run_demo(str(tmp_path), DemoConfig.quick(), world=world, log=lambda *a: None)
    emb = load_embedding(summary["embedding"])
    assert emb.vectors["clip_l"].shape == (1, world.encoder.width)
    assert (tmp_path / "demo_grid.png").stat().st_size > 0
    assert 0.0 <= summary["concept_rate"] <= 1.0 and summary["steps"] == DemoConfig.quick().steps
    said = []
    run_demo(str(tmp_path), DemoConfig.quick(steps=2, samples=1), world=world, log=said.append)
    assert any("replacing the earlier demo embedding" in s for s in said), said


def test_methods_benchmark_quick_writes_table_and_charts(tmp_path):
    """The README's measurement script in its smoke-test form: runs, measures the step costs in one
    process, writes its JSON, table and charts, and ``--replot`` rebuilds the same table from the files."""
    import json

    from benchmarks import world_methods as mod  # the repository root is on sys.path (pytest's pythonpath)

    mod.main(["--quick", "--only", "vanilla", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "world_methods.json").read_text())
    names = {r["variant"] for r in data["runs"]}
    assert "vanilla [0,1000)" in names and "reference: no inversion ('thing')" in names
    run = next(r for r in data["runs"] if r["variant"] == "vanilla [0,1000)")
    assert run["cell"] == "user-A" and run["steps"] == [0, 10, 20] and len(run["concept"]) == 3
    assert len(run["loss"]) == 20 and len(run["none"]) == 3 and 0.0 <= run["end"] <= 1.0
    assert len(data["profiles"]["A"]["mean"]) == 20
    costs = json.loads((tmp_path / "world_methods.costs.json").read_text())
    assert costs["seconds_per_step"]["user-A"]["vanilla [0,1000)"] > 0 and costs["profile_seconds"]["A"] > 0
    table = (tmp_path / "world_methods.md").read_text()
    assert "| vanilla [0,1000) |" in table and "### user-A:" in table
    for png in ("world_accuracy_timesteps_user-A.png", "world_accuracy_wall_clock_user-A.png", "world_gt_profile.png",
                "world_samples.png", "world_norms.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    (tmp_path / "world_methods.md").unlink()
    mod.replot(str(tmp_path))
    assert (tmp_path / "world_methods.md").read_text() == table


def test_fastest_study_quick_runs_both_stages_resumes_and_writes_its_tables(tmp_path, capsys):
    """Issue 28's study in its smoke-test form: both stages, the step costs in one process, the tables and
    the chart; a part run again skips the runs already in its file."""
    import argparse
    import json

    from benchmarks import world_fastest as mod
    from inversion.world import load_world

    mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "world_fastest.json").read_text())
    assert data["vanilla_best_lr"] == 5e-3 and data["base_lr"] == 5e-3
    rows = data["factors"]["A"]
    assert set(rows) == {mod.BASELINE, "adaptive + caption at 2x lr, warm-up + cosine"}
    combo = rows["adaptive + caption at 2x lr, warm-up + cosine"]
    assert "speedup" in combo and "d_end" in combo and 0.0 <= combo["d_end"]["p_holm"] <= 1.0
    assert combo["early"]["of"] == 1 and rows[mod.BASELINE]["cost"] > 0
    lr_run = next(r for r in data["runs"] if r["variant"] == mod.lr_name(5e-3))
    assert lr_run["steps"] == [0, 10, 20] and len(lr_run["loss"]) == 20 and lr_run["lr"] == 5e-3
    factor_run = next(r for r in data["runs"] if r["variant"] == "adaptive + caption at 2x lr, warm-up + cosine")
    assert factor_run["lr"] == 1e-2 and len(factor_run["score"]) == 20  # 2 x L, scored every step
    costs = json.loads((tmp_path / "world_fastest.costs.json").read_text())
    assert set(costs["seconds_per_step"]) == {r.name for s in ("lr", "factors") for r in mod.recipes(s)}
    assert costs["score_seconds"] > 0
    table = (tmp_path / "world_fastest.md").read_text()
    assert "### Task A:" in table and "| 0.005 |" in table and "### Task B:" not in table
    assert (tmp_path / "world_fastest_A.png").stat().st_size > 1000
    capsys.readouterr()
    args = argparse.Namespace(only=[mod.BASELINE], tasks=["A"], seeds=1, steps=20, n=8, ddim=6, images=5,
                              out=str(tmp_path))
    mod.run_stage(load_world(), args, "factors", 0, 1, 5e-3)
    assert "2 runs done, 0 to go" in capsys.readouterr().out  # both of the quick run's factor runs: none again


def test_speedup_is_the_ratio_of_median_seconds_and_never_is_zero():
    from benchmarks.world_fastest import speedup_ci

    base = {s: 10.0 + s for s in range(10)}  # median 14.5
    mine = {s: 2.0 + s / 10 for s in range(10)}  # median 2.45
    ratio, lo, hi = speedup_ci(base, mine)
    assert abs(ratio - 14.5 / 2.45) < 1e-9 and lo <= ratio <= hi
    assert speedup_ci(base, {s: float("inf") for s in range(10)})[0] == 0.0


def test_world_lora_quick_trains_the_lora_beside_the_vectors_and_pairs_the_arms(tmp_path):
    import json

    from benchmarks import world_lora as mod

    mod.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "world_lora.json").read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == {a.name for a in mod.arms()}
    assert runs[mod.ALONE]["loss"][0] == runs["+ LoRA 1e-3"]["loss"][0]  # the LoRA starts at zero
    row = data["summary"]["A"]["+ LoRA 1e-3"]
    assert {"d_end", "d_at_equal_time", "d_edit_both", "d_attribute"} <= set(row)
    costs = data["costs"]["seconds_per_step"]
    assert costs["+ LoRA 1e-3"] > 0 and costs[mod.ALONE] > 0
    assert "| + LoRA 1e-4 |" in (tmp_path / "world_lora.md").read_text()


def test_a_world_lora_trains_through_the_judges_unet_and_is_taken_off_after():
    from dataclasses import replace

    import torch

    from benchmarks import world_methods as wm
    from inversion.methods.init import from_word
    from inversion.world import GENERIC, load_world

    world = load_world()
    task, setting = wm.TASKS["A"], wm.SETTINGS["user"]
    images = wm.task_images(world, task, 5)
    arm = replace(next(v for v in wm.variants() if v.name == wm.DEFAULT), lora_lr=1e-2)
    profile = wm.measure_profile(world, images, from_word(world.text, GENERIC, 1), True, "tokens")
    before = {k: v.clone() for k, v in world.unet.state_dict().items()}
    group = wm.lora_group(world, arm, setting, seed=0)
    tr = wm.make_trainer(world, images, arm, setting, task, 0, profile, (group,))
    for _ in range(3):
        info = tr.train_step()
    assert info.groups["lora"]["delta_norm"] > 0 and len(group.paths) > 0
    assert any(".base_layer." in k for k in world.unet.state_dict())  # the UNet the judge samples with has it
    group.remove()
    after = world.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
