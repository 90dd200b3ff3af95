"""What makes a run reach the concept soonest in wall-clock time: a factor study on the miniature world (issue 28).

The question is a user's: which recipe gives a good concept in the least time on the same machine, against
plain textual inversion **at its own best learning rate** (not a handicapped one). Two stages, each on both
world tasks of ``world_methods.py`` (A: yellow crescents, B: green crescents, other images and seeds), 10
seeds per recipe, 500 steps, concept accuracy judged at steps 10, 20, ..., 500 as in ``world_methods.py``:

- ``--stage lr``: vanilla at AdamW 2e-3, 5e-3, 1e-2, 2e-2 and 5e-2 (batch 1). Its best rate L is the one
  with the lowest median seconds to 0.85 over both tasks' seeds (``--merge`` writes it).
- ``--stage factors``: each factor alone against vanilla at L, and combinations: adaptive t ~ g(t) (at L
  and 2L), the init (the class word with 2 vectors; a caption naming what the images show,
  "{colour} thing", as Caption Init would write it), the schedule (25 warm-up steps then cosine: with
  the warm-up this is a one-cycle shape), batch 4, gradient accumulation 4, DTI's fixed-norm Riemannian
  steps (1e-2 and 3e-2 rad), and the stopping rule: DVAR's (window 310, threshold 0.15, a score after
  every step) and the best-scored step, on the rows marked ``score``, with the scores' cost charged.

Per recipe and task: steps and seconds to 0.85 (seconds = steps x the recipe's step cost, every cost
measured in one process, interleaved: ``--costs``), the speed-up against vanilla at L (the ratio of
median seconds, paired bootstrap interval over seeds), accuracy at the end and edit faithfulness as paired
differences with sign-flip p-values, Holm-corrected over the stage's comparisons per task.

    python benchmarks/world_fastest.py --stage lr --part 0/2 & python benchmarks/world_fastest.py --stage lr --part 1/2; wait
    python benchmarks/world_fastest.py --merge            # vanilla's best lr -> docs/results/world_fastest.json
    python benchmarks/world_fastest.py --stage factors --part 0/2 & ... --part 1/2; wait
    python benchmarks/world_fastest.py --costs            # step costs of every recipe, one process, alone
    python benchmarks/world_fastest.py --merge            # tables (world_fastest.md) and the chart
    python benchmarks/world_fastest.py --quick            # a smoke test: 2 recipes, 1 seed, 20 steps

Every finished run is appended to its part's file at once (``world_fastest.part-<stage>-<i>.jsonl``), so a
stopped part continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.world_methods import (C, THRESHOLD, TASKS, RunResult, Task, _append, _save,  # noqa: E402
                                      early_stop_analysis, judge_concept, judge_edits, run_to_dict, task_images)
from benchmarks.world_methods import _read_part as _read  # noqa: E402
from benchmarks.world_stats import (INF, area_under_curve, holm, median_ci, paired_difference,  # noqa: E402
                                    seconds_to_threshold, sign_flip_p, steps_to_threshold, value_at)
from inversion.charts import curves_chart  # noqa: E402
from inversion.embedding import LearnedEmbedding  # noqa: E402
from inversion.methods.init import from_text, from_word  # noqa: E402
from inversion.methods.presets import MethodParams, build_method  # noqa: E402
from inversion.methods.score import ScoreConfig, deterministic_score  # noqa: E402
from inversion.trainer import TrainConfig, Trainer, prepare_concept  # noqa: E402
from inversion.world import GENERIC, load_world  # noqa: E402

STEPS = 500
EVALS = (10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500)
LR_GRID = (2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
PREFIX = "world_fastest"


@dataclass(frozen=True)
class Recipe:
    """One way to run textual inversion; ``lr_scale`` multiplies vanilla's best rate L (stage factors)."""

    name: str
    stage: str  # "lr" | "factors"
    preset: str = "vanilla"
    lr: float | None = None  # an absolute rate (stage lr, DTI's radians); None = lr_scale x L
    lr_scale: float = 1.0
    batch: int = 1
    grad_accum: int = 1
    schedule: str = "constant"
    warmup: int = 0
    init: str = f"word:{GENERIC}"  # word:<w> or text:<caption> ("{colour}" = the task's colour)
    k: int = 1  # vectors, for word:<w>
    score: bool = False  # a DVAR score after every step (the stopping-rule rows)

    def rate(self, base_lr: float) -> float:
        return self.lr if self.lr is not None else self.lr_scale * base_lr


