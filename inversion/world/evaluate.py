"""How well the world model draws what it is asked: ``python -m inversion.world.evaluate``.

Generates images from full captions of random named-shape samples and reports, per attribute,
how often the judge reads the requested value; also the shape distribution the model draws for the
generic word ("a photo of a thing"), which is the chance level of the held-out concept.
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
from .render import GENERIC, HELD_OUT, SHAPES, caption, sample_labels

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
    counts = Counter(SHAPES[i] for i in world.judge.predict(images)["shape"].tolist())
    return {s: counts.get(s, 0) / n for s in SHAPES}


def main(argv: list[str] | None = None) -> None:
    from . import load_world

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", default=None, help="world assets folder (default: the shipped one)")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    t0 = time.time()
    world = load_world(args.folder)
    per_shape: dict = {}
    res = {
        "judge_on_renders": judge_accuracy(world.judge, n=512, image_size=world.image_size),
        "generated_full_captions": caption_accuracy(world, args.n, steps=args.steps, guidance=args.guidance,
                                                    per_shape=per_shape),
        "generated_shape_accuracy_per_shape": per_shape,
        "thing_shapes": generic_shape_distribution(world, n=args.n, steps=args.steps, guidance=args.guidance),
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
