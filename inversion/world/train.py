"""Train the miniature world from scratch: ``python -m inversion.world.train``.

Text encoder and UNet are trained jointly on the epsilon loss ||eps_theta(x_t, t, c(y)) - eps||^2
(Ho et al. 2020; seeds/000 Eq. 1), uniform over t as Stable Diffusion was trained, with captions dropped to "" 10 % of the time, so classifier-free
guidance works (Ho & Salimans 2022). Then the judge is trained on labelled renders. Everything is
seeded; the weights (EMA of the UNet and text encoder, fp16), the tokenizer and the configuration
are written to ``inversion/world/assets/`` (or ``--out``), which the library loads with
``inversion.world.load_world()``.

Takes 30-55 minutes on 2 CPU cores (``--steps`` trades quality for time; ``--judge-only`` and
``--world-only`` redo one half). ``--curve DIR`` also keeps the EMA weights every
``--curve-every`` steps, which ``python -m inversion.world.evaluate --curve DIR`` turns into the
accuracy-against-training-time curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

from ..data.prompts import build_prompt_batch
from .judge import JudgeTrainConfig, confusion, judge_accuracy, train_judge
from .model import (ASSETS, WorldConfig, build_encoder, build_text_model, build_tokenizer, build_unet,
                    save_config, save_weights)
from .render import HIDDEN_SLOT, CaptionConfig, training_batch

__all__ = ["WorldTrainConfig", "train_world", "train_and_save_judge", "main"]


@dataclass(frozen=True)
class WorldTrainConfig:
    # 80 min on 2 CPU cores (0.15 s a step); the bars (named shapes >= 0.90, the lost word >= 0.85) hold
    # from 20 000 steps (54 min) on; see docs/results/world_curve.md
    steps: int = 32000
    batch_size: int = 24  # more, smaller steps learn faster per sample here
    lr: float = 1e-3  # high for a diffusion model, but the net is tiny and the run short
    warmup: int = 200
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    ema: float = 0.999  # horizon ~1000 steps: smooths the last part of the run
    grad_clip: float = 1.0
    # Offset noise (Guttenberg 2023; SDXL's base training used 0.0357 on 128x128 latents): eps plus a
    # per-image, per-channel constant ~ N(0, noise_offset^2). SD's schedule keeps sqrt(abar_999) = 0.068
    # of the image, and averaged over 32 x 32 flat-coloured pixels that reads the image's colour with
    # SNR ~4.8, so without an offset the model took the colour from the starting noise and ignored the
    # prompt (measured at step 2000: two prompts with opposite backgrounds moved x0's mean colour by
    # < 0.01). 0.15 makes the noise's mean ~5x its pixel average's spread (1/32), SDXL's ratio. The
    # shape's coarse layout still leaks the same way (see docs/results/world_curve.md); multi-resolution
    # noise, which would hide it too, made a model whose samples from white noise stay noise.
    noise_offset: float = 0.15
    held_out_weight: float = 1.0  # the held-out shape is as frequent as each named one
    seed: int = 0
    captions: CaptionConfig = field(default_factory=CaptionConfig)


def _quiet(*args: object) -> None:
    pass


def _lr_at(step: int, cfg: WorldTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _adapt_threads() -> None:
    # Two threads are ~1.6x faster on an idle 2-core machine but ~3x slower than one when other
    # jobs keep the cores busy (the threads wait on each other); decide from the load average.
    mine = torch.get_num_threads()
    others = os.getloadavg()[0] - mine
    torch.set_num_threads(2 if others < 0.7 else 1)


def train_world(out: str, world: WorldConfig = WorldConfig(), cfg: WorldTrainConfig = WorldTrainConfig(),
                log=print, auto_threads: bool = False, curve: str | None = None, curve_every: int = 2500) -> dict:
    """Train and save the text encoder + UNet to ``out``; returns a summary dict.

    ``auto_threads``: switch between 1 and 2 CPU threads by the machine's load (results then
    differ from a fixed-thread run by floating-point rounding only). ``curve``: a folder that
    receives a complete world (weights, lost word, tokenizer, config with the wall time so far)
    every ``curve_every`` steps, for the accuracy-against-training-time curve.
    """
    log = log or _quiet
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokenizer = build_tokenizer(out, world)
    text_model = build_text_model(tokenizer, world)
    unet = build_unet(world)
    encoder = build_encoder(text_model, tokenizer)  # tokenisation exactly as inversion will do it
    schedule = world.schedule_obj()
    # Uniform weights over t, as SD was trained (world v1 weighted by min(1 / abar_t, 20) and was then
    # poorly trained at low noise, where its g(t) peaked).
    ema_text, ema_unet = copy.deepcopy(text_model).eval(), copy.deepcopy(unet).eval()
    for m in (ema_text, ema_unet):
        m.requires_grad_(False)
    # The held-out shape's word: a vector spliced in at HIDDEN_SLOT exactly as textual inversion
    # splices a learned one, trained with the model, then kept out of tokenizer and table.
    hidden = torch.nn.Parameter(torch.randn(1, world.text.hidden) * text_model.config.initializer_range)
    ema_hidden = hidden.detach().clone()
    params = list(text_model.parameters()) + list(unet.parameters()) + [hidden]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_model.parameters())
    log(f"unet {n_params[0] / 1e6:.2f}M params, text encoder {n_params[1] / 1e6:.2f}M, {cfg.steps} steps "
        f"x {cfg.batch_size}, threads {torch.get_num_threads()}")
    t0 = time.time()
    losses: list[float] = []
    seen = torch.zeros(len(tokenizer), dtype=torch.bool)
    for step in range(cfg.steps):
        images, caps, _ = training_batch(rng, cfg.batch_size, world.image_size, cfg.captions, cfg.held_out_weight)
        x0 = images * 2 - 1
        noise = torch.randn_like(x0)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1)
        t = torch.randint(0, world.num_timesteps, (cfg.batch_size,))
        x_t = schedule.add_noise(x0, noise, t)
        batch = build_prompt_batch(encoder, caps, {HIDDEN_SLOT: (0, 1)})
        seen[batch.ids[batch.slots < 0].unique()] = True
        context = encoder.encode(batch.ids, batch.slots, hidden).hidden
        per = (unet(x_t, t, context) - noise).square().flatten(1).mean(1)
        loss = per.mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((text_model, ema_text), (unet, ema_unet)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - decay)
            ema_hidden.lerp_(hidden.detach(), 1 - decay)
        losses.append(per.mean().item())
        if auto_threads and step % 50 == 0:
            _adapt_threads()
        if curve and (step + 1) % curve_every == 0 and step + 1 < cfg.steps:
            snap = os.path.join(curve, f"step-{step + 1:06d}")
            os.makedirs(snap, exist_ok=True)
            for f in os.listdir(out):  # the tokenizer files build_tokenizer wrote
                if f.endswith((".txt", ".json")) and f != "world.json":
                    shutil.copy(os.path.join(out, f), snap)
            _save_world(snap, world, cfg, ema_text, ema_unet, ema_hidden, seen, step + 1, time.time() - t0, losses)
        if step % 50 == 0 or step == cfg.steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (cfg.steps - step - 1)
            log(f"step {step:5d}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} lr {_lr_at(step, cfg):.2e} "
                f"threads {torch.get_num_threads()} "
                f"elapsed {el / 60:.1f} min eta {eta / 60:.1f} min")
            sys.stdout.flush()
    wall = time.time() - t0
    summary = _save_world(out, world, cfg, ema_text, ema_unet, ema_hidden, seen, cfg.steps, wall, losses)
    log(f"saved world to {out} after {wall / 60:.1f} min; final loss {summary['final_loss']:.4f}")
    return summary


def _save_world(out: str, world: WorldConfig, cfg: WorldTrainConfig, ema_text, ema_unet, ema_hidden: torch.Tensor,
                seen: torch.Tensor, steps: int, wall: float, losses: list[float]) -> dict:
    """Weights (EMA, fp16), the lost word and the config with a training summary, into ``out``."""
    text = copy.deepcopy(ema_text)
    _settle_unseen_rows(text.get_input_embeddings().weight, seen, cfg.seed)
    meta = {"format": "inversion-world", "seed": str(cfg.seed), "steps": str(steps)}
    save_weights(os.path.join(out, "world.safetensors"), {"text": text, "unet": ema_unet}, meta)
    # Not part of the model: the lost word, kept only so benchmarks can compare learned vectors with it.
    save_file({"vector": ema_hidden.to(torch.float16).contiguous()}, os.path.join(out, "held_out_word.safetensors"),
              metadata={"format": "inversion-world-held-out-word", "slot": HIDDEN_SLOT})
    n_params = sum(p.numel() for p in ema_unet.parameters()), sum(p.numel() for p in text.parameters())
    summary = {"train": _plain(asdict(cfg)), "train_wall_s": round(wall, 1), "trained_steps": steps,
               "final_loss": float(np.mean(losses[-200:])), "unet_params": n_params[0],
               "text_params": n_params[1]}
    save_config(os.path.join(out, "world.json"), world, summary)
    return summary


@torch.no_grad()
def _settle_unseen_rows(table: torch.Tensor, seen: torch.Tensor, seed: int) -> None:
    """Give the token-table rows that no caption used random directions at the seen rows' mean norm.

    The BPE vocabulary holds ~280 character and partial-word tokens that world captions never use,
    so they keep their tiny initial norm. Left so, they would make the table's statistics (DTI's
    m* = mean vocabulary norm, seeds/002; nearest-token searches, seeds/003) describe the
    initialisation rather than the words. No world prompt reads these rows, so the model's outputs
    are unchanged; only the table looks like a fully trained vocabulary (as CLIP's does).
    """
    unseen = ~seen
    if not bool(unseen.any()):
        return
    m = table[seen].float().norm(dim=-1).mean()
    g = torch.Generator().manual_seed(seed + 7)
    r = torch.randn(int(unseen.sum()), table.shape[1], generator=g)
    table[unseen] = (r / r.norm(dim=-1, keepdim=True) * m).to(table.dtype)


def _plain(d):
    return json.loads(json.dumps(d, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def train_and_save_judge(out: str, world: WorldConfig = WorldConfig(),
                         cfg: JudgeTrainConfig = JudgeTrainConfig(), log=print) -> dict:
    log = log or _quiet
    t0 = time.time()
    judge = train_judge(cfg, world.image_size, log=log)
    save_weights(os.path.join(out, "judge.safetensors"), {"judge": judge},
                 {"format": "inversion-world-judge", "seed": str(cfg.seed)})
    acc = judge_accuracy(judge, image_size=world.image_size)
    acc_aug = judge_accuracy(judge, image_size=world.image_size, augmented=True)
    report = {"judge_train": asdict(cfg), "judge_wall_s": round(time.time() - t0, 1),
              "judge_accuracy_fresh_renders": acc, "judge_accuracy_augmented_renders": acc_aug,
              "shape_confusion_augmented": confusion(judge, image_size=world.image_size)}
    with open(os.path.join(out, "judge.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    log(f"judge accuracy on 512 fresh renders: {acc}; augmented: {acc_aug}")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=ASSETS, help="folder for weights, tokenizer and config")
    ap.add_argument("--steps", type=int, default=WorldTrainConfig.steps, help="world-model training steps")
    ap.add_argument("--judge-steps", type=int, default=JudgeTrainConfig.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=WorldTrainConfig.batch_size)
    ap.add_argument("--curve", default=None, help="keep a complete world every --curve-every steps in this folder")
    ap.add_argument("--curve-every", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads; 0 = choose 1 or 2 by the machine's load as training goes")
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--world-only", action="store_true", help="train only the diffusion model")
    part.add_argument("--judge-only", action="store_true", help="train only the judge")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(1)
    world = WorldConfig()
    if not args.judge_only:
        train_world(args.out, world, WorldTrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size),
                    auto_threads=not args.threads, curve=args.curve, curve_every=args.curve_every)
    if not args.world_only:
        train_and_save_judge(args.out, world, JudgeTrainConfig(steps=args.judge_steps, seed=args.seed + 1))


if __name__ == "__main__":
    main()