def lr_name(lr: float) -> str:
    return f"vanilla lr {lr:g}"


BASELINE = "vanilla at its best lr"


def recipes(stage: str) -> list[Recipe]:
    if stage == "lr":
        return [Recipe(lr_name(lr), "lr", lr=lr) for lr in LR_GRID]
    caption = "text:{colour} " + GENERIC
    return [
        Recipe(BASELINE, "factors", score=True),
        Recipe("adaptive", "factors", preset="adaptive"),
        Recipe("adaptive at 2x lr", "factors", preset="adaptive", lr_scale=2.0),
        Recipe("init: class word, 2 vectors", "factors", k=2),
        Recipe("init: caption '{colour} thing'", "factors", init=caption),
        Recipe("warm-up 25 + cosine", "factors", schedule="cosine", warmup=25),
        Recipe("batch 4", "factors", batch=4),
        Recipe("grad accumulation 4", "factors", grad_accum=4),
        Recipe("DTI 1e-2 rad", "factors", preset="directional", lr=1e-2),
        Recipe("DTI 3e-2 rad", "factors", preset="directional", lr=3e-2),
        Recipe("adaptive + caption", "factors", preset="adaptive", init=caption, score=True),
        Recipe("adaptive + caption at 2x lr", "factors", preset="adaptive", init=caption, lr_scale=2.0, score=True),
        Recipe("adaptive + caption at 2x lr, warm-up + cosine", "factors", preset="adaptive", init=caption,
               lr_scale=2.0, schedule="cosine", warmup=25, score=True),
    ]


# ---------------------------------------------------------------- one run

def init_vectors(world, r: Recipe, task: Task) -> dict[str, torch.Tensor]:
    kind, _, text = r.init.format(colour=task.colour).partition(":")
    if kind == "word":
        return from_word(world.text, text, r.k)
    if kind == "text":
        return from_text(world.text, text)
    raise ValueError(f"init spec {r.init!r}: use word:<w> or text:<caption>")


def make_trainer(world, images, r: Recipe, task: Task, seed: int, base_lr: float, steps: int) -> Trainer:
    """The run of recipe ``r`` on ``task`` with ``seed``, as Train Textual Inversion would build it."""
    vec = init_vectors(world, r, task)
    emb = LearnedEmbedding("concept", vec, C, {"init": r.init})
    concepts = [prepare_concept(world.latents, images, emb, flip=True)]
    method = build_method(r.preset, world.text, world.denoiser.num_timesteps, MethodParams(), init_vectors=vec)
    cfg = TrainConfig(steps=steps, batch_size=r.batch, grad_accum=r.grad_accum, lr=r.rate(base_lr),
                      lr_schedule=r.schedule, warmup_steps=r.warmup, templates=world.templates, seed=seed)
    return Trainer(world.text, world.denoiser, concepts, cfg, timesteps=method.sampler, optimizer=method.optimizer)


def run_recipe(world, images, r: Recipe, task: Task, seed: int, base_lr: float, args) -> RunResult:
    tr = make_trainer(world, images, r, task, seed, base_lr, args.steps)
    res = RunResult(r.name, seed, task.name, timesteps=tr.sampler.describe())
    evals = sorted({0, args.steps, *(s for s in EVALS if s <= args.steps)})
    prompt = f"a photo of a {C}"
    trail: dict[int, LearnedEmbedding] = {}

    def evaluate(step: int) -> None:
        e = tr.embeddings()[0]
        a, b, j = judge_concept(world, e, prompt, args.n, 1000 + seed, args.ddim, task.colour)
        res.steps.append(step)
        res.concept.append(a)
        res.concept_colour.append(b)
        res.none.append(sum(s == "none" for s in j["shape"]) / args.n)
        res.norm.append(float(e.norms()["clip_l"].mean()))

    evaluate(0)
    while tr.step < args.steps:
        res.loss.append(tr.train_step().loss)
        if r.score:
            res.score.append(deterministic_score(tr, ScoreConfig(every=1)))
            trail[tr.step] = tr.embeddings()[0]
        if tr.step in evals:
            evaluate(tr.step)
    final = tr.embeddings()[0]
    res.end, _, _ = judge_concept(world, final, prompt, 3 * args.n, 5000 + seed, args.ddim, task.colour)
    res.edits = judge_edits(world, final, seed, args, task)
    if r.score:
        res.early = early_stop_analysis(world, res, trail, seed, args, task)
    return res


