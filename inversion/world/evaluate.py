"""How well the world model draws what it is asked: ``python -m inversion.world.evaluate``.

Generates images from full captions of random named-shape samples and reports, per attribute,
how often the judge reads the requested value; also the shape distribution the model draws for the
generic word ("a photo of a thing"), which is the chance level of the held-out concept.

``--curve DIR`` evaluates every world the trainer kept in DIR (``python -m inversion.world.train
--curve DIR``) and writes the accuracy-against-training-time curve; ``--confusion`` writes the
judge's confusion matrix on fresh renders and off-distribution images.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import numpy as np
import torch

from .judge import ATTRIBUTES, judge_accuracy, labels_tensor
from .render import GENERIC, HELD_OUT, NAMED_SHAPES, SHAPES, caption, sample_labels

__all__ = ["caption_accuracy", "generic_shape_distribution", "lost_word_rate", "main"]


def caption_accuracy(world, n: int = 64, seed: int = 0, steps: int = 20, guidance: float | None = None,
                     held_out: bool = False, per_shape: dict | None = None) -> dict[str, float]:
    """Judge accuracy per attribute on images generated from ``n`` full captions of random samples.

    Named shapes only unless ``held_out`` (the held-out shape's caption says "thing", so its shape
    cannot be asked for). ``per_shape``, if given, receives the shape accuracy per requested shape.
    """
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < n:
        s = sample_labels(rng)
        if held_out or SHAPES[s.shape] != HELD_OUT:
            samples.append(s)
    prompts = [caption(s) for s in samples]
    images = world.generate(prompts, seed=seed, steps=steps, guidance=guidance)
    pred = world.judge.predict(images)
    labels = labels_tensor(samples)
    if per_shape is not None:
        for i, name in enumerate(SHAPES):
            sel = labels["shape"] == i
            if bool(sel.any()):
                per_shape[name] = float((pred["shape"][sel] == i).float().mean())
    return {k: float((pred[k] == labels[k]).float().mean()) for k in ATTRIBUTES}


def lost_word_rate(world, prompt: str = "a photo of a <lost>", n: int = 64, seed: int = 0, steps: int = 20,
                   guidance: float | None = None) -> float | None:
    """Share of images judged to be the held-out shape when ``<lost>`` is its removed word (the ceiling
    an inverted embedding can be compared with); None if the assets do not ship that word."""
    emb = world.lost_word("<lost>")
    if emb is None:
        return None
    images = world.generate([prompt] * n, emb, seed=seed, steps=steps, guidance=guidance)
    return world.concept_share(world.judge_images(images)["shape"])


def generic_shape_distribution(world, prompt: str = f"a photo of a {GENERIC}", n: int = 64, seed: int = 0,
                               steps: int = 20, guidance: float | None = None) -> dict[str, float]:
    """The judge's shape histogram over ``n`` images of ``prompt``."""
    images = world.generate([prompt] * n, seed=seed, steps=steps, guidance=guidance)
    counts = Counter(ATTRIBUTES["shape"][i] for i in world.judge.predict(images)["shape"].tolist())
    return {s: counts.get(s, 0) / n for s in ATTRIBUTES["shape"]}


def seed_decides_shape(world, seeds: int = 48, steps: int = 20, colour: str = "yellow",
                       background: str = "gray") -> dict:
    """Does the prompt or the starting noise decide the shape? For each seed, one image per named
    shape ("a photo of a <colour> <shape> on a <background> background") from the same noise: the
    share of seeds whose images are all judged the same shape (the noise decided; with the prompt
    deciding it is 0) and the share of images showing the shape asked for."""
    prompts = [f"a photo of a {colour} {s} on a {background} background" for s in NAMED_SHAPES]
    same, hit = 0, 0
    for seed in range(seeds):
        shapes = world.judge_images(world.generate(prompts, seed=seed, steps=steps))["shape"]
        same += len(set(shapes)) == 1
        hit += sum(a == b for a, b in zip(shapes, NAMED_SHAPES))
    return {"seeds": seeds, "all_prompts_same_shape": same / seeds, "asked_shape": hit / (seeds * len(prompts))}


