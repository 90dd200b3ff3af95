"""The inversion methods measured on the miniature world (issue 7).

For each method (timestep strategy x optimiser x initialisation) and several seeds, the held-out
shape is inverted from the same concept images and checked by the world's judge:

- concept accuracy vs optimisation step: the share of images generated from "a photo of a <c>"
  that the judge reads as the held-out shape (seeds/000 Fig. 2a uses CLIP similarity instead);
- steps to reach 90 % of the best final accuracy (the best over methods);
- prompt faithfulness: edited prompts ("a photo of a big <c> on a white background") scored on the
  requested attributes, with the concept kept (seeds/002's text alignment);
- the learned vector's norm against the norm range of the world's words (seeds/002 Fig. 1);
- the g(t) curve the profiler measures on this model (seeds/000 Eq. 4, Fig. 1).

    python benchmarks/world_methods.py                 # all methods, 5 seeds (~30 min on 2 cores)
    python benchmarks/world_methods.py --quick         # 2 methods, 1 seed, a few steps (smoke test)

Writes docs/results/world_methods.json and PNG charts next to it, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inversion.charts import curves_chart, profile_chart  # noqa: E402
from inversion.imageprep import to_pil  # noqa: E402
from inversion.init import from_text, from_word  # noqa: E402
from inversion.embedding import LearnedEmbedding  # noqa: E402
from inversion.presets import MethodParams, build_method  # noqa: E402
from inversion.profiler import profile_gradients  # noqa: E402
from inversion.trainer import TrainConfig, Trainer, prepare_concept  # noqa: E402
from inversion.world import GENERIC, HELD_OUT, concept_set, load_world  # noqa: E402
from inversion.world.grid import image_grid  # noqa: E402

C = "<c>"
CONCEPT_COLOUR = "yellow"
EDITS = (  # prompt, requested attributes
    (f"a photo of a big {C} on a white background", {"size": "big", "background": "white"}),
    (f"a photo of a small {C} on a black background", {"size": "small", "background": "black"}),
    (f"a photo of a purple {C}", {"colour": "purple"}),
)


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    init: str = f"word:{GENERIC}"  # word:<w> (k copies), text:<caption> (one vector per token)
    interval: tuple[int, int] | None = None  # for preset "interval"
    single_t: int | None = None  # for preset "single_step" (None: the g(t) peak)
    group: str = "timesteps"


def variants() -> list[Variant]:
    return [
        Variant("vanilla [0,1000)", "vanilla"),  # also the class-word row of the init group
        Variant("interval [900,999]", "interval", interval=(900, 999)),
        Variant("interval [0,100]", "interval", interval=(0, 100)),
        Variant("high-grad window", "high_grad"),
        Variant("interval [350,450] (paper's)", "interval", interval=(350, 450)),
        Variant("single t (g peak)", "single_step"),
        Variant("single t=400 (paper's)", "single_step", single_t=400),
        Variant("adaptive", "adaptive"),
        Variant("directional (DTI)", "directional", group="optimiser"),
        Variant("adaptive + DTI", "adaptive_directional", group="optimiser"),
        Variant("init neutral '*'", "vanilla", init="word:*", group="init"),
        Variant(f"init caption '{CONCEPT_COLOUR} {GENERIC}'", "vanilla", init=f"text:{CONCEPT_COLOUR} {GENERIC}",
                group="init"),
    ]


@dataclass
class RunResult:
    variant: str
    seed: int
    steps: list[int] = field(default_factory=list)
    concept: list[float] = field(default_factory=list)  # held-out shape share per eval step
    concept_colour: list[float] = field(default_factory=list)  # shape and concept colour
    norm: list[float] = field(default_factory=list)
    cos_true: list[float] = field(default_factory=list)  # cosine to the held-out shape's lost word
    loss: list[float] = field(default_factory=list)
    edits: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    timesteps: str = ""
    samples: list = field(default_factory=list, repr=False)  # final images (concept prompt, first edit)
    final: object = field(default=None, repr=False)  # the learned LearnedEmbedding (not serialised)


SERIALISED = ("variant", "seed", "steps", "concept", "concept_colour", "norm", "cos_true", "loss", "edits",
              "train_seconds", "timesteps")


def run_to_dict(r: RunResult) -> dict:
    d = {k: getattr(r, k) for k in SERIALISED}
    d["loss"] = [round(x, 5) for x in r.loss]
    return d


def init_vectors(world, spec: str) -> dict[str, torch.Tensor]:
    kind, _, text = spec.partition(":")
    if kind == "word":
        return from_word(world.text, text, 1)
    if kind == "text":
        return from_text(world.text, text)
    raise ValueError(f"init spec {spec!r}: use word:<w> or text:<caption>")


def judge_concept(world, emb: LearnedEmbedding, prompt: str, n: int, seed: int, ddim: int,
                  keep: list | None = None) -> tuple[float, float, dict]:
    imgs = world.generate([prompt] * n, emb, seed=seed, steps=ddim)
    if keep is not None:
        keep.append(imgs[:8])
    j = world.judge_images(imgs)
    shape = [s == HELD_OUT for s in j["shape"]]
    both = [s and c == CONCEPT_COLOUR for s, c in zip(shape, j["colour"])]
    return sum(shape) / n, sum(both) / n, j


def run_one(world, concept_images, v: Variant, seed: int, args, profile) -> RunResult:
    vec = init_vectors(world, v.init)
    emb = LearnedEmbedding("concept", vec, C, {"init": v.init})
    data = prepare_concept(world.latents, concept_images, emb, flip=True)
    params = MethodParams(interval=v.interval or (350, 450),
                          single_t=v.single_t if v.single_t is not None else args.peak_t)
    method = build_method(v.preset, world.text, world.denoiser.num_timesteps, params, profile=profile,
                          init_vectors=vec)
    lr = args.lr_dti if v.preset in ("directional", "adaptive_directional") else args.lr
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, templates=world.templates, seed=seed)
    tr = Trainer(world.text, world.denoiser, [data], cfg, timesteps=method.sampler, optimizer=method.optimizer)
    res = RunResult(v.name, seed, timesteps=method.sampler.describe())
    evals = sorted(set([0] + [s for s in args.evals if s <= args.steps] + [args.steps]))
    prompt = f"a photo of a {C}"

    def evaluate(step: int) -> None:
        e = tr.embeddings()[0]
        keep = res.samples if step == args.steps and seed == 0 else None
        a, b, _ = judge_concept(world, e, prompt, args.n, 1000 + seed, args.ddim, keep)
        res.steps.append(step)
        res.concept.append(a)
        res.concept_colour.append(b)
        res.norm.append(float(e.norms()["clip_l"].mean()))
        if world.held_out_word is not None:
            v = e.vectors["clip_l"].float()
            res.cos_true.append(float(torch.nn.functional.cosine_similarity(
                v, world.held_out_word.float().expand_as(v), dim=-1).max()))

    evaluate(0)
    t0 = time.time()
    spent = 0.0
    while tr.step < args.steps:
        info = tr.train_step()
        res.loss.append(info.loss)
        if tr.step in evals:
            spent += time.time() - t0
            evaluate(tr.step)
            t0 = time.time()
    spent += time.time() - t0
    res.train_seconds = round(spent, 1)
    res.final = tr.embeddings()[0]
    res.edits = judge_edits(world, res.final, seed, args, res.samples if seed == 0 else None)
    return res


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
            a, b, _ = judge_concept(world, emb, prompt, args.n, 1000 + seed, args.ddim)
            r = RunResult(name, seed, steps=[0], concept=[a], concept_colour=[b], timesteps="-")
            r.norm = [float(emb.norms()["clip_l"].mean())] if emb is not None else [float("nan")]
            r.edits = judge_edits(world, emb, seed, args)
            out.append(r)
    return out


def steps_to(threshold: float, steps: list[int], acc: list[float]) -> int | None:
    for s, a in zip(steps, acc):
        if a >= threshold:
            return s
    return None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else float("nan")


def final_of(r: RunResult, last: int) -> float:
    """A run's final accuracy: the mean of its last ``last`` evaluations (one is a noisy estimate)."""
    return mean(r.concept[-last:])


