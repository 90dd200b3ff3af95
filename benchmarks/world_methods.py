"""The inversion methods measured on the miniature world (issues 7 and 12).

For each method (timestep strategy x optimiser x initialisation x regulariser) and >= 10 seeds, the
held-out shape is inverted from the same concept images and checked by the world's judge (which
may answer "none"):

- concept accuracy vs optimisation step: the share of images generated from "a photo of a <c>"
  that the judge reads as the held-out shape (seeds/000 Fig. 2a uses CLIP similarity instead),
  evaluated every 10 steps early in the run;
- paired differences against vanilla, seed by seed, with 95 % bootstrap intervals (final
  accuracy, mean accuracy over the run, edit faithfulness, norm); steps to a threshold per seed
  (median, bootstrap interval); the equal-wall-clock view (each method's measured step cost, plus
  the profiler's run for the methods that need a profile);
- prompt faithfulness: edited prompts ("a photo of a big <c> on a white background") scored on the
  requested attributes, with the concept kept (seeds/002's text alignment);
- the learned vector's norm against the norm range of the world's words (seeds/002 Fig. 1);
- DVAR's early stop (issue 14) on the deterministic score, for vanilla and the default method:
  where it would stop, the steps saved and the accuracy there; and best-score step against last;
- the g(t) curve the profiler measures on this model (seeds/000 Eq. 4, Fig. 1).

    python benchmarks/world_methods.py                 # every method, 10 seeds (see README for the time)
    python benchmarks/world_methods.py --quick         # 2 methods, 1 seed, a few steps (smoke test)

Writes docs/results/world_methods.json and PNG charts next to it, and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.world_stats import (area_under_curve, bootstrap_ci, median_ci, paired_difference,  # noqa: E402
                                    seconds_to_threshold, steps_to_threshold, value_at)
from inversion.charts import curves_chart, profile_chart  # noqa: E402
from inversion.embedding import LearnedEmbedding  # noqa: E402
from inversion.imageprep import to_pil  # noqa: E402
from inversion.init import from_text, from_word  # noqa: E402
from inversion.presets import PRESETS, MethodParams, build_method  # noqa: E402
from inversion.profiler import profile_gradients  # noqa: E402
from inversion.regularizers import ConceptContrast, L2ToInit, VocabularyContrast  # noqa: E402
from inversion.score import DVAR_THRESHOLD, DVAR_WINDOW, best_step, dvar_stop_index  # noqa: E402
from inversion.trainer import TrainConfig, Trainer, prepare_concept  # noqa: E402
from inversion.world import GENERIC, HELD_OUT, concept_set, load_world  # noqa: E402
from inversion.world.grid import image_grid  # noqa: E402
from inversion.world.render import SHAPES, render_batch, sample_labels  # noqa: E402

C = "<c>"
C2 = "<d>"  # the second concept of the two-concept rows
CONCEPT_COLOUR = "yellow"
SECOND = ("star", "blue")  # the second concept: blue stars (a named shape, so the judge can read it)
EDITS = (  # prompt, requested attributes
    (f"a photo of a big {C} on a white background", {"size": "big", "background": "white"}),
    (f"a photo of a small {C} on a black background", {"size": "small", "background": "black"}),
    (f"a photo of a purple {C}", {"colour": "purple"}),
)
BASELINE = "vanilla [0,1000)"
EARLY_STOP = ("vanilla [0,1000)", "adaptive")  # the rows DVAR's rule is measured on (score every step)


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    init: str = f"word:{GENERIC}"  # word:<w> (k copies), text:<caption> (one vector per token)
    interval: tuple[int, int] | None = None  # for preset "interval"
    single_t: int | None = None  # for preset "single_step" (None: the g(t) peak)
    group: str = "timesteps"
    reading: str = "context"  # seeds/000 Eq. 4's reading (adaptive, high_grad, profile)
    regularizer: str = ""  # "", "l2_init", "vocab_contrast"
    second_concept: bool = False  # train the blue-star concept in the same run
    concept_contrast: bool = False  # Eq. 2 across the two concepts (seeds/003)


def variants() -> list[Variant]:
    return [
        Variant(BASELINE, "vanilla"),  # also the class-word row of the init group
        Variant("interval [350,450] (paper's)", "interval", interval=(350, 450)),
        Variant("single t=400 (paper's)", "single_step", single_t=400),
        Variant("high-grad window", "high_grad"),
        Variant("adaptive", "adaptive"),
        Variant("adaptive (g w.r.t. tokens)", "adaptive", reading="tokens"),
        Variant("directional (DTI)", "directional", group="optimiser"),
        Variant("adaptive + DTI", "adaptive_directional", group="optimiser"),
        Variant(f"init caption '{CONCEPT_COLOUR} {GENERIC}'", "vanilla", init=f"text:{CONCEPT_COLOUR} {GENERIC}",
                group="init"),
        Variant("L2 to init (seeds/003)", "vanilla", regularizer="l2_init", group="regulariser"),
        Variant("two concepts, one run", "vanilla", second_concept=True, group="concepts"),
        Variant("two concepts + Eq. 2", "vanilla", second_concept=True, concept_contrast=True, group="concepts"),
    ]


@dataclass
class RunResult:
    variant: str
    seed: int
    steps: list[int] = field(default_factory=list)
    concept: list[float] = field(default_factory=list)  # held-out shape share per eval step
    concept_colour: list[float] = field(default_factory=list)  # shape and concept colour
    none: list[float] = field(default_factory=list)  # share the judge called "none" per eval step
    norm: list[float] = field(default_factory=list)
    cos_true: list[float] = field(default_factory=list)  # cosine to the held-out shape's lost word
    loss: list[float] = field(default_factory=list)
    edits: dict = field(default_factory=dict)
    train_seconds: float = 0.0  # optimisation only (no evaluation, no scoring)
    timesteps: str = ""
    second: float | None = None  # the second concept's accuracy (blue star), two-concept rows
    score: list[float] = field(default_factory=list)  # DVAR's deterministic score after every step
    early: dict = field(default_factory=dict)  # early-stop and best-step analysis
    samples: list = field(default_factory=list, repr=False)  # final images (concept prompt, first edit)
    final: object = field(default=None, repr=False)  # the learned LearnedEmbedding (not serialised)


SERIALISED = ("variant", "seed", "steps", "concept", "concept_colour", "none", "norm", "cos_true", "loss", "edits",
              "train_seconds", "timesteps", "second", "score", "early")


def run_to_dict(r: RunResult) -> dict:
    d = {k: getattr(r, k) for k in SERIALISED}
    d["loss"] = [round(x, 5) for x in r.loss]
    d["score"] = [round(x, 6) for x in r.score]
    return d


def init_vectors(world, spec: str) -> dict[str, torch.Tensor]:
    kind, _, text = spec.partition(":")
    if kind == "word":
        return from_word(world.text, text, 1)
    if kind == "text":
        return from_text(world.text, text)
    raise ValueError(f"init spec {spec!r}: use word:<w> or text:<caption>")


def judge_concept(world, emb, prompt: str, n: int, seed: int, ddim: int,
                  keep: list | None = None) -> tuple[float, float, dict]:
    imgs = world.generate([prompt] * n, emb, seed=seed, steps=ddim)
    if keep is not None:
        keep.append(imgs[:8])
    j = world.judge_images(imgs)
    shape = [s == HELD_OUT for s in j["shape"]]
    both = [s and c == CONCEPT_COLOUR for s, c in zip(shape, j["colour"])]
    return sum(shape) / n, sum(both) / n, j


def second_concept_images(n: int, size: int) -> torch.Tensor:
    """The second concept of the two-concept rows: ``n`` blue stars on varied backgrounds."""
    import numpy as np

    rng = np.random.default_rng(7)
    from inversion.world.render import COLOUR_NAMES

    samples = [sample_labels(rng, shape=SHAPES.index(SECOND[0]), colour=COLOUR_NAMES.index(SECOND[1]),
                             background=i % 3) for i in range(n)]
    return render_batch(samples, size)


def _regularizers(v: Variant) -> list:
    if v.regularizer == "l2_init":
        return [L2ToInit(1e-2)]
    if v.regularizer == "vocab_contrast":
        return [VocabularyContrast(1e-3)]
    if v.concept_contrast:
        return [ConceptContrast(1e-3)]
    return []


def run_one(world, concept_images, v: Variant, seed: int, args, profile) -> RunResult:
    vec = init_vectors(world, v.init)
    emb = LearnedEmbedding("concept", vec, C, {"init": v.init})
    concepts = [prepare_concept(world.latents, concept_images, emb, flip=True)]
    if v.second_concept:
        emb2 = LearnedEmbedding("second", init_vectors(world, v.init), C2)
        concepts.append(prepare_concept(world.latents, second_concept_images(len(concept_images), world.image_size),
                                        emb2, flip=True))
    params = MethodParams(interval=v.interval or (350, 450),
                          single_t=v.single_t if v.single_t is not None else args.peak_t)
    method = build_method(v.preset, world.text, world.denoiser.num_timesteps, params,
                          profile=profile[v.reading] if PRESETS[v.preset].needs_profile else None,
                          init_vectors=vec)
    lr = args.lr_dti if v.preset in ("directional", "adaptive_directional") else args.lr
    # Two concepts in one run: the same steps per concept, so each step's batch holds both.
    batch = args.batch * len(concepts)
    cfg = TrainConfig(steps=args.steps, batch_size=batch, lr=lr, templates=world.templates, seed=seed,
                      g_reading=v.reading)
    tr = Trainer(world.text, world.denoiser, concepts, cfg, timesteps=method.sampler, optimizer=method.optimizer,
                 regularizers=_regularizers(v))
    res = RunResult(v.name, seed, timesteps=method.sampler.describe())
    evals = sorted(set([0] + [s for s in args.evals if s <= args.steps] + [args.steps]))
    prompt = f"a photo of a {C}"
    scoring = v.name in EARLY_STOP and not args.quick
    trail: dict[int, LearnedEmbedding] = {}  # every step's vectors, for the early-stop analysis

    def evaluate(step: int) -> None:
        e = tr.embeddings()[0]
        keep = res.samples if step == args.steps and seed == 0 else None
        a, b, j = judge_concept(world, e, prompt, args.n, 1000 + seed, args.ddim, keep)
        res.steps.append(step)
        res.concept.append(a)
        res.concept_colour.append(b)
        res.none.append(sum(s == "none" for s in j["shape"]) / args.n)
        res.norm.append(float(e.norms()["clip_l"].mean()))
        if world.held_out_word is not None:
            vv = e.vectors["clip_l"].float()
            res.cos_true.append(float(torch.nn.functional.cosine_similarity(
                vv, world.held_out_word.float().expand_as(vv), dim=-1).max()))

    evaluate(0)
    t0 = time.time()
    spent = 0.0
    while tr.step < args.steps:
        info = tr.train_step()
        res.loss.append(info.loss)
        if scoring:
            spent += time.time() - t0
            res.score.append(tr.evaluate(4, 12345))  # DVAR's fixed draws (score.ScoreConfig's defaults)
            trail[tr.step] = tr.embeddings()[0]
            t0 = time.time()
        if tr.step in evals:
            spent += time.time() - t0
            evaluate(tr.step)
            t0 = time.time()
    spent += time.time() - t0
    res.train_seconds = round(spent, 2)
    res.final = tr.embeddings()[0]
    res.edits = judge_edits(world, res.final, seed, args, res.samples if seed == 0 else None)
    if v.second_concept:
        imgs = world.generate([f"a photo of a {C2}"] * args.n, tr.embeddings()[1], seed=3000 + seed, steps=args.ddim)
        j = world.judge_images(imgs)
        res.second = sum(s == SECOND[0] and c == SECOND[1] for s, c in zip(j["shape"], j["colour"])) / args.n
    if scoring:
        res.early = early_stop_analysis(world, res, trail, seed, args)
    return res


def early_stop_analysis(world, res: RunResult, trail: dict, seed: int, args) -> dict:
    """Where DVAR's rule (published TI setting, a score after every step) stops this run, and the
    accuracy there; and the accuracy of the best-scored step. Both evaluated like the curve."""
    steps = list(range(1, len(res.score) + 1))
    n_stop = dvar_stop_index(res.score, DVAR_WINDOW, DVAR_THRESHOLD)
    stop = steps[n_stop - 1] if n_stop else None
    best = best_step(steps, res.score)
    out = {"stop_step": stop, "best_step": best[0] if best else None, "budget": args.steps,
           "last_accuracy": statistics.fmean(res.concept[-3:])}
    prompt = f"a photo of a {C}"
    for key, step in (("stop", stop), ("best", out["best_step"])):
        if step is None:
            out[f"{key}_accuracy"] = None
            continue
        a, _, _ = judge_concept(world, trail[step], prompt, 3 * args.n, 1000 + seed, args.ddim)
        out[f"{key}_accuracy"] = a
    a, _, _ = judge_concept(world, trail[steps[-1]], prompt, 3 * args.n, 1000 + seed, args.ddim)
    out["last_accuracy_same_n"] = a  # the last step at the same sample size as stop/best
    return out


def judge_edits(world, emb: LearnedEmbedding | None, seed: int, args, keep: list | None = None) -> dict:
    """Each edited prompt scored on its requested attributes and on the concept being kept.
    Without ``emb`` the prompts use the word ``GENERIC`` instead of the placeholder."""
    out = {}
    for i, (p, want) in enumerate(EDITS):
        prompt = p if emb is not None else p.replace(C, GENERIC)
        _, _, j = judge_concept(world, emb, prompt, args.n, 2000 + seed, args.ddim, keep if i == 0 else None)
        attr = [all(j[k][m] == val for k, val in want.items()) for m in range(args.n)]
        kept = [s == HELD_OUT for s in j["shape"]]
        out[p] = {"attribute": sum(attr) / args.n, "concept": sum(kept) / args.n,
                  "both": sum(a and k for a, k in zip(attr, kept)) / args.n}
    return out


def reference_runs(world, args) -> list[RunResult]:
    """Rows to read the table against, evaluated like the methods (same seeds, prompts and images):
    no inversion ("a photo of a thing") and the model's own lost word for the shape (the vector it was
    trained with for every crescent, of any colour: a reference, not a ceiling, since an inversion
    fits these five yellow crescents more closely)."""
    refs = [("reference: no inversion ('thing')", None)]
    if world.held_out_word is not None:
        refs.append(("reference: the lost word", world.lost_word(C)))
    out = []
    for name, emb in refs:
        for seed in range(args.seeds):
            prompt = f"a photo of a {C}" if emb is not None else f"a photo of a {GENERIC}"
            a, b, j = judge_concept(world, emb, prompt, args.n, 1000 + seed, args.ddim)
            r = RunResult(name, seed, steps=[0], concept=[a], concept_colour=[b], timesteps="-",
                          none=[sum(s == "none" for s in j["shape"]) / args.n])
            r.norm = [float(emb.norms()["clip_l"].mean())] if emb is not None else [float("nan")]
            r.edits = judge_edits(world, emb, seed, args)
            out.append(r)
    return out


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def final_of(r: RunResult, last: int) -> float:
    """A run's final accuracy: the mean of its last ``last`` evaluations (one is a noisy estimate)."""
    return mean(r.concept[-last:])