def quality(world, n: int = 128, steps: int = 20, guidance: float | None = None) -> dict:
    """The world's two bars (issue 12): named-shape accuracy from full captions, and the lost
    word's held-out rate, on ``n`` images each."""
    per_shape: dict = {}
    acc = caption_accuracy(world, n, steps=steps, guidance=guidance, per_shape=per_shape)
    return {"shape_accuracy_full_captions": acc["shape"], "attributes": acc, "per_shape": per_shape,
            "lost_word_rate": lost_word_rate(world, n=n, steps=steps, guidance=guidance),
            "seed_decides_shape": seed_decides_shape(world, seeds=max(8, n // 4), steps=steps)}


def curve(folder: str, n: int = 128, steps: int = 20, judge_folder: str | None = None) -> list[dict]:
    """``quality`` of every world kept during training (``step-NNNNNN`` subfolders, then the final
    world if ``folder`` holds one), with the training steps and wall time each had had."""
    from . import load_world

    points = []
    subs = sorted(d for d in os.listdir(folder) if d.startswith("step-"))
    for d in subs:
        world = load_world(os.path.join(folder, d), judge_folder=judge_folder)
        q = quality(world, n, steps)
        points.append({"steps": world.info.get("trained_steps"), "train_wall_s": world.info.get("train_wall_s"),
                       "final_loss": world.info.get("final_loss"), **q})
        print(json.dumps(points[-1]), flush=True)
    return points


def curve_markdown(points: list[dict]) -> str:
    lines = ["| training steps | wall clock (min) | named shape accuracy (full captions) | lost word's held-out rate | "
             "seeds where every shape prompt gives the same shape |", "|---|---|---|---|---|"]
    for p in points:
        sd = p.get("seed_decides_shape")
        same = "-" if not sd else f"{sd['all_prompts_same_shape']:.2f} of {sd['seeds']}"
        lines.append(f"| {p['steps']} | {p['train_wall_s'] / 60:.1f} | {p['shape_accuracy_full_captions']:.2f} | "
                     f"{p['lost_word_rate']:.2f} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from . import load_world
    from .judge import confusion, confusion_markdown

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", default=None, help="world assets folder (default: the shipped one)")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--curve", default=None, help="evaluate the worlds kept in this folder during training")
    ap.add_argument("--judge", default=None, help="judge assets folder (default: the world's own)")
    ap.add_argument("--confusion", default=None, help="write the judge's confusion matrix (Markdown) here")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.curve:
        points = curve(args.curve, args.n, args.steps, args.judge)
        print(curve_markdown(points))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(points, f, indent=1)
        return
    world = load_world(args.folder, judge_folder=args.judge)
    if args.confusion:
        c = confusion(world.judge, image_size=world.image_size)
        with open(args.confusion, "w", encoding="utf-8") as f:
            f.write(f"Judge confusion (shape head), {sum(map(sum, (r.values() for r in c['rows'].values())))} "
                    "augmented images: fresh renders of each shape and off-distribution images (row none), seeds "
                    f"the training never used (`python -m inversion.world.evaluate --confusion PATH`).\n\n"
                    + confusion_markdown(c) + "\n\n"
                    f"Renders called none: {c['renders_called_none']:.3f}; off-distribution images called a shape: "
                    f"{c['off_called_a_shape']:.3f} (per kind: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in c["off_called_a_shape_per_kind"].items()) + ").\n")
        print(confusion_markdown(c))
        return
    per_shape: dict = {}
    res = {
        "judge_on_renders": judge_accuracy(world.judge, n=512, image_size=world.image_size),
        "generated_full_captions": caption_accuracy(world, args.n, steps=args.steps, guidance=args.guidance,
                                                    per_shape=per_shape),
        "generated_shape_accuracy_per_shape": per_shape,
        "thing_shapes": generic_shape_distribution(world, n=args.n, steps=args.steps, guidance=args.guidance),
        "judge_confusion": confusion(world.judge, image_size=world.image_size),
        "empty_prompt_shapes": generic_shape_distribution(world, "", n=args.n, steps=args.steps,
                                                          guidance=args.guidance),
        "lost_word_held_out_rate": {p: lost_word_rate(world, p, args.n, steps=args.steps, guidance=args.guidance)
                                    for p in ("a photo of a <lost>", "a photo of a yellow <lost>")},
        "n": args.n, "ddim_steps": args.steps, "guidance": args.guidance or world.sampler.guidance,
    }
    res["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