def summarise(results: list[RunResult], names: list[str], last: int = 3) -> dict:
    """Per method: accuracy curves averaged over seeds, final accuracy (mean of the last ``last``
    evaluations, then over seeds), steps until the seed-averaged curve first reaches 90 % of the
    best method's final accuracy, and the area under the accuracy curve (mean accuracy over the
    run, by the trapezoid rule over steps: a convergence-speed measure that uses every evaluation)."""
    by = {n: [r for r in results if r.variant == n] for n in names}
    by = {n: rs for n, rs in by.items() if rs}
    trained = {n: rs for n, rs in by.items() if len(rs[0].steps) > 1}
    final_best = max(mean([final_of(r, last) for r in rs]) for rs in trained.values()) if trained else float("nan")
    thr = 0.9 * final_best
    table = {}
    for n, rs in by.items():
        steps = rs[0].steps
        curve = [mean([r.concept[i] for r in rs]) for i in range(len(steps))]
        finals = [final_of(r, last) for r in rs]
        auc = None
        if len(steps) > 1:
            area = sum((steps[i + 1] - steps[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(steps) - 1))
            auc = area / (steps[-1] - steps[0])
        table[n] = {
            "steps": steps,
            "concept_mean": curve,
            "final_concept": mean(finals),
            "final_concept_sd": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "final_concept_colour": mean([mean(r.concept_colour[-last:]) for r in rs]),
            "steps_to_90pct_best": steps_to(thr, steps, curve) if len(steps) > 1 else None,
            "auc": auc,
            "final_norm": mean([r.norm[-1] for r in rs]),
            "norm_mean": [mean([r.norm[i] for r in rs]) for i in range(len(steps))],
            "final_cos_to_lost_word": mean([r.cos_true[-1] for r in rs if r.cos_true]),
            "edit_attribute": mean([mean([e["attribute"] for e in r.edits.values()]) for r in rs]),
            "edit_concept": mean([mean([e["concept"] for e in r.edits.values()]) for r in rs]),
            "edit_both": mean([mean([e["both"] for e in r.edits.values()]) for r in rs]),
            "edit_both_per_prompt": {p: mean([r.edits[p]["both"] for r in rs]) for p in rs[0].edits},
            "train_seconds": mean([r.train_seconds for r in rs]),
            "timesteps": rs[0].timesteps,
            "seeds": len(rs),
        }
    return {"threshold_90pct_of_best": thr, "best_final": final_best, "final_over_last_evals": last,
            "methods": table}


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def markdown(summary: dict, vocab: dict) -> str:
    lines = [
        "| method | timesteps | concept acc. (final) | + colour | steps to 90% of best | mean acc. over run | "
        "edit: attribute | edit: concept kept | edit: both | norm | cos to lost word |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in summary["methods"].items():
        lines.append(
            f"| {n} | {r['timesteps']} | {r['final_concept']:.2f} ± {r['final_concept_sd']:.2f} | "
            f"{r['final_concept_colour']:.2f} | {_f(r['steps_to_90pct_best'], '{:.0f}')} | {_f(r['auc'])} | "
            f"{r['edit_attribute']:.2f} | {r['edit_concept']:.2f} | {r['edit_both']:.2f} | {_f(r['final_norm'])} | "
            f"{_f(r['final_cos_to_lost_word'])} |")
    lines.append("")
    lines.append(f"Norms of the world's words: min {vocab['min']:.2f}, mean {vocab['mean']:.2f}, max {vocab['max']:.2f}"
                 + (f"; the lost word's norm {vocab['lost_word_norm']:.2f}" if vocab.get("lost_word_norm") else "")
                 + f". 90% of the best final accuracy = {summary['threshold_90pct_of_best']:.2f}; final = mean of the "
                 f"last {summary['final_over_last_evals']} evaluations.")
    return "\n".join(lines)


def measure_profile(world, images, vectors: dict, quick: bool) -> "object":
    """g(t) (seeds/000 Eq. 4) on the concept images with ``vectors`` in the placeholder, 20 bins."""
    emb = LearnedEmbedding("concept", vectors, C)
    data = prepare_concept(world.latents, images, emb, flip=True)
    return profile_gradients(world.text, world.denoiser, [data], bins=20, samples_per_bin=4 if quick else 64,
                             batch_size=16, templates=world.templates)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--evals", type=int, nargs="+", default=[10, 25, 50, 75, 100, 150, 200, 300, 400, 500])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3, help="AdamW rate (A1111/diffusers default)")
    ap.add_argument("--lr-dti", type=float, default=1e-2, help="Riemannian SGD step in radians (DTI authors)")
    ap.add_argument("-n", type=int, default=48, help="generated images per evaluation")
    ap.add_argument("--ddim", type=int, default=12, help="DDIM steps per generated image")
    ap.add_argument("--images", type=int, default=5, help="concept images")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 20 steps: a smoke test")
    ap.add_argument("--replot", action="store_true",
                    help="rebuild the table and charts from OUT/world_methods.json without running anything")
    ap.add_argument("--out", default=os.path.join("docs", "results"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--world", default=None, help="world assets folder (default: the shipped model)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.evals, args.n, args.ddim = 1, 20, [10], 8, 6
        args.only = args.only or ["vanilla", "adaptive"]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    world = load_world(args.world)
    images, _ = concept_set(args.images, seed=0, size=world.image_size, colour=CONCEPT_COLOUR)

    # g(t) with the class word in the placeholder: what the high-grad window and the adaptive
    # sampler's initial density come from.
    profile = measure_profile(world, images, from_word(world.text, GENERIC, 1), args.quick)
    window = profile.best_window(100)
    args.peak_t = int(profile.centers()[int(profile.mean.argmax())])
    print(f"g(t) profile: best 100-step window {window}, peak bin centre t={args.peak_t}")

    norms = world.vocab_norms()
    vocab = {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max()),
             "table_mean": float(world.encoder.token_table().norm(dim=-1).mean()),
             "lost_word_norm": None if world.held_out_word is None else float(world.held_out_word.norm())}

    vs = [v for v in variants() if not args.only or any(s in v.name for s in args.only)]
    results: list[RunResult] = reference_runs(world, args)
    for r in results[::args.seeds]:
        print(f"{r.variant:36s}: concept {r.concept[0]:.2f} edits {[round(e['both'], 2) for e in r.edits.values()]}")
    for v in vs:
        for seed in range(args.seeds):
            r = run_one(world, images, v, seed, args, profile)
            results.append(r)
            print(f"{v.name:36s} seed {seed}: concept {r.concept[-1]:.2f} (curve {['%.2f' % a for a in r.concept]}) "
                  f"norm {r.norm[-1]:.2f} edits {[round(e['both'], 2) for e in r.edits.values()]} "
                  f"{r.train_seconds:.0f}s", flush=True)
    # seeds/000 Fig. 1 plots g(t) after optimisation: measure it again with a learned vector.
    after = next((r for r in results if r.variant.startswith("vanilla") and r.final is not None), None)
    profile_after = measure_profile(world, images, after.final.vectors, args.quick) if after else None

    out = {
        "config": {k: v for k, v in vars(args).items()},
        "profile": profile.to_dict() | {"window": list(window), "peak_t": args.peak_t},
        "profile_after": None if profile_after is None else profile_after.to_dict() | {
            "window": list(profile_after.best_window(100)), "vector": f"{after.variant}, seed {after.seed}"},
        "vocab_norms": vocab,
        "runs": [run_to_dict(r) for r in results],
        "methods": [asdict(v) for v in vs],
        "edits": [p for p, _ in EDITS],
        "wall_seconds": round(time.time() - t_start, 1),
        "device": f"cpu x{torch.get_num_threads()} threads",
    }
    for key in ("profile", "profile_after"):
        if out[key]:
            out[key].pop("t", None)
            out[key].pop("g", None)
    firsts = [r for r in results if r.seed == 0 and len(r.samples) == 2]
    if firsts:
        rows = [images] + [torch.cat(r.samples) for r in firsts]
        labels = ["concept images"] + [f"{r.variant}: <c> | {EDITS[0][0][13:]}" for r in firsts]
        image_grid(rows, labels, scale=2).save(os.path.join(args.out, "world_samples.png"))
    with open(os.path.join(args.out, "world_methods.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))  # every curve of every run; the summary is world_summary.json
    replot(args.out)
    print(f"wrote {args.out}/world_methods.json and charts in {time.time() - t_start:.0f} s")
    return out


def replot(out_dir: str) -> dict:
    """Summary table (printed and written as world_methods.md) and charts from world_methods.json."""
    from inversion.profiler import GradProfile

    with open(os.path.join(out_dir, "world_methods.json"), encoding="utf-8") as f:
        data = json.load(f)
    results = [RunResult(**r) for r in data["runs"]]
    names = list(dict.fromkeys(r.variant for r in results))
    summary = summarise(results, names)
    table = markdown(summary, data["vocab_norms"])
    print()
    print(table)
    with open(os.path.join(out_dir, "world_methods.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "world_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    groups = {m["name"]: m["group"] for m in data["methods"]}
    profiles = [(GradProfile.from_dict(data[k]), tuple(data[k]["window"]), title) for k, title in (
        ("profile", f"g(t) with the class word '{GENERIC}' (before)"),
        ("profile_after", "g(t) with a learned vector (after)")) if data.get(k)]
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
                                ("init", "world_accuracy_init.png", "initialisation")):
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

if __name__ == "__main__":
    main()