def _edit(r: RunResult, key: str) -> float:
    return mean([e[key] for e in r.edits.values()])


PAIRED = {  # metric name -> per-run value, for the paired differences against vanilla
    "final": lambda r, last: final_of(r, last),
    "auc": lambda r, last: area_under_curve(r.steps, r.concept),
    "edit_both": lambda r, last: _edit(r, "both"),
    "edit_attribute": lambda r, last: _edit(r, "attribute"),
    "norm": lambda r, last: r.norm[-1],
}


def summarise(results: list[RunResult], names: list[str], last: int = 3, profile_seconds: dict | None = None,
              needs_profile: dict | None = None) -> dict:
    """Per method: accuracy curves averaged over seeds; final accuracy (mean of the last ``last``
    evaluations) with its bootstrap interval; paired differences against vanilla; steps (per seed)
    until the accuracy stays >= 90 % of the best method's final accuracy, and the wall clock that
    takes (step cost measured in this run, plus the profiler's cost where the method needs one)."""
    profile_seconds = profile_seconds or {}
    needs_profile = needs_profile or {}
    by = {n: [r for r in results if r.variant == n] for n in names}
    by = {n: rs for n, rs in by.items() if rs}
    trained = {n: rs for n, rs in by.items() if len(rs[0].steps) > 1}
    final_best = max(mean([final_of(r, last) for r in rs]) for rs in trained.values()) if trained else float("nan")
    thr = 0.9 * final_best
    base = {r.seed: r for r in by.get(BASELINE, [])}
    table = {}
    for n, rs in by.items():
        steps = rs[0].steps
        curve = [mean([r.concept[i] for r in rs]) for i in range(len(steps))]
        finals = [final_of(r, last) for r in rs]
        f_mean, f_lo, f_hi = bootstrap_ci(finals)
        row = {
            "steps": steps,
            "concept_mean": curve,
            "none_mean": [mean([r.none[i] for r in rs if r.none]) for i in range(len(steps))],
            "final_concept": f_mean, "final_concept_low": f_lo, "final_concept_high": f_hi,
            "final_concept_sd": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "final_concept_colour": mean([mean(r.concept_colour[-last:]) for r in rs]),
            "auc": area_under_curve(steps, curve) if len(steps) > 1 else None,
            "final_norm": mean([r.norm[-1] for r in rs]),
            "norm_mean": [mean([r.norm[i] for r in rs]) for i in range(len(steps))],
            "final_cos_to_lost_word": mean([r.cos_true[-1] for r in rs if r.cos_true]),
            "edit_attribute": mean([_edit(r, "attribute") for r in rs]),
            "edit_concept": mean([_edit(r, "concept") for r in rs]),
            "edit_both": mean([_edit(r, "both") for r in rs]),
            "second_concept": mean([r.second for r in rs if r.second is not None]),
            "timesteps": rs[0].timesteps,
            "seeds": len(rs),
        }
        if len(steps) > 1:
            per_seed = [steps_to_threshold(r.steps, r.concept, thr) for r in rs]
            med, lo, hi = median_ci(per_seed)
            sps = mean([r.train_seconds / max(1, r.steps[-1]) for r in rs])
            fixed = profile_seconds.get(n, 0.0) if needs_profile.get(n) else 0.0
            secs = [seconds_to_threshold(x, sps, fixed) for x in per_seed]
            row.update({"steps_to_threshold": per_seed, "steps_to_threshold_median": med,
                        "steps_to_threshold_low": lo, "steps_to_threshold_high": hi,
                        "reached": sum(not math.isinf(x) for x in per_seed),
                        "seconds_per_step": sps, "profile_seconds": fixed,
                        "seconds_to_threshold_median": median_ci(secs)[0],
                        "accuracy_at_vanilla_seconds": None})
            if base and n != BASELINE:
                row["paired"] = {k: paired_difference({r.seed: f(r, last) for r in rs},
                                                      {s: f(b, last) for s, b in base.items()})
                                 for k, f in PAIRED.items()}
        early = [r.early for r in rs if r.early]
        if early:
            row["early_stop"] = _early_summary(early)
        table[n] = row
    _equal_wall_clock(table)
    return {"threshold_90pct_of_best": thr, "best_final": final_best, "final_over_last_evals": last,
            "methods": table}


