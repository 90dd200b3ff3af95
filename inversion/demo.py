"""Textual inversion end to end on the miniature world: ``python -m inversion.demo``.

Loads the shipped world model (no download, no ComfyUI), renders a few images of the shape no word
names, learns an embedding for it with the adaptive timestep method (seeds/000 Eq. 5), saves the
embedding in the single-file format ComfyUI and A1111 load, and writes a PNG grid: the concept
images, images generated from "a photo of a <concept>", and from an edited prompt. The judge
reports how many generated images show the concept, against the prompt "a photo of a thing"
(the word the model files the shape under, shared with the named shapes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .files.formats import save_embedding
from .methods.init import make_embedding
from .methods.presets import DEFAULT_METHOD, PRESETS, MethodParams, build_method
from .trainer import StepInfo, TrainConfig, Trainer, prepare_concept

__all__ = ["DemoConfig", "run_demo", "main"]

CONCEPT = "<concept>"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; ``quick()`` is the reduced form the CI test runs."""

    steps: int = 400  # ~12 s on 2 CPU cores; the concept rate has levelled off by then (see the README)
    images: int = 5  # the papers' 4-6 concept images
    batch_size: int = 4
    method: str = DEFAULT_METHOD  # the node's default method (presets.DEFAULT_METHOD)
    lr: float | None = None  # None = the preset's rate
    init_word: str = "thing"  # the class word: what the world calls the shape
    samples: int = 8  # generated images per prompt
    ddim_steps: int = 25
    seed: int = 0
    edit: str = f"a photo of a purple {CONCEPT}"  # a colour the concept images never show

    def __post_init__(self) -> None:
        if self.method not in PRESETS or PRESETS[self.method].needs_profile:
            usable = [k for k, v in PRESETS.items() if not v.needs_profile]
            raise ValueError(f"method {self.method!r} is not usable in the demo (it needs no profile); "
                             f"choose one of {usable}")
        if CONCEPT not in self.edit:
            raise ValueError(f"the edited prompt must contain {CONCEPT!r}, got {self.edit!r}")
        if self.steps < 1 or self.images < 1 or self.samples < 1:
            raise ValueError("steps, images and samples must be >= 1")

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        base = dict(steps=30, images=4, samples=4, ddim_steps=8)
        base.update(kw)
        return cls(**base)


def _progress(total: int) -> tuple[Callable[[StepInfo], None], Callable[[], None]]:
    """A tqdm bar if tqdm is installed, else a one-line text bar."""
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="inverting", unit="step", dynamic_ncols=True)

        def cb(info: StepInfo) -> None:
            bar.update(1)
            if info.step % 10 == 0 or info.step == total:
                bar.set_postfix(loss=f"{info.loss:.4f}", t=info.timesteps[0], g=f"{info.grad_norm:.3g}")

        return cb, bar.close
    except ImportError:  # pragma: no cover - tqdm is a transformers dependency
        def cb(info: StepInfo) -> None:
            done = int(30 * info.step / total)
            sys.stderr.write(f"\rinverting [{'#' * done}{'.' * (30 - done)}] {info.step}/{total} "
                             f"loss {info.loss:.4f}")
            if info.step == total:
                sys.stderr.write("\n")

        return cb, lambda: None


def run_demo(out_dir: str, config: DemoConfig = DemoConfig(), world=None, log=print) -> dict:
    """Run the demo; return a summary (paths, timings, judged concept rates)."""
    from .world import GENERIC, concept_set, load_world
    from .world.grid import image_grid

    t0 = time.time()
    world = world or load_world()
    os.makedirs(out_dir, exist_ok=True)
    images, _ = concept_set(config.images, seed=config.seed, size=world.image_size)
    emb = make_embedding(world.text, "world-crescent", init_word=config.init_word, placeholder=CONCEPT,
                         source="inversion.demo")
    concept = prepare_concept(world.latents, images, emb, flip=True)
    method = build_method(config.method, world.text, world.denoiser.num_timesteps, MethodParams(),
                          init_vectors=emb.vectors)
    train_cfg = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                            templates=world.templates, seed=config.seed)
    trainer = Trainer(world.text, world.denoiser, [concept], train_cfg, timesteps=method.sampler,
                      optimizer=method.optimizer, metadata={"method": config.method, "model": "inversion.world"})
    log(f"inverting the held-out shape from {config.images} images with '{config.method}' "
        f"({config.steps} steps, lr {trainer.lr:g})")
    cb, close = _progress(config.steps)
    t1 = time.time()
    try:
        result = trainer.run(cb)
    finally:
        close()
    train_s = time.time() - t1
    learned = result.embedding
    target = os.path.join(out_dir, f"{learned.name}.safetensors")
    if os.path.exists(target):  # the demo's own output from an earlier run: say so rather than replace silently
        log(f"replacing the earlier demo embedding {target}")
    path = save_embedding(learned, target, overwrite=True)

    n = config.samples
    prompts = {"concept": f"a photo of a {CONCEPT}", "edit": config.edit, "baseline": f"a photo of a {GENERIC}"}
    gen = {k: world.generate([p] * n, learned if CONCEPT in p else None, seed=config.seed + 1,
                             steps=config.ddim_steps) for k, p in prompts.items()}
    judged = {k: world.judge_images(v) for k, v in gen.items()}
    rate = {k: world.concept_share(j["shape"]) for k, j in judged.items()}
    grid = image_grid([images, gen["concept"], gen["edit"], gen["baseline"]],
                      ["concept images", prompts["concept"], prompts["edit"], prompts["baseline"] + " (before)"],
                      scale=4)
    grid_path = os.path.join(out_dir, "demo_grid.png")
    grid.save(grid_path)
    summary = {
        "embedding": str(path), "grid": grid_path, "method": config.method, "steps": result.steps_done,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "concept_rate": rate["concept"], "edit_concept_rate": rate["edit"], "baseline_concept_rate": rate["baseline"],
        "edit_judged": {k: judged["edit"][k] for k in ("shape", "colour", "size", "background")},
        "vector_norm": float(learned.norms()["clip_l"].mean()),
    }
    log(f"judge: {rate['concept']:.0%} of '{prompts['concept']}' images show the concept "
        f"(before inversion, '{prompts['baseline']}': {rate['baseline']:.0%}); edited prompt: {rate['edit']:.0%}")
    log(f"saved {path} and {grid_path} in {summary['total_seconds']:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-output", help="folder for the embedding and the grid PNG")
    ap.add_argument("--quick", action="store_true", help="a few steps and images (for CI)")
    ap.add_argument("--steps", type=int, default=None, help="optimisation steps")
    ap.add_argument("--method", default=DemoConfig.method, help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--world", default=None, help="world assets folder (default: the shipped model)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {"method": args.method, "seed": args.seed}
    if args.steps:
        kw["steps"] = args.steps
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    from .world import load_world

    return run_demo(args.out, cfg, world=load_world(args.world))


if __name__ == "__main__":
    main()