# ---------------------------------------------------------------- step costs: one process, interleaved

def step_costs(world, args, base_lr: float) -> dict:
    """Seconds per optimiser step of every recipe, measured in one process: ``cost_rounds`` rounds of
    ``cost_steps`` steps of each recipe in turn (the order rotated each round, after a warm-up), the
    median of the rounds; and the deterministic score's cost (the stopping-rule rows pay it every step)."""
    task = TASKS["A"]
    images = task_images(world, task, args.images)
    jobs = []
    for stage in ("lr", "factors"):
        for r in recipes(stage):
            tr = make_trainer(world, images, r, task, task.first_seed, base_lr, 10 ** 6)
            for _ in range(2):  # warm-up
                tr.train_step()
            jobs.append((r.name, tr))
    times: dict[str, list[float]] = {n: [] for n, _ in jobs}
    score: list[float] = []
    for rnd in range(args.cost_rounds):
        for n, tr in jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]:
            t0 = time.perf_counter()
            for _ in range(args.cost_steps):
                tr.train_step()
            times[n].append((time.perf_counter() - t0) / args.cost_steps)
        tr = jobs[0][1]
        t0 = time.perf_counter()
        for _ in range(args.cost_steps):
            deterministic_score(tr, ScoreConfig(every=1))
        score.append((time.perf_counter() - t0) / args.cost_steps)
    return {"rounds": args.cost_rounds, "steps_per_round": args.cost_steps,
            "device": f"cpu x{torch.get_num_threads()} threads", "base_lr": base_lr,
            "seconds_per_step": {n: statistics.median(ts) for n, ts in times.items()},
            "score_seconds": statistics.median(score)}


# ---------------------------------------------------------------- running

def _part_file(out: str, stage: str, part: int) -> str:
    return os.path.join(out, f"{PREFIX}.part-{stage}-{part}.jsonl")


def jobs(stage: str, args) -> list[tuple[str, Recipe, int]]:
    """(task, recipe, seed) in a fixed order, seed by seed, so a stopped part has the same seeds of every recipe."""
    chosen = [r for r in recipes(stage) if not args.only or any(s[1:] == r.name if s.startswith("=") else s in r.name
                                                                for s in args.only)]
    return [(t, r, task.first_seed + i) for i in range(args.seeds) for t, task in TASKS.items()
            if not args.tasks or t in args.tasks for r in chosen]


def base_lr_from(out: str, given: str) -> float:
    if given != "auto":
        return float(given)
    path = os.path.join(out, f"{PREFIX}.json")
    if not os.path.isfile(path):
        sys.exit(f"--base-lr auto reads vanilla's best lr from {path}: run --stage lr, then --merge, first "
                 "(or give --base-lr 0.005)")
    with open(path, encoding="utf-8") as f:
        return float(json.load(f)["vanilla_best_lr"])