def _equal_wall_clock(table: dict) -> None:
    """Each method's seed-mean accuracy at the wall clock vanilla's whole run took (its own step
    cost, after paying for its profile): the equal-wall-clock view of the same runs."""
    if BASELINE not in table or "seconds_per_step" not in table[BASELINE]:
        return
    b = table[BASELINE]
    budget = b["seconds_per_step"] * b["steps"][-1]
    for row in table.values():
        if "seconds_per_step" not in row:
            continue
        seconds = [row["profile_seconds"] + s * row["seconds_per_step"] for s in row["steps"]]
        row["seconds"] = seconds
        row["accuracy_at_vanilla_seconds"] = (None if budget < seconds[0] else
                                              value_at(seconds, row["concept_mean"], budget))
    b["vanilla_budget_seconds"] = budget


def _early_summary(early: list[dict]) -> dict:
    stops = [e["stop_step"] for e in early]
    fired = [e for e in early if e["stop_step"] is not None]
    saved = [e["budget"] - e["stop_step"] for e in fired]
    d_stop = [e["stop_accuracy"] - e["last_accuracy_same_n"] for e in fired]
    d_best = [e["best_accuracy"] - e["last_accuracy_same_n"] for e in early if e["best_accuracy"] is not None]
    return {"runs": len(early), "fired": len(fired), "stop_steps": stops,
            "steps_saved": bootstrap_ci(saved) if saved else None,
            "accuracy_change_at_stop": bootstrap_ci(d_stop) if d_stop else None,
            "best_steps": [e["best_step"] for e in early],
            "accuracy_change_best_vs_last": bootstrap_ci(d_best) if d_best else None}


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None or x != x else ("never" if math.isinf(x) else fmt.format(x))


