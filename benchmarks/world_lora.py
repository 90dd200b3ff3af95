"""Pivotal tuning on the miniature world (issue 25): the embedding alone against the embedding trained together
with a LoRA on the UNet, at equal steps and at equal wall clock.

Arms, on both world tasks of ``world_methods.py`` (A: yellow crescents, B: green crescents), 10 seeds each, the
node's defaults (adaptive timesteps, AdamW 5e-3, batch 1, 500 steps), concept accuracy judged at steps
10 ... 500 and edit faithfulness at the end, exactly as ``world_methods.py`` judges its rows:

- ``alone``: the default row of ``world_methods.py`` ("adaptive (tokens; the default)");
- ``+ LoRA 1e-4``: the same with LoRA Options' defaults (rank 4, alpha 4, AdamW 1e-4) on the attention
  projections (q, k, v, out) of the world's UNet, trained from the first step;
- ``+ LoRA 1e-3``: the LoRA at ten times that rate.

The judge samples with the LoRA in place (it is part of what the run learned). Per arm and task: steps and seconds
to 0.85, accuracy at the end, at equal wall clock (the LoRA arm's curve read at the time the embedding alone
takes for its 500 steps), and the edits' attribute / both scores, as paired differences against ``alone`` with
sign-flip p-values (Holm over the task's comparisons). Step costs: every arm in one process, interleaved.

    python benchmarks/world_lora.py --part 0/2 & python benchmarks/world_lora.py --part 1/2; wait
    python benchmarks/world_lora.py --costs     # alone on the machine
    python benchmarks/world_lora.py --merge     # docs/results/world_lora.{json,md}
    python benchmarks/world_lora.py --quick     # a smoke test: 1 seed, 20 steps, task A
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.world_methods import (DEFAULT, SETTINGS, TASKS, THRESHOLD, Setting, Variant, _append,  # noqa: E402
                                      _read_part, lora_group, make_trainer, measure_profile, run_one, run_to_dict,
                                      task_images, variants)
from benchmarks.world_stats import (area_under_curve, holm, median_ci, paired_difference,  # noqa: E402
                                    seconds_to_threshold, sign_flip_p, steps_to_threshold, value_at)
from inversion.methods.init import from_word  # noqa: E402
from inversion.world import GENERIC, load_world  # noqa: E402

PREFIX = "world_lora"
ALONE = "alone"


def arms() -> list[Variant]:
    default = next(v for v in variants() if v.name == DEFAULT)
    return [replace(default, name=ALONE), replace(default, name="+ LoRA 1e-4", lora_lr=1e-4),
            replace(default, name="+ LoRA 1e-3", lora_lr=1e-3)]


def _part(out: str, i: int) -> str:
    return os.path.join(out, f"{PREFIX}.part-{i}.jsonl")


def _runs(out: str) -> list[dict]:
    found, i = {}, 0
    while os.path.isfile(_part(out, i)):
        for r in _read_part(_part(out, i)):
            if r.get("kind") == "run":
                found[(r["cell"], r["variant"], r["seed"])] = r
        i += 1
    return list(found.values())


def jobs(args) -> list[tuple[str, Variant, int]]:
    chosen = [a for a in arms() if not args.only or any(s in a.name for s in args.only)]
    return [(t, a, task.first_seed + i) for i in range(args.seeds) for t, task in TASKS.items()
            if not args.tasks or t in args.tasks for a in chosen]


def run_part(world, args, part: int, parts: int, setting: Setting) -> None:
    have = {(r["cell"], r["variant"], r["seed"]) for r in _runs(args.out)}
    todo = [j for j in jobs(args)[part::parts] if (f"user-{j[0]}", j[1].name, j[2]) not in have]
    print(f"part {part}/{parts}: {len(todo)} runs to go", flush=True)
    images, profiles = {}, {}
    for t, arm, seed in todo:
        task = TASKS[t]
        if t not in images:
            images[t] = task_images(world, task, args.images)
            profiles[t] = measure_profile(world, images[t], from_word(world.text, GENERIC, 1), args.quick, "tokens")
        t0 = time.time()
        r = run_one(world, images[t], arm, setting, task, seed, args, profiles[t])
        _append(_part(args.out, part), {"kind": "run", **run_to_dict(r)})
        print(f"{t} {arm.name:12s} seed {seed}: end {r.end:.2f} curve {['%.2f' % a for a in r.concept]} "
              f"{time.time() - t0:.0f}s", flush=True)


def step_costs(world, args, setting: Setting) -> dict:
    """Seconds per step of every arm in one process: ``cost_rounds`` rounds of ``cost_steps`` steps of each arm
    in turn (the order rotated each round, after a warm-up); the median of the rounds. The LoRA arms each hold
    their own LoRA on the one world UNet in turn, so each round puts it on and takes it off around its steps."""
    task = TASKS["A"]
    images = task_images(world, task, args.images)
    profile = measure_profile(world, images, from_word(world.text, GENERIC, 1), args.quick, "tokens")
    times: dict[str, list[float]] = {a.name: [] for a in arms()}
    for rnd in range(args.cost_rounds + 1):  # round 0 warms up
        order = arms()[rnd % 3:] + arms()[:rnd % 3]
        for arm in order:
            group = lora_group(world, arm, setting, 0)
            try:
                tr = make_trainer(world, images, arm, setting, task, 0, profile, () if group is None else (group,))
                tr.train_step()
                t0 = time.perf_counter()
                for _ in range(args.cost_steps):
                    tr.train_step()
                if rnd:
                    times[arm.name].append((time.perf_counter() - t0) / args.cost_steps)
            finally:
                if group is not None:
                    group.remove()
    return {"rounds": args.cost_rounds, "steps_per_round": args.cost_steps,
            "device": f"cpu x{torch.get_num_threads()} threads",
            "seconds_per_step": {n: statistics.median(ts) for n, ts in times.items()}}


def _edit(r: dict, key: str) -> float:
    return statistics.fmean(e[key] for e in r["edits"].values())


def summarise(runs: list[dict], costs: dict, steps: int) -> dict:
    sps = costs.get("seconds_per_step", {})
    out = {}
    for t in TASKS:
        mine = [r for r in runs if r["cell"] == f"user-{t}"]
        base = {r["seed"]: r for r in mine if r["variant"] == ALONE}
        budget = steps * sps.get(ALONE, float("nan"))  # the wall clock of the embedding alone's whole run
        rows, pvals = {}, []
        for arm in arms():
            rs = {r["seed"]: r for r in mine if r["variant"] == arm.name}
            if not rs:
                continue
            cost = sps.get(arm.name, float("nan"))
            reach = [steps_to_threshold(r["steps"], r["concept"], THRESHOLD) for r in rs.values()]
            at_budget = {s: value_at(r["steps"], r["concept"], budget / cost) if cost == cost else float("nan")
                         for s, r in rs.items()}
            row = {"runs": len(rs), "cost": cost, "steps": median_ci(reach),
                   "seconds": median_ci([seconds_to_threshold(x, cost) for x in reach]),
                   "reached": sum(not math.isinf(x) for x in reach),
                   "end": statistics.fmean(r["end"] for r in rs.values()),
                   "auc": statistics.fmean(area_under_curve(r["steps"], r["concept"]) for r in rs.values()),
                   "at_equal_time": statistics.fmean(at_budget.values()),
                   "attribute": statistics.fmean(_edit(r, "attribute") for r in rs.values()),
                   "edit_both": statistics.fmean(_edit(r, "both") for r in rs.values())}
            if arm.name != ALONE and base:
                base_at = {s: value_at(r["steps"], r["concept"], steps) for s, r in base.items()}
                for key, a, b in (
                        ("end", {s: r["end"] for s, r in rs.items()}, {s: r["end"] for s, r in base.items()}),
                        ("auc", {s: area_under_curve(r["steps"], r["concept"]) for s, r in rs.items()},
                         {s: area_under_curve(r["steps"], r["concept"]) for s, r in base.items()}),
                        ("at_equal_time", at_budget, base_at),
                        ("attribute", {s: _edit(r, "attribute") for s, r in rs.items()},
                         {s: _edit(r, "attribute") for s, r in base.items()}),
                        ("edit_both", {s: _edit(r, "both") for s, r in rs.items()},
                         {s: _edit(r, "both") for s, r in base.items()})):
                    common = sorted(set(a) & set(b))
                    d = paired_difference({s: a[s] for s in common}, {s: b[s] for s in common})
                    d["p"] = sign_flip_p([a[s] - b[s] for s in common])
                    row[f"d_{key}"] = d
                    pvals.append((arm.name, key, d["p"]))
            rows[arm.name] = row
        for (name, key, _), adj in zip(pvals, holm([p for *_, p in pvals])):
            rows[name][f"d_{key}"]["p_holm"] = adj
        out[t] = rows
    return out


def _d(d: dict | None) -> str:
    if d is None:
        return "-"
    star = "*" if d.get("p_holm", 1.0) < 0.05 else ""
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{star}"


def _ci(c, fmt="{:.0f}") -> str:
    f = (lambda x: "never" if math.isinf(x) else fmt.format(x))
    return f"{f(c[0])} [{f(c[1])}, {f(c[2])}]"


def tables(summary: dict, costs: dict, seeds: int) -> str:
    lines = []
    for t, rows in summary.items():
        if not rows:
            continue
        lines += [f"Task {t} ({seeds} seeds; the node's defaults, 500 steps; paired differences against the "
                  "embedding alone, mean [95% CI], * = Holm-corrected p < 0.05):", "",
                  "| arm | s / step | steps to 0.85 (reached) | s to 0.85 | acc. at the end | end - alone "
                  "| mean acc. over the run - alone | acc. at equal wall clock - alone | edit: attribute - alone "
                  "| edit: both - alone |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['cost']:.4f} | {_ci(r['steps'])} ({r['reached']}/{r['runs']}) "
                         f"| {_ci(r['seconds'], '{:.1f}')} | {r['end']:.2f} | {_d(r.get('d_end'))} "
                         f"| {_d(r.get('d_auc'))} | {_d(r.get('d_at_equal_time'))} | {_d(r.get('d_attribute'))} "
                         f"| {_d(r.get('d_edit_both'))} |")
        lines.append("")
    lines.append(f"Step costs: {costs.get('device', '?')}, median of {costs.get('rounds', '?')} interleaved rounds "
                 "in one process. Equal wall clock: each arm's curve read at the seconds the embedding alone takes "
                 "for its 500 steps.")
    return "\n".join(lines) + "\n"


def merge(out: str, seeds: int, steps: int) -> dict:
    costs_path = os.path.join(out, f"{PREFIX}.costs.json")
    costs = json.load(open(costs_path, encoding="utf-8")) if os.path.isfile(costs_path) else {}
    runs = _runs(out)
    summary = summarise(runs, costs, steps)
    with open(os.path.join(out, f"{PREFIX}.json"), "w", encoding="utf-8") as f:
        json.dump({"costs": costs, "summary": summary, "runs": runs}, f, separators=(",", ":"))
    text = tables(summary, costs, seeds)
    with open(os.path.join(out, f"{PREFIX}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="0/1", metavar="I/N")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--costs", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 1 seed, 20 steps, task A")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("-n", type=int, default=24)
    ap.add_argument("--ddim", type=int, default=10)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--cost-rounds", type=int, default=15)  # 5 x 10 left +-15 % between two identical arms
    ap.add_argument("--cost-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join("docs", "results"))
    args = ap.parse_args(argv)
    setting = SETTINGS["user"]
    if args.quick:
        setting = Setting("user", setting.lr, setting.lr_dti, setting.batch, 20, (10,))
        args.seeds, args.n, args.ddim, args.cost_rounds, args.cost_steps = 1, 8, 6, 1, 2
        args.tasks = args.tasks or ["A"]
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return merge(args.out, args.seeds, setting.steps)
    world = load_world()
    if args.costs or args.quick:
        if args.quick:
            run_part(world, args, 0, 1, setting)
        costs = step_costs(world, args, setting)
        with open(os.path.join(args.out, f"{PREFIX}.costs.json"), "w", encoding="utf-8") as f:
            json.dump(costs, f, indent=1)
        print(json.dumps(costs, indent=1))
        return merge(args.out, args.seeds, setting.steps) if args.quick else costs
    part, parts = (int(x) for x in args.part.split("/"))
    run_part(world, args, part, parts, setting)
    return {}


if __name__ == "__main__":
    main()