def run_stage(world, args, stage: str, part: int, parts: int, base_lr: float) -> None:
    path = _part_file(args.out, stage, part)
    # every part's finished runs count: a re-split (other --only or part count) re-runs nothing
    have = {(r["cell"], r["variant"], r["seed"]) for r in _runs(args.out, stage)}
    todo = [j for j in jobs(stage, args)[part::parts] if (j[0], j[1].name, j[2]) not in have]
    _append(path, {"kind": "meta", "stage": stage, "base_lr": base_lr, "steps": args.steps, "n": args.n,
                   "recipes": [asdict(r) for r in recipes(stage)]})
    print(f"stage {stage} part {part}/{parts}: {len(have)} runs done, {len(todo)} to go (L = {base_lr:g})", flush=True)
    images = {}
    for t, r, seed in todo:
        task = TASKS[t]
        images.setdefault(t, task_images(world, task, args.images))
        t0 = time.time()
        res = run_recipe(world, images[t], r, task, seed, base_lr, args)
        _append(path, {"kind": "run", "stage": stage, "lr": r.rate(base_lr), **run_to_dict(res)})
        print(f"{t} {r.name:48s} seed {seed}: end {res.end:.2f} curve {['%.2f' % a for a in res.concept]} "
              f"{time.time() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------- summaries

def _runs(out: str, stage: str) -> list[dict]:
    found, i = {}, 0
    while os.path.isfile(_part_file(out, stage, i)):
        for r in _read(_part_file(out, stage, i)):
            if r.get("kind") == "run":
                found[(r["cell"], r["variant"], r["seed"])] = r  # a job run twice counts once: the later
        i += 1
    return list(found.values())


def _seconds(r: dict, sps: float, score_s: float = 0.0) -> float:
    return seconds_to_threshold(steps_to_threshold(r["steps"], r["concept"], THRESHOLD), sps + score_s)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def speedup_ci(base: dict[int, float], mine: dict[int, float], n_boot: int = 10000) -> tuple[float, float, float]:
    """median(base seconds) / median(recipe seconds), with a paired percentile bootstrap over seeds (a
    seed that never reaches the threshold counts as INF: a recipe that never gets there has speed-up 0)."""
    seeds = sorted(set(base) & set(mine))

    def ratio(ss):
        b, m = _median([base[s] for s in ss]), _median([mine[s] for s in ss])
        return 0.0 if math.isinf(m) else (INF if m == 0 else b / m)

    if not seeds:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(0)
    boots = sorted(ratio([seeds[rng.randrange(len(seeds))] for _ in seeds]) for _ in range(n_boot))
    return ratio(seeds), boots[int(0.025 * (n_boot - 1))], boots[int(math.ceil(0.975 * (n_boot - 1)))]


def _edit(r: dict, key: str) -> float:
    return statistics.fmean(e[key] for e in r["edits"].values())


def summarise_lr(runs: list[dict], costs: dict) -> dict:
    """Vanilla per lr: steps (and, with the step costs, seconds) to 0.85 per task, and the median steps over
    both tasks' seeds, which ranks the rates: vanilla's step does the same work at every lr, so fewer steps
    is less time (the costs, measured after this stage, confirm it)."""
    sps = costs.get("seconds_per_step", {})
    out = {}
    for lr in LR_GRID:
        name = lr_name(lr)
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        steps = {t: [steps_to_threshold(r["steps"], r["concept"], THRESHOLD) for r in rs if r["cell"] == t]
                 for t in TASKS}
        cost = sps.get(name)
        out[name] = {"lr": lr, "steps": {t: median_ci(v) for t, v in steps.items()},
                     "seconds": None if cost is None else {t: median_ci([seconds_to_threshold(x, cost) for x in v])
                                                           for t, v in steps.items()},
                     "pooled_steps": _median([x for v in steps.values() for x in v]),
                     "reached": sum(not math.isinf(x) for v in steps.values() for x in v), "runs": len(rs),
                     "end": statistics.fmean(r["end"] for r in rs)}
    return out


def summarise_factors(runs: list[dict], costs: dict) -> dict:
    sps, score_s = costs.get("seconds_per_step", {}), costs.get("score_seconds", 0.0)
    out = {}
    for t in TASKS:
        mine = [r for r in runs if r["cell"] == t]
        base = {r["seed"]: r for r in mine if r["variant"] == BASELINE}
        rows, pvals = {}, []
        for rec in recipes("factors"):
            rs = {r["seed"]: r for r in mine if r["variant"] == rec.name}
            if not rs:
                continue
            cost = sps.get(rec.name, float("nan"))
            secs = {s: _seconds(r, cost) for s, r in rs.items()}
            steps = [steps_to_threshold(r["steps"], r["concept"], THRESHOLD) for r in rs.values()]
            row = {"steps": median_ci(steps), "seconds": median_ci(list(secs.values())),
                   "reached": sum(not math.isinf(x) for x in steps), "runs": len(rs), "cost": cost,
                   "auc": statistics.fmean(area_under_curve(r["steps"], r["concept"]) for r in rs.values()),
                   "end": statistics.fmean(r["end"] for r in rs.values()),
                   "attribute": statistics.fmean(_edit(r, "attribute") for r in rs.values()),
                   "edit_both": statistics.fmean(_edit(r, "both") for r in rs.values())}
            if rec.name != BASELINE and base:
                base_secs = {s: _seconds(r, sps.get(BASELINE, float("nan"))) for s, r in base.items()}
                row["speedup"] = speedup_ci(base_secs, secs)
                for key, f in (("end", lambda r: r["end"]), ("edit_both", lambda r: _edit(r, "both")),
                               ("attribute", lambda r: _edit(r, "attribute"))):
                    a = {s: f(r) for s, r in rs.items() if s in base}
                    b = {s: f(base[s]) for s in a}
                    d = paired_difference(a, b)
                    d["p"] = sign_flip_p([a[s] - b[s] for s in a])
                    row[f"d_{key}"] = d
                    if key == "end":
                        pvals.append((rec.name, d["p"]))
            if rec.score:
                early = [r["early"] for r in rs.values() if r.get("early")]
                fired = [e for e in early if e["stop_step"] is not None]
                row["early"] = {"fired": len(fired), "of": len(early),
                                "stop_seconds": _median([e["stop_step"] * (cost + score_s) for e in fired]),
                                "accuracy_change": statistics.fmean(e["stop_accuracy"] - e["last_accuracy_same_n"]
                                                                    for e in fired) if fired else float("nan")}
            rows[rec.name] = row
        for (name, _), adj in zip(pvals, holm([p for _, p in pvals])):
            rows[name]["d_end"]["p_holm"] = adj
        out[t] = rows
    return out


def _ci(c, fmt="{:.0f}") -> str:
    def f(x):
        return "never" if math.isinf(x) else fmt.format(x)
    return f"{f(c[0])} [{f(c[1])}, {f(c[2])}]"


def _d(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def tables(data: dict) -> str:
    lines = []
    lr = data.get("lr", {})
    if lr:
        lines += ["Vanilla textual inversion at five learning rates (AdamW, batch 1, 500 steps; steps and seconds to "
                  "0.85: median [95% CI] per task):", "",
                  "| lr | task A: steps to 0.85 | task B: steps to 0.85 | task A: s | task B: s | seeds reached "
                  "| mean acc. at the end |", "|---|---|---|---|---|---|---|"]
        for name, row in lr.items():
            sec = row["seconds"] or {}
            if not all(row["steps"][t][0] == row["steps"][t][0] for t in TASKS):  # a task not run: nan
                sec = {}
            lines.append(f"| {row['lr']:g} | {_ci(row['steps']['A'])} | {_ci(row['steps']['B'])} "
                         f"| {_ci(sec['A'], '{:.1f}') if sec else '-'} | {_ci(sec['B'], '{:.1f}') if sec else '-'} "
                         f"| {row['reached']}/{row['runs']} | {row['end']:.2f} |")
        lines += ["", f"Vanilla's best lr (fewest median steps to 0.85 over both tasks' seeds): "
                  f"**{data['vanilla_best_lr']:g}**.", ""]
    for t, rows in data.get("factors", {}).items():
        if not rows:
            continue
        lines += [f"### Task {t}: every factor against vanilla at its best lr ({data['base_lr']:g})", "",
                  "| recipe | steps to 0.85 (reached) | s to 0.85 | speed-up vs vanilla [95% CI] | acc. at the end "
                  "| end - vanilla [95% CI] (p Holm) | edit: attribute - vanilla | edit: both - vanilla | early stop: fired, s, acc. change |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            sp = r.get("speedup")
            spt = "-" if sp is None else f"{sp[0]:.2f}x [{sp[1]:.2f}, {sp[2]:.2f}]"
            de = r.get("d_end")
            det = "-" if de is None else f"{_d(de)} ({de.get('p_holm', float('nan')):.3f})"
            da, db = r.get("d_attribute"), r.get("d_edit_both")
            e = r.get("early")
            et = "-" if not e else (f"{e['fired']}/{e['of']}, {e['stop_seconds']:.1f} s, {e['accuracy_change']:+.2f}"
                                    if e["fired"] else f"0/{e['of']}")
            lines.append(f"| {name} | {_ci(r['steps'])} ({r['reached']}/{r['runs']}) | {_ci(r['seconds'], '{:.1f}')} "
                         f"| {spt} | {r['end']:.2f} | {det} | {'-' if da is None else _d(da)} "
                         f"| {'-' if db is None else _d(db)} | {et} |")
        lines.append("")
    lines.append(f"Threshold {THRESHOLD}, held for 2 evaluations; seconds = steps x the recipe's step cost measured in "
                 "one process, interleaved (the stopping-rule column adds the score's cost per step); end = the last "
                 "step judged on 3x the images; Holm's correction over the task's comparisons; 95% percentile "
                 "bootstraps over seeds.")
    return "\n".join(lines) + "\n"


def merge(out: str) -> dict:
    """Join the parts, pick vanilla's best lr, summarise with the step costs, write the JSON, tables and chart."""
    costs_path = os.path.join(out, f"{PREFIX}.costs.json")
    costs = json.load(open(costs_path, encoding="utf-8")) if os.path.isfile(costs_path) else {}
    data: dict = {"steps": STEPS, "threshold": THRESHOLD, "costs": costs}
    lr_runs, factor_runs = _runs(out, "lr"), _runs(out, "factors")
    if lr_runs:
        data["lr"] = summarise_lr(lr_runs, costs)
        best = min(data["lr"].values(), key=lambda row: (row["pooled_steps"], row["lr"]))
        data["vanilla_best_lr"] = best["lr"]
    if factor_runs:
        if not costs:
            sys.exit(f"no step costs in {costs_path}: run --costs (alone on the machine) before --merge")
        data["base_lr"] = factor_runs[0]["lr"] if "vanilla_best_lr" not in data else data["vanilla_best_lr"]
        data["factors"] = summarise_factors(factor_runs, costs)
        base_lr = data["base_lr"]
        for t in TASKS:
            timed = {}
            for name in (BASELINE, "adaptive", "init: caption '{colour} thing'", "adaptive + caption at 2x lr"):
                rs = [r for r in factor_runs if r["cell"] == t and r["variant"] == name]
                if rs:
                    cost = costs["seconds_per_step"].get(name, 0.0)
                    timed[name] = ([s * cost for s in rs[0]["steps"]],
                                   [statistics.fmean(r["concept"][i] for r in rs) for i in range(len(rs[0]["steps"]))])
            if BASELINE in timed:
                grid = [timed[BASELINE][0][-1] * i / 40 for i in range(41)]
                curves = {n: [value_at(xs, ys, x) for x in grid] for n, (xs, ys) in timed.items()}
                _save(curves_chart(curves, [round(x, 1) for x in grid], xlabel="seconds", references={"threshold": THRESHOLD},
                                   title=f"task {t}: concept accuracy against seconds (mean of seeds; vanilla at lr {base_lr:g})"),
                      os.path.join(out, f"{PREFIX}_{t}.png"))
    data["runs"] = lr_runs + factor_runs
    with open(os.path.join(out, f"{PREFIX}.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    text = tables(data)
    with open(os.path.join(out, f"{PREFIX}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("lr", "factors"), default=None)
    ap.add_argument("--part", default="0/1", metavar="I/N", help="every N-th job from the I-th, one process each")
    ap.add_argument("--base-lr", default="auto", help="vanilla's best lr for stage factors (auto: from --merge of stage lr)")
    ap.add_argument("--merge", action="store_true", help="join the parts with the step costs: tables and chart")
    ap.add_argument("--costs", action="store_true", help="every recipe's step cost, one process, interleaved")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 recipes, 1 seed, 20 steps, task A")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of recipe names to run (=name: that name only)")
    ap.add_argument("--tasks", nargs="*", default=None, help="A and/or B (default: both)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("-n", type=int, default=24, help="generated images per evaluation")
    ap.add_argument("--ddim", type=int, default=10)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--cost-rounds", type=int, default=5)
    ap.add_argument("--cost-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("docs", "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return merge(args.out)
    world = load_world()
    if args.quick:  # both stages' first recipes, tiny budgets, then the whole pipeline to the tables
        args.seeds, args.steps, args.n, args.ddim, args.cost_rounds, args.cost_steps = 1, 20, 8, 6, 1, 2
        args.tasks = args.tasks or ["A"]
        args.only = args.only or [lr_name(5e-3), BASELINE, "adaptive + caption at 2x lr, warm-up"]
        for stage in ("lr", "factors"):
            run_stage(world, args, stage, 0, 1, 5e-3)
        with open(os.path.join(args.out, f"{PREFIX}.costs.json"), "w", encoding="utf-8") as f:
            json.dump(step_costs(world, args, 5e-3), f, indent=1)
        return merge(args.out)
    if args.costs:
        base = base_lr_from(args.out, args.base_lr)
        out = step_costs(world, args, base)
        with open(os.path.join(args.out, f"{PREFIX}.costs.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(json.dumps(out, indent=1))
        return out
    if not args.stage:
        ap.error("give --stage lr or --stage factors (or --merge, --costs, --quick)")
    part, parts = (int(x) for x in args.part.split("/"))
    base = 5e-3 if args.stage == "lr" else base_lr_from(args.out, args.base_lr)
    run_stage(world, args, args.stage, part, parts, base)
    return {}


if __name__ == "__main__":
    main()