def _ci(m, lo, hi, fmt="{:+.2f}") -> str:
    return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(summary: dict, vocab: dict) -> str:
    m = summary["methods"]
    seeds = max((r["seeds"] for r in m.values()), default=0)
    lines = [
        "| method | timesteps | concept acc. (final) [95% CI] | + colour | judged 'none' | steps to threshold: median "
        "[95% CI] (seeds reached) | s to threshold | acc. at vanilla's wall clock | mean acc. over run | "
        "edit: attribute | edit: concept kept | edit: both | norm | cos to lost word |",
        "|---" * 14 + "|",
    ]
    for n, r in m.items():
        stt = "-"
        if "steps_to_threshold_median" in r:
            stt = (f"{_f(r['steps_to_threshold_median'], '{:.0f}')} [{_f(r['steps_to_threshold_low'], '{:.0f}')}, "
                   f"{_f(r['steps_to_threshold_high'], '{:.0f}')}] ({r['reached']}/{r['seeds']})")
        lines.append(
            f"| {n} | {r['timesteps']} | {r['final_concept']:.2f} [{r['final_concept_low']:.2f}, "
            f"{r['final_concept_high']:.2f}] | {r['final_concept_colour']:.2f} | {_f(r['none_mean'][-1])} | {stt} | "
            f"{_f(r.get('seconds_to_threshold_median'), '{:.1f}')} | {_f(r.get('accuracy_at_vanilla_seconds'))} | "
            f"{_f(r['auc'])} | {r['edit_attribute']:.2f} | {r['edit_concept']:.2f} | {r['edit_both']:.2f} | "
            f"{_f(r['final_norm'])} | {_f(r['final_cos_to_lost_word'])} |")
    lines += ["", f"Paired differences against {BASELINE}, seed by seed ({seeds} seeds; mean [95% bootstrap CI]; "
              "ahead/behind = seeds where the method is above/below vanilla):", "",
              "| method | final acc. | mean acc. over run | edit: both | edit: attribute | norm | ahead/behind (final) |",
              "|---|---|---|---|---|---|---|"]
    for n, r in m.items():
        p = r.get("paired")
        if not p:
            continue
        cells = [_ci(p[k]["mean"], p[k]["low"], p[k]["high"]) for k in ("final", "auc", "edit_both", "edit_attribute",
                                                                        "norm")]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {p['final']['ahead']}/{p['final']['behind']} |")
    two = {n: r for n, r in m.items() if r.get("second_concept") == r.get("second_concept")}
    if two:
        lines += ["", "Two concepts in one run (yellow crescent <c> and blue star <d>): <d>'s accuracy (blue star) "
                  + ", ".join(f"{n}: {r['second_concept']:.2f}" for n, r in two.items()) + "."]
    early = {n: r["early_stop"] for n, r in m.items() if r.get("early_stop")}
    if early:
        lines += ["", f"DVAR early stop (window {DVAR_WINDOW}, threshold {DVAR_THRESHOLD}, a score after every step; "
                  "accuracy on 3x the images, against the last step's):", "",
                  "| method | fired | steps saved [95% CI] | accuracy change at the stop [95% CI] | "
                  "best-score step vs last step [95% CI] |", "|---|---|---|---|---|"]
        for n, e in early.items():
            saved = _ci(*e["steps_saved"], fmt="{:.0f}") if e["steps_saved"] else "-"
            dstop = _ci(*e["accuracy_change_at_stop"]) if e["accuracy_change_at_stop"] else "-"
            dbest = _ci(*e["accuracy_change_best_vs_last"]) if e["accuracy_change_best_vs_last"] else "-"
            lines.append(f"| {n} | {e['fired']}/{e['runs']} | {saved} | {dstop} | {dbest} |")
    lines.append("")
    lines.append(f"Norms of the world's words: min {vocab['min']:.2f}, mean {vocab['mean']:.2f}, max {vocab['max']:.2f}"
                 + (f"; the lost word's norm {vocab['lost_word_norm']:.2f}" if vocab.get("lost_word_norm") else "")
                 + f". Threshold = 90% of the best final accuracy = {summary['threshold_90pct_of_best']:.2f}, reached "
                 f"when a seed's curve stays at or above it for 2 evaluations; final = mean of the last "
                 f"{summary['final_over_last_evals']} evaluations; CIs are 95% percentile bootstraps over seeds.")
    return "\n".join(lines)


