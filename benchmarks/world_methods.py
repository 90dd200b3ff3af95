"""The inversion methods measured on the miniature world (issues 7, 12 and 23).

Each method (timestep strategy x optimiser x initialisation x regulariser) inverts the world's
held-out shape from a few concept images, 10 seeds each, in four cells:

- **settings** ``user``: what a user of Train Textual Inversion gets by keeping its defaults (AdamW at
  its default rate, batch 1, 500 steps; ``TrainConfig`` / ``AdamW.default_lr``), and ``slow``: the
  earlier protocol's slower rate (AdamW 2e-3, batch 4, 400 steps), at which vanilla needs hundreds of
  steps;
- **tasks** ``A`` (five yellow crescents, concept images drawn with seed 0, run seeds 0-9) and ``B``
  (five green crescents, another draw of the images, run seeds 100-109): a claim must hold on both.

Per run, the world's judge (which may answer "none") reads the images generated from "a photo of a
<c>" at fixed steps: **concept accuracy** against step. Per method and cell:

- steps to the threshold (0.85, held for two evaluations) per seed, their median with a bootstrap
  interval, and **seconds** to it: steps x the method's step cost, measured for all methods of the cell
  in one process, interleaved round by round (``--costs``: never across processes), plus the
  profiler's run for the methods that need a profile;
- the mean accuracy over the run (the area under the curve: a speed measure) and the accuracy at the
  end (the last step, judged on 3x the images);
- paired differences against vanilla, seed by seed, with 95 % bootstrap intervals, an exact
  sign-flip permutation p-value, and Holm's correction over the cell's comparisons (each method
  against vanilla, and the default's g reading against the other);
- edit faithfulness (edited prompts scored on the requested attributes and on the concept kept), the
  learned vector's norm, and DVAR's early stop and the best-scored step for vanilla and the default.

    python benchmarks/world_methods.py --part 0/2 & python benchmarks/world_methods.py --part 1/2; wait
    python benchmarks/world_methods.py --costs          # step costs, one process, alone on the machine
    python benchmarks/world_methods.py --merge 2        # join, then tables and charts
    python benchmarks/world_methods.py --only adaptive --cells user-A   # a subset, in one process
    python benchmarks/world_methods.py --quick          # a smoke test (2 methods, 1 seed, a few steps)

Writes docs/results/world_methods.json (every curve of every run), world_methods.md and world_summary.json
(the tables), and PNG charts.
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

from benchmarks.world_stats import (area_under_curve, bootstrap_ci, holm, median_ci, paired_difference,  # noqa: E402
                                    seconds_to_threshold, sign_flip_p, steps_to_threshold, value_at)
from inversion.charts import curves_chart, profile_chart  # noqa: E402
from inversion.embedding import LearnedEmbedding  # noqa: E402
from inversion.lora import LoraGroup, LoraSpec  # noqa: E402
from inversion.data.imageprep import to_pil  # noqa: E402
from inversion.methods.init import from_text, from_word  # noqa: E402
from inversion.methods.optim import AdamW, RiemannianSGD  # noqa: E402
from inversion.methods.presets import PRESETS, MethodParams, build_method  # noqa: E402
from inversion.methods.profiler import profile_gradients  # noqa: E402
from inversion.methods.regularizers import L2ToInit  # noqa: E402
from inversion.methods.score import DVAR_THRESHOLD, DVAR_WINDOW, ScoreConfig, best_step, deterministic_score  # noqa: E402
from inversion.methods.score import dvar_stop_index  # noqa: E402
from inversion.trainer import TrainConfig, Trainer, prepare_concept  # noqa: E402
from inversion.world import GENERIC, HELD_OUT, concept_set, load_world  # noqa: E402
from inversion.world.grid import image_grid  # noqa: E402

C = "<c>"
EDITS = (  # prompt, requested attributes
    (f"a photo of a big {C} on a white background", {"size": "big", "background": "white"}),
    (f"a photo of a small {C} on a black background", {"size": "small", "background": "black"}),
    (f"a photo of a purple {C}", {"colour": "purple"}),
)
THRESHOLD = 0.85  # concept accuracy a run must hold for two evaluations to count as "there"
BASELINE = "vanilla [0,1000)"
DEFAULT = "adaptive (tokens; the default)"
OTHER_READING = "adaptive (context)"
EARLY_STOP = (BASELINE, DEFAULT)  # the rows DVAR's rule is measured on (score every step)


@dataclass(frozen=True)
class Setting:
    name: str
    lr: float  # AdamW
    lr_dti: float  # DTI's Riemannian SGD, radians per step
    batch: int
    steps: int
    evals: tuple[int, ...]


_DEF = TrainConfig()
SETTINGS = {
    # Train Textual Inversion's defaults: learning_rate 0 = the optimiser's own, batch_size 1, 500 steps
    "user": Setting("user", AdamW.default_lr, RiemannianSGD.default_lr, _DEF.batch_size, _DEF.steps,
                    (10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500)),
    # the earlier protocol: vanilla needs hundreds of steps at this rate
    "slow": Setting("slow", 2e-3, RiemannianSGD.default_lr, 4, 400, (10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400)),
}


@dataclass(frozen=True)
class Task:
    name: str
    colour: str
    image_seed: int  # the draw of the concept images
    first_seed: int  # run seeds first_seed .. first_seed + seeds - 1


TASKS = {"A": Task("A", "yellow", 0, 0), "B": Task("B", "green", 1, 100)}


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    init: str = f"word:{GENERIC}"  # word:<w> (k copies), text:<caption> ("{colour}" = the task's colour)
    interval: tuple[int, int] | None = None  # for preset "interval"
    single_t: int | None = None  # for preset "single_step"
    group: str = "timesteps"
    reading: str = "tokens"  # seeds/000 Eq. 4's reading (adaptive, high_grad)
    regularizer: str = ""  # "", "l2_init"
    settings: tuple[str, ...] = ("user",)  # the settings it runs at
    lora_lr: float = 0.0  # > 0: pivotal tuning, a LoRA (LoRA Options' rank 4, alpha 4) on the UNet at this rate


def variants() -> list[Variant]:
    both = ("user", "slow")
    return [
        Variant(BASELINE, "vanilla", settings=both),
        Variant(DEFAULT, "adaptive", reading="tokens", settings=both),
        Variant(OTHER_READING, "adaptive", reading="context", settings=both),
        Variant("high-grad window", "high_grad"),
        Variant("interval [350,450] (paper's)", "interval", interval=(350, 450)),
        Variant("directional (DTI)", "directional", group="optimiser"),
        Variant("init caption '{colour} thing'", "vanilla", init="text:{colour} " + GENERIC, group="init"),
    ]


def cell_name(setting: str, task: str) -> str:
    return f"{setting}-{task}"


def cells() -> list[tuple[str, str]]:
    return [(s, t) for s in SETTINGS for t in TASKS]


@dataclass
class RunResult:
    variant: str
    seed: int
    cell: str = ""
    steps: list[int] = field(default_factory=list)
    concept: list[float] = field(default_factory=list)  # held-out shape share per eval step
    concept_colour: list[float] = field(default_factory=list)  # shape and the concept's colour
    none: list[float] = field(default_factory=list)  # share the judge called "none" per eval step
    norm: list[float] = field(default_factory=list)
    cos_true: list[float] = field(default_factory=list)  # cosine to the held-out shape's lost word
    loss: list[float] = field(default_factory=list)
    end: float | None = None  # accuracy at the last step on 3x the images
    edits: dict = field(default_factory=dict)
    timesteps: str = ""
    score: list[float] = field(default_factory=list)  # DVAR's deterministic score after every step
    early: dict = field(default_factory=dict)  # early-stop and best-step analysis
    samples: list = field(default_factory=list, repr=False)  # final images (concept prompt, first edit)
    final: object = field(default=None, repr=False)  # the learned LearnedEmbedding (not serialised)


SERIALISED = ("variant", "seed", "cell", "steps", "concept", "concept_colour", "none", "norm", "cos_true", "loss",
              "end", "edits", "timesteps", "score", "early")


def run_to_dict(r: RunResult) -> dict:
    d = {k: getattr(r, k) for k in SERIALISED}
    d["loss"] = [round(x, 5) for x in r.loss]
    d["score"] = [round(x, 6) for x in r.score]
    return d


def init_vectors(world, spec: str, task: Task) -> dict[str, torch.Tensor]:
    kind, _, text = spec.format(colour=task.colour).partition(":")
    if kind == "word":
        return from_word(world.text, text, 1)
    if kind == "text":
        return from_text(world.text, text)
    raise ValueError(f"init spec {spec!r}: use word:<w> or text:<caption>")


def task_images(world, task: Task, n: int) -> torch.Tensor:
    images, _ = concept_set(n, seed=task.image_seed, size=world.image_size, colour=task.colour)
    return images


def judge_concept(world, emb, prompt: str, n: int, seed: int, ddim: int, colour: str,
                  keep: list | None = None) -> tuple[float, float, dict]:
    imgs = world.generate([prompt] * n, emb, seed=seed, steps=ddim)
    if keep is not None:
        keep.append(imgs[:8])
    j = world.judge_images(imgs)
    shape = [s == HELD_OUT for s in j["shape"]]
    both = [s and c == colour for s, c in zip(shape, j["colour"])]
    return sum(shape) / n, sum(both) / n, j


def _regularizers(v: Variant) -> list:
    return [L2ToInit(1e-2)] if v.regularizer == "l2_init" else []


def make_trainer(world, images, v: Variant, setting: Setting, task: Task, seed: int, profile,
                 groups: tuple = ()) -> Trainer:
    """The run of ``v`` at ``setting`` on ``task`` with ``seed``, as the node would build it (``groups``: more
    parameter groups, e.g. ``lora_group``'s)."""
    vec = init_vectors(world, v.init, task)
    emb = LearnedEmbedding("concept", vec, C, {"init": v.init})
    concepts = [prepare_concept(world.latents, images, emb, flip=True)]
    params = MethodParams(interval=v.interval or (350, 450), single_t=v.single_t if v.single_t is not None else 400)
    method = build_method(v.preset, world.text, world.denoiser.num_timesteps, params,
                          profile=profile if PRESETS[v.preset].needs_profile else None, init_vectors=vec)
    lr = setting.lr_dti if v.preset in ("directional", "adaptive_directional") else setting.lr
    cfg = TrainConfig(steps=setting.steps, batch_size=setting.batch, lr=lr, templates=world.templates, seed=seed,
                      g_reading=v.reading)
    return Trainer(world.text, world.denoiser, concepts, cfg, timesteps=method.sampler, optimizer=method.optimizer,
                   regularizers=_regularizers(v), groups=list(groups))


def lora_group(world, v: Variant, setting: Setting, seed: int) -> LoraGroup | None:
    """``v``'s LoRA on the world's UNet (peft, in place: the judge then samples with it; ``remove()`` after)."""
    if v.lora_lr <= 0:
        return None
    return LoraGroup(world.unet, LoraSpec(rank=4, alpha=4.0, lr=v.lora_lr, targets=("q", "k", "v", "out")),
                     setting.steps, seed=seed)


def run_one(world, images, v: Variant, setting: Setting, task: Task, seed: int, args, profile) -> RunResult:
    group = lora_group(world, v, setting, seed)
    try:
        return _run_one(world, images, v, setting, task, seed, args, profile, group)
    finally:
        if group is not None:
            group.remove()


def _run_one(world, images, v: Variant, setting: Setting, task: Task, seed: int, args, profile, group) -> RunResult:
    tr = make_trainer(world, images, v, setting, task, seed, profile, () if group is None else (group,))
    res = RunResult(v.name, seed, cell_name(setting.name, task.name), timesteps=tr.sampler.describe())
    evals = sorted(set([0] + [s for s in setting.evals if s <= setting.steps] + [setting.steps]))
    prompt = f"a photo of a {C}"
    scoring = v.name in EARLY_STOP and not args.quick
    score_config = ScoreConfig(every=1)
    trail: dict[int, LearnedEmbedding] = {}  # every step's vectors, for the early-stop analysis
    show = seed == task.first_seed

    def evaluate(step: int) -> None:
        e = tr.embeddings()[0]
        keep = res.samples if step == setting.steps and show else None
        a, b, j = judge_concept(world, e, prompt, args.n, 1000 + seed, args.ddim, task.colour, keep)
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
    while tr.step < setting.steps:
        info = tr.train_step()
        res.loss.append(info.loss)
        if scoring:
            res.score.append(deterministic_score(tr, score_config))
            trail[tr.step] = tr.embeddings()[0]
        if tr.step in evals:
            evaluate(tr.step)
    res.final = tr.embeddings()[0]
    res.end, _, _ = judge_concept(world, res.final, prompt, 3 * args.n, 5000 + seed, args.ddim, task.colour)
    res.edits = judge_edits(world, res.final, seed, args, task, res.samples if show else None)
    if scoring:
        res.early = early_stop_analysis(world, res, trail, seed, args, task)
    return res


def early_stop_analysis(world, res: RunResult, trail: dict, seed: int, args, task: Task) -> dict:
    """Where DVAR's rule (published TI setting, a score after every step) stops this run, and the
    accuracy there; and the accuracy of the best-scored step. Judged on 3x the images, as ``end``."""
    steps = list(range(1, len(res.score) + 1))
    n_stop = dvar_stop_index(res.score, DVAR_WINDOW, DVAR_THRESHOLD)
    stop = steps[n_stop - 1] if n_stop else None
    best = best_step(steps, res.score)
    out = {"stop_step": stop, "best_step": best[0] if best else None, "budget": steps[-1]}
    prompt = f"a photo of a {C}"
    for key, step in (("stop", stop), ("best", out["best_step"])):
        out[f"{key}_accuracy"] = None if step is None else judge_concept(
            world, trail[step], prompt, 3 * args.n, 5000 + seed, args.ddim, task.colour)[0]
    out["last_accuracy_same_n"] = res.end
    return out


def judge_edits(world, emb: LearnedEmbedding | None, seed: int, args, task: Task, keep: list | None = None) -> dict:
    """Each edited prompt scored on its requested attributes and on the concept being kept.
    Without ``emb`` the prompts use the word ``GENERIC`` instead of the placeholder."""
    out = {}
    for i, (p, want) in enumerate(EDITS):
        prompt = p if emb is not None else p.replace(C, GENERIC)
        _, _, j = judge_concept(world, emb, prompt, args.n, 2000 + seed, args.ddim, task.colour,
                                keep if i == 0 else None)
        attr = [all(j[k][m] == val for k, val in want.items()) for m in range(args.n)]
        kept = [s == HELD_OUT for s in j["shape"]]
        out[p] = {"attribute": sum(attr) / args.n, "concept": sum(kept) / args.n,
                  "both": sum(a and k for a, k in zip(attr, kept)) / args.n}
    return out


def reference_runs(world, task: Task, args) -> list[RunResult]:
    """Rows to read a task against, evaluated like the methods (same seeds, prompts and images): no
    inversion ("a photo of a thing") and the model's own lost word for the shape (a reference, not a
    ceiling: an inversion fits these five crescents of one colour more closely)."""
    refs = [("reference: no inversion ('thing')", None)]
    if world.held_out_word is not None:
        refs.append(("reference: the lost word", world.lost_word(C)))
    out = []
    for name, emb in refs:
        for seed in range(task.first_seed, task.first_seed + args.seeds):
            prompt = f"a photo of a {C}" if emb is not None else f"a photo of a {GENERIC}"
            a, b, j = judge_concept(world, emb, prompt, args.n, 1000 + seed, args.ddim, task.colour)
            r = RunResult(name, seed, f"task-{task.name}", steps=[0], concept=[a], concept_colour=[b], timesteps="-",
                          none=[sum(s == "none" for s in j["shape"]) / args.n], end=a)
            r.norm = [float(emb.norms()["clip_l"].mean())] if emb is not None else [float("nan")]
            r.edits = judge_edits(world, emb, seed, args, task)
            out.append(r)
    return out


def measure_profile(world, images, vectors: dict, quick: bool, reading: str):
    """g(t) (seeds/000 Eq. 4) on the concept images with ``vectors`` in the placeholder, 20 bins."""
    emb = LearnedEmbedding("concept", vectors, C)
    data = prepare_concept(world.latents, images, emb, flip=True)
    return profile_gradients(world.text, world.denoiser, [data], bins=20, samples_per_bin=4 if quick else 64,
                             batch_size=16, templates=world.templates, reading=reading)


# ---------------------------------------------------------------- step costs: one process, interleaved

def step_costs(world, args) -> dict:
    """Seconds per optimiser step of every method of every cell, and of the profiler's run per task,
    measured here in one process: round r times ``args.cost_steps`` steps of each method in turn (the
    order rotated each round, after a warm-up), and the profile once per round; the median of the
    rounds. Nothing else should run on the machine meanwhile."""
    jobs, profiles = [], {}
    for s, t in cells():
        if args.cells and cell_name(s, t) not in args.cells:
            continue
        setting, task = SETTINGS[s], TASKS[t]
        images = task_images(world, task, args.images)
        if t not in profiles:
            profiles[t] = (images, measure_profile(world, images, from_word(world.text, GENERIC, 1), args.quick,
                                                   "tokens"))
        for v in selected(args, s):
            tr = make_trainer(world, images, v, setting, task, task.first_seed, profiles[t][1])
            for _ in range(2):
                tr.train_step()
            jobs.append((cell_name(s, t), v.name, tr))
    times: dict[tuple[str, str], list[float]] = {(c, n): [] for c, n, _ in jobs}
    prof: dict[str, list[float]] = {t: [] for t in profiles}
    for r in range(args.cost_rounds):
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
        for c, n, tr in order:
            t0 = time.perf_counter()
            for _ in range(args.cost_steps):
                if tr.step >= tr.config.steps:
                    break
                tr.train_step()
            times[(c, n)].append((time.perf_counter() - t0) / args.cost_steps)
        for t, (images, _) in profiles.items():
            t0 = time.perf_counter()
            measure_profile(world, images, from_word(world.text, GENERIC, 1), args.quick, "tokens")
            prof[t].append(time.perf_counter() - t0)
    out: dict = {"rounds": args.cost_rounds, "steps_per_round": args.cost_steps, "device": device_name(),
                 "seconds_per_step": {}, "profile_seconds": {t: statistics.median(v) for t, v in prof.items()}}
    for (c, n), ts in times.items():
        out["seconds_per_step"].setdefault(c, {})[n] = statistics.median(ts)
    return out


def write_costs(world, args) -> dict:
    """``step_costs`` into OUT/world_methods.costs.json (what ``replot`` charges each method)."""
    out = step_costs(world, args)
    with open(os.path.join(args.out, "world_methods.costs.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["seconds_per_step"], indent=1))
    return out


def device_name() -> str:
    return f"cpu x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------- summaries

def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def _edit(r: RunResult, key: str) -> float:
    return mean([e[key] for e in r.edits.values()])


PAIRED = {  # metric -> per-run value, for the paired differences
    "auc": lambda r: area_under_curve(r.steps, r.concept),
    "end": lambda r: r.end,
    "edit_both": lambda r: _edit(r, "both"),
    "norm": lambda r: r.norm[-1],
}
TESTED = ("auc", "end")  # the metrics whose comparisons are corrected together (Holm), per cell


def _paired(rs: list[RunResult], base: list[RunResult]) -> dict:
    by = {r.seed: r for r in base}
    out = {}
    for k, f in PAIRED.items():
        mine = {r.seed: f(r) for r in rs if r.seed in by}
        theirs = {s: f(by[s]) for s in mine}
        d = paired_difference(mine, theirs)
        d["p"] = sign_flip_p([mine[s] - theirs[s] for s in mine])
        out[k] = d
    return out


def summarise_cell(runs: list[RunResult], refs: list[RunResult], costs: dict, cell: str, needs_profile: dict,
                   profile_seconds: float) -> dict:
    """Per method of one cell: the accuracy curve (seed mean), steps and seconds to the threshold, the
    mean accuracy over the run and at the end, paired differences against vanilla (and the default's
    reading against the other) with sign-flip p-values and Holm's correction over the cell's comparisons."""
    names = list(dict.fromkeys(r.variant for r in runs))
    by = {n: [r for r in runs if r.variant == n] for n in names}
    sps = costs.get(cell, {})
    table = {}
    for n, rs in {**{r.variant: [x for x in refs if x.variant == r.variant] for r in refs}, **by}.items():
        steps = rs[0].steps
        row = {"seeds": len(rs), "timesteps": rs[0].timesteps, "steps": steps,
               "concept_mean": [mean([r.concept[i] for r in rs]) for i in range(len(steps))],
               "end": bootstrap_ci([r.end for r in rs]),
               "colour": mean([r.concept_colour[-1] for r in rs]),
               "none": mean([r.none[-1] for r in rs]),
               "edit_attribute": mean([_edit(r, "attribute") for r in rs]),
               "edit_concept": mean([_edit(r, "concept") for r in rs]),
               "edit_both": mean([_edit(r, "both") for r in rs]),
               "norm": mean([r.norm[-1] for r in rs]),
               "norm_mean": [mean([r.norm[i] for r in rs]) for i in range(len(steps))],
               "cos_to_lost_word": mean([r.cos_true[-1] for r in rs if r.cos_true]),
               "reference": n.startswith("reference")}
        if len(steps) > 1:
            per_seed = [steps_to_threshold(r.steps, r.concept, THRESHOLD) for r in rs]
            fixed = profile_seconds if needs_profile.get(n) else 0.0
            cost = sps.get(n)
            secs = [seconds_to_threshold(x, cost, fixed) for x in per_seed] if cost else []
            row.update({"auc": bootstrap_ci([area_under_curve(r.steps, r.concept) for r in rs]),
                        "steps_to_threshold": per_seed, "steps_to_threshold_ci": median_ci(per_seed),
                        "reached": sum(not math.isinf(x) for x in per_seed), "seconds_per_step": cost,
                        "profile_seconds": fixed,
                        "seconds_to_threshold_ci": median_ci(secs) if secs else None,
                        "seconds": [fixed + s * cost for s in steps] if cost else None})
        early = [r.early for r in rs if r.early]
        if early:
            row["early_stop"] = _early_summary(early)
        table[n] = row
    comparisons = []
    if BASELINE in by:
        for n in names:
            if n != BASELINE:
                table[n]["paired"] = _paired(by[n], by[BASELINE])
                comparisons.append((n, BASELINE))
    if DEFAULT in by and OTHER_READING in by:
        table[DEFAULT]["paired_reading"] = _paired(by[DEFAULT], by[OTHER_READING])
        comparisons.append((DEFAULT, OTHER_READING))
    for metric in TESTED:
        ps = [_comparison(table, a, b)[metric]["p"] for a, b in comparisons]
        for (a, b), adj in zip(comparisons, holm(ps)):
            _comparison(table, a, b)[metric]["p_holm"] = adj
    return {"methods": table, "comparisons": len(comparisons), "threshold": THRESHOLD}


def _comparison(table: dict, a: str, b: str) -> dict:
    return table[a]["paired"] if b == BASELINE else table[a]["paired_reading"]


def _early_summary(early: list[dict]) -> dict:
    fired = [e for e in early if e["stop_step"] is not None]
    saved = [e["budget"] - e["stop_step"] for e in fired]
    d_stop = [e["stop_accuracy"] - e["last_accuracy_same_n"] for e in fired]
    d_best = [e["best_accuracy"] - e["last_accuracy_same_n"] for e in early if e["best_accuracy"] is not None]
    return {"runs": len(early), "fired": len(fired), "stop_steps": [e["stop_step"] for e in early],
            "steps_saved": bootstrap_ci(saved) if saved else None,
            "accuracy_change_at_stop": bootstrap_ci(d_stop) if d_stop else None,
            "best_steps": [e["best_step"] for e in early],
            "accuracy_change_best_vs_last": bootstrap_ci(d_best) if d_best else None}


# ---------------------------------------------------------------- tables

def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None or x != x else ("never" if math.isinf(x) else fmt.format(x))


def _ci(t, fmt="{:.2f}") -> str:
    return "-" if t is None else f"{_f(t[0], fmt)} [{_f(t[1], fmt)}, {_f(t[2], fmt)}]"


def _d(p: dict) -> str:
    star = " *" if p.get("p_holm", 1.0) < 0.05 else ""
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]{star}"


def cell_title(cell: str, seeds: int) -> str:
    s, t = cell.split("-")
    st, task = SETTINGS[s], TASKS[t]
    rate = "the node's defaults" if s == "user" else "the slower rate"
    return (f"{rate}: AdamW {st.lr:g}, batch {st.batch}, {st.steps} steps; task {t} ({task.colour} crescents, "
            f"images seed {task.image_seed}, run seeds {task.first_seed}-{task.first_seed + seeds - 1})")


def markdown_cell(cell: str, summary: dict) -> str:
    m = summary["methods"]
    seeds = max(r["seeds"] for r in m.values())
    lines = [f"### {cell}: {cell_title(cell, seeds)}", "",
             f"| method | steps to {THRESHOLD:g}: median [95% CI] (seeds reached) | s to {THRESHOLD:g}: median [95% CI] "
             "| mean acc. over run [95% CI] | acc. at the end [95% CI] | judged 'none' | edit: attribute | "
             "edit: concept kept | norm |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in m.items():
        stt = "-" if "steps_to_threshold_ci" not in r else \
            f"{_ci(r['steps_to_threshold_ci'], '{:.0f}')} ({r['reached']}/{r['seeds']})"
        lines.append(f"| {n} | {stt} | {_ci(r.get('seconds_to_threshold_ci'), '{:.1f}')} | {_ci(r.get('auc'))} | "
                     f"{_ci(r['end'])} | {_f(r['none'])} | {r['edit_attribute']:.2f} | {r['edit_concept']:.2f} | "
                     f"{_f(r['norm'])} |")
    k = summary["comparisons"]
    lines += ["", f"Paired differences, seed by seed (mean [95% bootstrap CI]; * = p < 0.05 after Holm's correction "
              f"over this cell's {k} comparisons, per metric; p from an exact sign-flip test):", "",
              "| comparison | mean acc. over run | acc. at the end | edit: both | norm | ahead/behind (over run) | "
              "p (over run) | p Holm (over run) | p Holm (end) |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in m.items():
        for key, other in (("paired", "vanilla"), ("paired_reading", OTHER_READING)):
            p = r.get(key)
            if not p:
                continue
            lines.append(f"| {n} - {other} | {_d(p['auc'])} | {_d(p['end'])} | {_d(p['edit_both'])} | "
                         f"{_d(p['norm'])} | {p['auc']['ahead']}/{p['auc']['behind']} | {p['auc']['p']:.3f} | "
                         f"{p['auc']['p_holm']:.3f} | {p['end']['p_holm']:.3f} |")
    early = {n: r["early_stop"] for n, r in m.items() if r.get("early_stop")}
    if early:
        lines += ["", f"DVAR early stop (window {DVAR_WINDOW}, threshold {DVAR_THRESHOLD}, a score after every step; "
                  "accuracy on 3x the images, against the last step's):", "",
                  "| method | fired | steps saved [95% CI] | accuracy change at the stop [95% CI] | "
                  "best-score step vs last step [95% CI] |", "|---|---|---|---|---|"]
        for n, e in early.items():
            lines.append(f"| {n} | {e['fired']}/{e['runs']} | {_ci(e['steps_saved'], '{:.0f}')} | "
                         f"{_ci(e['accuracy_change_at_stop'], '{:+.2f}')} | "
                         f"{_ci(e['accuracy_change_best_vs_last'], '{:+.2f}')} |")
    return "\n".join(lines)


def claims(summaries: dict[str, dict]) -> list[dict]:
    """Each comparison's outcome in every cell it was measured in: the difference over the run and at the
    end, and whether it survives Holm's correction; "holds on both tasks" when it does at a setting on A and B."""
    out = []
    seen = []
    for cell, s in summaries.items():
        for n, r in s["methods"].items():
            for key in ("paired", "paired_reading"):
                if r.get(key) and (n, key) not in seen:
                    seen.append((n, key))
    for n, key in seen:
        row = {"comparison": f"{n} - {'vanilla' if key == 'paired' else OTHER_READING}", "cells": {}}
        for cell, s in summaries.items():
            p = s["methods"].get(n, {}).get(key)
            if p:
                row["cells"][cell] = {"auc": p["auc"], "end": p["end"]}
        out.append(row)
    return out


def markdown_claims(rows: list[dict]) -> str:
    cols = [cell_name(s, t) for s, t in cells()]
    lines = ["| comparison | " + " | ".join(f"{c}: over run / at the end" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells_ = []
        for c in cols:
            x = row["cells"].get(c)
            cells_.append("-" if x is None else f"{_d(x['auc'])} / {_d(x['end'])}")
        lines.append(f"| {row['comparison']} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def markdown(data: dict, summaries: dict) -> str:
    vocab = data["vocab_norms"]
    parts = ["Every comparison in every cell (mean difference over the run / at the end, [95% CI], * = survives "
             "Holm's correction within its cell):", "", markdown_claims(claims(summaries)), ""]
    for cell, s in summaries.items():
        parts += [markdown_cell(cell, s), ""]
    costs = data.get("costs") or {}
    parts.append(f"Threshold {THRESHOLD:g}, reached when a seed's curve stays at or above it for 2 evaluations; the "
                 "end = the last step judged on 3x the images; seconds = steps x the method's step cost, all "
                 f"measured in one process, interleaved ({costs.get('rounds', '?')} rounds of "
                 f"{costs.get('steps_per_round', '?')} steps, {costs.get('device', '?')}), plus the profiler's run "
                 f"for high-grad. Norms of the world's words: min {vocab['min']:.2f}, mean {vocab['mean']:.2f}, max "
                 f"{vocab['max']:.2f}; CIs are 95% percentile bootstraps over seeds.")
    return "\n".join(parts)


# ---------------------------------------------------------------- running

def selected(args, setting: str) -> list[Variant]:
    return [v for v in variants() if setting in v.settings and (not args.only or any(s in v.name for s in args.only))]


def jobs(args) -> list[tuple[str, str, Variant, int]]:
    """Every (setting, task, variant, seed) to run, in a fixed order: seed by seed within a setting, so a
    run stopped part-way has the same seeds of every method (``--part`` takes every N-th job)."""
    out = []
    for s in SETTINGS:
        for i in range(args.seeds):
            for t, task in TASKS.items():
                if args.cells and cell_name(s, t) not in args.cells:
                    continue
                out += [(s, t, v, task.first_seed + i) for v in selected(args, s)]
    return out


def _part_files(out_dir: str, part: int) -> tuple[str, str]:
    return (os.path.join(out_dir, f"world_methods.part-{part}.jsonl"),
            os.path.join(out_dir, f"world_methods.part-{part}.samples.pt"))


def _append(path: str, record: dict) -> None:
    """One finished job per line, flushed at once: a stopped part continues where it stopped."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, separators=(",", ":")) + "\n")


def _read_part(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_jobs(world, args, part: int, parts: int) -> None:
    """This part's jobs, each appended to its part file as it finishes; jobs already there are skipped."""
    path, samples_path = _part_files(args.out, part)
    done = _read_part(path)
    have = {(r["cell"], r["variant"], r["seed"]) for r in done if r.get("kind") == "run"}
    ref_tasks = {r["task"] for r in done if r.get("kind") == "reference"}
    samples = torch.load(samples_path, weights_only=True) if os.path.isfile(samples_path) else {}
    todo = [j for j in jobs(args)[part::parts] if (cell_name(j[0], j[1]), j[2].name, j[3]) not in have]
    print(f"part {part}/{parts}: {len(have)} runs done, {len(todo)} to go", flush=True)
    images, profiles = {}, {}
    for s, t, v, seed in todo:
        task = TASKS[t]
        if t not in images:
            images[t] = task_images(world, task, args.images)
            profiles[t] = measure_profile(world, images[t], from_word(world.text, GENERIC, 1), args.quick, "tokens")
            _append(path, {"kind": "profile", "task": t, **profiles[t].to_dict(),
                           "window": list(profiles[t].best_window(100))})
            if part == 0 and t not in ref_tasks:
                for r in reference_runs(world, task, args):
                    _append(path, {"kind": "reference", "task": t, **run_to_dict(r)})
                ref_tasks.add(t)
        t0 = time.time()
        r = run_one(world, images[t], v, SETTINGS[s], task, seed, args, profiles[t])
        _append(path, {"kind": "run", **run_to_dict(r)})
        if len(r.samples) == 2:
            samples[f"{r.cell} {r.variant}"] = torch.cat(r.samples)
            samples[f"task {t}: concept images"] = images[t]
            torch.save(samples, samples_path + ".tmp")
            os.replace(samples_path + ".tmp", samples_path)
        print(f"{r.cell} {v.name:36s} seed {seed}: concept {r.concept[-1]:.2f} end {r.end:.2f} "
              f"(curve {['%.2f' % a for a in r.concept]}) norm {r.norm[-1]:.2f} {time.time() - t0:.0f}s"
              + (f" early {r.early}" if r.early else ""), flush=True)


def base_data(world, args) -> dict:
    norms = world.vocab_norms()
    return {"config": {k: v for k, v in vars(args).items() if k not in ("part", "merge", "costs")},
            "vocab_norms": {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max()),
                            "lost_word_norm": None if world.held_out_word is None else float(world.held_out_word.norm())},
            "methods": [asdict(v) for v in variants()],
            "needs_profile": {v.name: PRESETS[v.preset].needs_profile for v in variants()},
            "device": device_name()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("-n", type=int, default=24, help="generated images per evaluation")
    ap.add_argument("--ddim", type=int, default=10, help="DDIM steps per generated image")
    ap.add_argument("--images", type=int, default=5, help="concept images")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--cells", nargs="*", default=None, help="cells to run, e.g. user-A slow-B (default: all)")
    ap.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 20 steps, cell user-A: a smoke test")
    ap.add_argument("--replot", action="store_true", help="tables and charts from OUT/world_methods.json alone")
    ap.add_argument("--out", default=os.path.join("docs", "results"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--world", default=None, help="world assets folder (default: the shipped model)")
    ap.add_argument("--judge", default=None, help="judge assets folder (default: the world's own)")
    ap.add_argument("--part", default=None, metavar="I/N",
                    help="run every N-th job from the I-th (0-based) into world_methods.part-I.json (N single-thread "
                         "processes use N cores without threads waiting on each other); --merge joins them")
    ap.add_argument("--merge", type=int, default=0, metavar="N", help="join the N parts, add the costs, redraw")
    ap.add_argument("--costs", action="store_true",
                    help="measure every method's step cost in one process, interleaved (world_methods.costs.json)")
    ap.add_argument("--cost-rounds", type=int, default=5)
    ap.add_argument("--cost-steps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.out)
    if args.merge:
        return merge_parts(args.out, args.merge)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        global SETTINGS
        q = SETTINGS["user"]
        SETTINGS = {"user": Setting("user", q.lr, q.lr_dti, q.batch, 20, (10,))}
        args.seeds, args.n, args.ddim, args.cost_rounds, args.cost_steps = 1, 8, 6, 2, 2
        args.only = args.only or [BASELINE, DEFAULT]
        args.cells = args.cells or ["user-A"]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    world = load_world(args.world, judge_folder=args.judge)
    if args.costs:
        return write_costs(world, args)
    part, parts = (int(x) for x in args.part.split("/")) if args.part else (0, 1)
    path = _part_files(args.out, part)[0]
    if not args.part and os.path.isfile(path):
        os.remove(path)  # one process: always a fresh run (parts continue where they stopped)
    _append(path, {"kind": "meta", **base_data(world, args)})
    run_jobs(world, args, part, parts)
    print(f"part {part}/{parts} done in {time.time() - t_start:.0f} s")
    if args.part:
        return {}
    write_costs(world, args)  # one process: it measures the step costs too (after the runs), then joins
    return merge_parts(args.out, 1)


def merge_parts(out_dir: str, parts: int) -> dict:
    """Join the parts' files into one world_methods.json (jobs in the benchmark's order) and the sample
    grid, then draw the tables and charts."""
    records = [r for i in range(parts) for r in _read_part(_part_files(out_dir, i)[0])]
    meta = next(r for r in records if r["kind"] == "meta")
    order = [v.name for v in variants()]
    runs = {}
    for r in records:  # a job run twice (a part restarted by hand) counts once: the later run
        if r["kind"] in ("run", "reference"):
            runs[(r["kind"], r["cell"], r["variant"], r["seed"])] = {k: v for k, v in r.items() if k not in ("kind", "task")}
    refs = [v for k, v in runs.items() if k[0] == "reference"]
    trained = sorted((v for k, v in runs.items() if k[0] == "run"),
                     key=lambda r: (r["cell"], order.index(r["variant"]), r["seed"]))
    profiles = {r["task"]: {k: v for k, v in r.items() if k not in ("kind", "task")}
                for r in records if r["kind"] == "profile"}
    data = {k: v for k, v in meta.items() if k != "kind"} | {"runs": refs + trained, "profiles": profiles,
                                                             "device": f"{parts} process(es): " + meta["device"]}
    with open(os.path.join(out_dir, "world_methods.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    samples = {}
    for i in range(parts):
        p = _part_files(out_dir, i)[1]
        if os.path.isfile(p):
            samples.update(torch.load(p, weights_only=True))
    if samples:
        labels = sorted(samples, key=lambda k: (k.split(" ")[0].split("-")[-1] if "task" not in k else k[5],
                                                "task" not in k, k))
        image_grid([samples[k] for k in labels], labels, scale=2).save(os.path.join(out_dir, "world_samples.png"))
    return replot(out_dir)


def replot(out_dir: str) -> dict:
    """Tables (printed, world_methods.md, world_summary.json) and charts from world_methods.json and the
    step costs (world_methods.costs.json)."""
    from inversion.methods.profiler import GradProfile

    with open(os.path.join(out_dir, "world_methods.json"), encoding="utf-8") as f:
        data = json.load(f)
    costs_path = os.path.join(out_dir, "world_methods.costs.json")
    costs = {}
    if os.path.isfile(costs_path):
        with open(costs_path, encoding="utf-8") as f:
            costs = json.load(f)
    data["costs"] = costs
    results = [RunResult(**r) for r in data["runs"]]
    summaries = {}
    for s, t in cells():
        cell = cell_name(s, t)
        runs = [r for r in results if r.cell == cell]
        if not runs:
            continue
        refs = [r for r in results if r.cell == f"task-{t}"]
        summaries[cell] = summarise_cell(runs, refs, costs.get("seconds_per_step", {}), cell, data["needs_profile"],
                                         costs.get("profile_seconds", {}).get(t, 0.0))
    table = markdown(data, summaries)
    print()
    print(table)
    with open(os.path.join(out_dir, "world_methods.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    summary = {"cells": summaries, "claims": claims(summaries), "threshold": THRESHOLD}
    with open(os.path.join(out_dir, "world_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=lambda o: None)
    groups = {m["name"]: m["group"] for m in data["methods"]}
    profiles = [(GradProfile.from_dict(p), tuple(p["window"]), f"g(t) w.r.t. the token row, task {t}, class word "
                 f"'{GENERIC}'") for t, p in sorted(data.get("profiles", {}).items())]
    _plots(out_dir, summaries, groups, profiles, data["vocab_norms"])
    return summary


def _pil(chart: torch.Tensor):
    return to_pil(chart.permute(2, 0, 1))


def _save(chart: torch.Tensor, path: str) -> None:
    _pil(chart).save(path)


def _plots(out, summaries: dict, groups: dict, profiles, vocab) -> None:
    from PIL import Image

    for cell, s in summaries.items():
        m = s["methods"]
        refs = {n.replace("reference: ", ""): r["end"][0] for n, r in m.items() if r["reference"]}
        trained = [n for n in m if not m[n]["reference"]]
        for group, title in (("timesteps", "timestep strategies"), ("optimiser", "Directional TI vs AdamW"),
                             ("init", "initialisation"), ("regulariser", "regularisers")):
            names = [n for n in trained if groups.get(n) == group or (group != "timesteps" and n == BASELINE)]
            if len(names) < (1 if group == "timesteps" else 2):
                continue
            _save(curves_chart({n: m[n]["concept_mean"] for n in names}, m[names[0]]["steps"], references=refs,
                               title=f"{cell}: concept accuracy vs optimisation step (mean of seeds): {title}"),
                  os.path.join(out, f"world_accuracy_{group}_{cell}.png"))
        timed = {n: m[n] for n in trained if m[n].get("seconds") and groups.get(n) == "timesteps"}
        if BASELINE in timed:
            budget = timed[BASELINE]["seconds"][-1]
            grid = [budget * i / 40 for i in range(41)]
            curves = {n: [value_at(r["seconds"], r["concept_mean"], x) if x >= r["seconds"][0] else r["concept_mean"][0]
                          for x in grid] for n, r in timed.items()}
            _save(curves_chart(curves, [round(x, 1) for x in grid], references=refs,
                               title=f"{cell}: concept accuracy vs wall clock (interleaved step costs + profile)",
                               xlabel="seconds"), os.path.join(out, f"world_accuracy_wall_clock_{cell}.png"))
        if cell == "user-A" and trained:
            nrefs = {"largest word norm": vocab["max"], "mean word norm": vocab["mean"]}
            if vocab.get("lost_word_norm"):
                nrefs["the lost word's norm"] = vocab["lost_word_norm"]
            _save(curves_chart({n: m[n]["norm_mean"] for n in trained}, m[trained[0]]["steps"], references=nrefs,
                               title=f"{cell}: learned vector norm vs optimisation step (mean of seeds)"),
                  os.path.join(out, "world_norms.png"))
    if profiles:
        pil = [_pil(profile_chart(p, window=w, title=t, width=640, height=360)) for p, w, t in profiles]
        canvas = Image.new("RGB", (sum(p.width for p in pil), max(p.height for p in pil)), (255, 255, 255))
        x = 0
        for p in pil:
            canvas.paste(p, (x, 0))
            x += p.width
        canvas.save(os.path.join(out, "world_gt_profile.png"))


if __name__ == "__main__":
    main()