def measure_profile(world, images, vectors: dict, quick: bool, reading: str = "context") -> "object":
    """g(t) (seeds/000 Eq. 4) on the concept images with ``vectors`` in the placeholder, 20 bins."""
    emb = LearnedEmbedding("concept", vectors, C)
    data = prepare_concept(world.latents, images, emb, flip=True)
    return profile_gradients(world.text, world.denoiser, [data], bins=20, samples_per_bin=4 if quick else 64,
                             batch_size=16, templates=world.templates, reading=reading)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--evals", type=int, nargs="+", default=[10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400])
    ap.add_argument("--batch", type=int, default=4)
    # Not the pack's 5e-3 (A1111/diffusers'): at 5e-3 vanilla inverts the shipped world's crescent in 100-150
    # steps (0.88-1.00 at step 100-150, 2 seeds), too fast to see convergence speed; at 2e-3 it takes hundreds.
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW rate")
    ap.add_argument("--lr-dti", type=float, default=1e-2, help="Riemannian SGD step in radians (DTI authors)")
    ap.add_argument("-n", type=int, default=24, help="generated images per evaluation")
    ap.add_argument("--ddim", type=int, default=10, help="DDIM steps per generated image")
    ap.add_argument("--images", type=int, default=5, help="concept images")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 20 steps: a smoke test")
    ap.add_argument("--replot", action="store_true",
                    help="rebuild the table and charts from OUT/world_methods.json without running anything")
    ap.add_argument("--out", default=os.path.join("docs", "results"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--world", default=None, help="world assets folder (default: the shipped model)")
    ap.add_argument("--judge", default=None, help="judge assets folder (default: the world's own)")
    ap.add_argument("--part", default=None, metavar="I/N",
                    help="run only every N-th method from the I-th (0-based) and write world_methods.part-I.json: "
                         "N single-thread processes use N cores without threads waiting on each other; --merge joins")
    ap.add_argument("--merge", type=int, default=0, metavar="N",
                    help="join OUT/world_methods.part-0..N-1.json into world_methods.json and redraw")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.out)
    if args.merge:
        return merge_parts(args.out, args.merge)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.evals, args.n, args.ddim = 1, 20, [10], 8, 6
        args.only = args.only or [BASELINE, "adaptive"]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    world = load_world(args.world, judge_folder=args.judge)
    images, _ = concept_set(args.images, seed=0, size=world.image_size, colour=CONCEPT_COLOUR)
    vs = [v for v in variants() if not args.only or any(s in v.name for s in args.only)]
    part, parts = (int(x) for x in args.part.split("/")) if args.part else (0, 1)
    vs = vs[part::parts]

    # g(t) with the class word in the placeholder, in both readings of Eq. 4: what the high-grad
    # window and the single-t peak come from (the adaptive sampler measures its own as it trains).
    profile, profile_seconds = {}, {}
    for reading in ("context", "tokens"):
        t0 = time.time()
        profile[reading] = measure_profile(world, images, from_word(world.text, GENERIC, 1), args.quick, reading)
        profile_seconds[reading] = round(time.time() - t0, 2)
    window = profile["context"].best_window(100)
    args.peak_t = int(profile["context"].centers()[int(profile["context"].mean.argmax())])
    print(f"g(t) profile: best 100-step window {window}, peak bin centre t={args.peak_t}; "
          f"{profile_seconds['context']:.1f} s")

    norms = world.vocab_norms()
    vocab = {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max()),
             "table_mean": float(world.encoder.token_table().norm(dim=-1).mean()),
             "lost_word_norm": None if world.held_out_word is None else float(world.held_out_word.norm())}

    results: list[RunResult] = reference_runs(world, args) if part == 0 else []
    for r in results[::args.seeds]:
        print(f"{r.variant:36s}: concept {r.concept[0]:.2f} none {r.none[0]:.2f} "
              f"edits {[round(e['both'], 2) for e in r.edits.values()]}")
    for v in vs:
        for seed in range(args.seeds):
            r = run_one(world, images, v, seed, args, profile)
            results.append(r)
            print(f"{v.name:36s} seed {seed}: concept {r.concept[-1]:.2f} (curve {['%.2f' % a for a in r.concept]}) "
                  f"norm {r.norm[-1]:.2f} edits {[round(e['both'], 2) for e in r.edits.values()]} "
                  f"{r.train_seconds:.0f}s" + (f" early {r.early}" if r.early else "")
                  + (f" second {r.second:.2f}" if r.second is not None else ""), flush=True)
    # seeds/000 Fig. 1 plots g(t) after optimisation: measure it again with a learned vector.
    after = next((r for r in results if r.variant == BASELINE and r.final is not None), None)
    profile_after = measure_profile(world, images, after.final.vectors, args.quick) if after else None
    name = f"world_methods.part-{part}.json" if args.part else "world_methods.json"

    out = {
        "config": {k: v for k, v in vars(args).items()},
        "profile": profile["context"].to_dict() | {"window": list(window), "peak_t": args.peak_t},
        "profile_tokens": profile["tokens"].to_dict() | {"window": list(profile["tokens"].best_window(100))},
        "profile_seconds": profile_seconds,
        "profile_after": None if profile_after is None else profile_after.to_dict() | {
            "window": list(profile_after.best_window(100)), "vector": f"{after.variant}, seed {after.seed}"},
        "vocab_norms": vocab,
        "runs": [run_to_dict(r) for r in results],
        "methods": [asdict(v) for v in vs],
        "needs_profile": {v.name: PRESETS[v.preset].needs_profile or v.single_t is None and v.preset == "single_step"
                          for v in vs},
        "edits": [p for p, _ in EDITS],
        "wall_seconds": round(time.time() - t_start, 1),
        "device": f"cpu x{torch.get_num_threads()} threads",
    }
    for key in ("profile", "profile_tokens", "profile_after"):
        if out[key]:
            out[key].pop("t", None)
            out[key].pop("g", None)
    firsts = [r for r in results if r.seed == 0 and len(r.samples) == 2]
    if firsts:
        rows = [images] + [torch.cat(r.samples) for r in firsts]
        labels = ["concept images"] + [f"{r.variant}: <c> | {EDITS[0][0][13:]}" for r in firsts]
        image_grid(rows, labels, scale=2).save(os.path.join(
            args.out, f"world_samples.part-{part}.png" if args.part else "world_samples.png"))
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))  # every curve of every run; the summary is world_summary.json
    if not args.part:
        replot(args.out)
    print(f"wrote {args.out}/{name} in {time.time() - t_start:.0f} s")
    return out


def merge_parts(out_dir: str, parts: int) -> dict:
    """Join the parts' runs into one world_methods.json (methods in the benchmark's order) and redraw."""
    datas = []
    for i in range(parts):
        with open(os.path.join(out_dir, f"world_methods.part-{i}.json"), encoding="utf-8") as f:
            datas.append(json.load(f))
    merged = dict(datas[0])
    order = [v.name for v in variants()]
    methods = sorted((m for d in datas for m in d["methods"]), key=lambda m: order.index(m["name"]))
    refs = [r for d in datas for r in d["runs"] if r["variant"].startswith("reference")]
    runs = sorted((r for d in datas for r in d["runs"] if not r["variant"].startswith("reference")),
                  key=lambda r: (order.index(r["variant"]), r["seed"]))
    merged.update(methods=methods, runs=refs + runs,
                  needs_profile={k: v for d in datas for k, v in d["needs_profile"].items()},
                  profile_after=next((d["profile_after"] for d in datas if d.get("profile_after")), None),
                  wall_seconds=max(d["wall_seconds"] for d in datas),
                  device=f"{parts} processes: " + datas[0]["device"])
    merged["config"] = dict(datas[0]["config"], part=None)
    with open(os.path.join(out_dir, "world_methods.json"), "w", encoding="utf-8") as f:
        json.dump(merged, f, separators=(",", ":"))
    _stack_samples(out_dir, parts)
    return replot(out_dir)


def _stack_samples(out_dir: str, parts: int) -> None:
    """The parts' sample grids one under the other, as world_samples.png."""
    from PIL import Image

    paths = [os.path.join(out_dir, f"world_samples.part-{i}.png") for i in range(parts)]
    grids = [Image.open(p).convert("RGB") for p in paths if os.path.isfile(p)]
    if not grids:
        return
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), (255, 255, 255))
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    canvas.save(os.path.join(out_dir, "world_samples.png"))
    for p in paths:
        if os.path.isfile(p):
            os.remove(p)


def replot(out_dir: str) -> dict:
    """Summary tables (printed and written as world_methods.md) and charts from world_methods.json."""
    from inversion.profiler import GradProfile

    with open(os.path.join(out_dir, "world_methods.json"), encoding="utf-8") as f:
        data = json.load(f)
    results = [RunResult(**r) for r in data["runs"]]
    names = list(dict.fromkeys(r.variant for r in results))
    variants_by = {m["name"]: m for m in data["methods"]}
    prof_s = data.get("profile_seconds", {})
    profile_seconds = {n: prof_s.get(m.get("reading", "context"), 0.0) for n, m in variants_by.items()}
    summary = summarise(results, names, profile_seconds=profile_seconds, needs_profile=data.get("needs_profile", {}))
    table = markdown(summary, data["vocab_norms"])
    print()
    print(table)
    with open(os.path.join(out_dir, "world_methods.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "world_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=lambda o: None)
    groups = {m["name"]: m["group"] for m in data["methods"]}
    profiles = [(GradProfile.from_dict(data[k]), tuple(data[k]["window"]), title) for k, title in (
        ("profile", f"g(t) w.r.t. c, class word '{GENERIC}' (before)"),
        ("profile_tokens", f"g(t) w.r.t. the token row, class word '{GENERIC}' (before)"),
        ("profile_after", "g(t) w.r.t. c, a learned vector (after)")) if data.get(k)]
    _plots(out_dir, summary, groups, profiles, data["vocab_norms"])
    return summary


def _pil(chart: torch.Tensor):
    """A chart image [H, W, 3] in [0, 1] as a PIL image."""
    return to_pil(chart.permute(2, 0, 1))


def _save(chart: torch.Tensor, path: str) -> None:
    _pil(chart).save(path)


def _plots(out, summary, groups: dict, profiles, vocab) -> None:
    from PIL import Image

    m = summary["methods"]
    refs = {n.replace("reference: ", ""): r["final_concept"] for n, r in m.items() if n.startswith("reference")}
    for group, fname, title in (("timesteps", "world_accuracy_timesteps.png", "timestep strategies"),
                                ("optimiser", "world_accuracy_optimiser.png", "Directional TI vs AdamW"),
                                ("init", "world_accuracy_init.png", "initialisation"),
                                ("regulariser", "world_accuracy_regularisers.png", "regularisers"),
                                ("concepts", "world_accuracy_concepts.png", "two concepts in one run")):
        names = [n for n, g in groups.items() if n in m and (g == group or (group != "timesteps"
                                                                             and n.startswith("vanilla")))]
        if not names:
            continue
        _save(curves_chart({n: m[n]["concept_mean"] for n in names}, m[names[0]]["steps"], references=refs,
                           title=f"concept accuracy vs optimisation step (mean of seeds): {title}"),
              os.path.join(out, fname))
    if profiles:
        imgs = [profile_chart(p, window=w, title=t, width=640, height=360) for p, w, t in profiles]
        pil = [_pil(i) for i in imgs]
        canvas = Image.new("RGB", (sum(p.width for p in pil), max(p.height for p in pil)), (255, 255, 255))
        x = 0
        for p in pil:
            canvas.paste(p, (x, 0))
            x += p.width
        canvas.save(os.path.join(out, "world_gt_profile.png"))
    names = [n for n in m if not n.startswith("reference") and m[n].get("norm_mean")]
    if names:
        refs = {"largest word norm": vocab["max"], "mean word norm": vocab["mean"]}
        if vocab.get("lost_word_norm"):
            refs["the lost word's norm"] = vocab["lost_word_norm"]
        _save(curves_chart({n: m[n]["norm_mean"] for n in names}, m[names[0]]["steps"], references=refs,
                           title="learned vector norm vs optimisation step (mean of seeds)"),
              os.path.join(out, "world_norms.png"))
    timed = {n: r for n, r in m.items() if r.get("seconds") and groups.get(n) == "timesteps"}
    if BASELINE in timed:
        budget = m[BASELINE]["vanilla_budget_seconds"]
        grid = [budget * i / 40 for i in range(41)]
        curves = {n: [value_at(r["seconds"], r["concept_mean"], x) if x >= r["seconds"][0] else r["concept_mean"][0]
                      for x in grid] for n, r in timed.items()}
        _save(curves_chart(curves, [round(x, 1) for x in grid], references=refs_acc(m),
                           title="concept accuracy vs wall clock (step cost + profile; mean of seeds)",
                           xlabel="seconds"),
              os.path.join(out, "world_accuracy_wall_clock.png"))


def refs_acc(m: dict) -> dict:
    return {n.replace("reference: ", ""): r["final_concept"] for n, r in m.items() if n.startswith("reference")}


if __name__ == "__main__":
    main()
