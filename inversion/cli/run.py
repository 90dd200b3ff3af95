"""``python -m inversion.train CONFIG`` (console script ``inversion-train``): many concepts, headless, and
across GPUs and machines with torchrun.

One process trains every concept of the config file (``inversion.cli.config``) in turn. Under
``torchrun`` (or ``accelerate launch``, which starts torchrun) the concepts are shared out: concept i is
trained by rank i mod N, each rank on its own device (``cuda:LOCAL_RANK``, else the CPU) with the model
loaded once per rank, and rank 0 writes the combined report. With ``--data-parallel`` every concept is
trained by all ranks together (``inversion.replica``: each rank takes its share of the global batch
``batch_size`` and the vectors' gradients are averaged), rank 0 writing the files. torch.distributed does
the communication (gloo on CPUs, NCCL on GPUs); nothing here starts processes or opens sockets.

Each concept writes what the nodes write: ``<out>/<name>.safetensors`` (the file ComfyUI, A1111/Forge and
diffusers load) and the run's state in ``<runs>/<name>/`` that ``if_exists = resume`` continues exactly,
under the same rules (``inversion.files.runs``). A progress bar per concept, a one-line summary when it
ends, and a JSON report (loss curve, time, final norm, path per concept). Ctrl-C keeps the last good
state, as Cancel does in ComfyUI. ``--dry-run`` checks the whole file (every key, every image folder)
and lists what would run where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..data.dataset import load_concept_folder
from ..files.runs import RunFiles
from ..files.safefile import atomic_write_text
from ..methods.init import make_embedding
from ..methods.presets import PRESETS, build_method
from ..methods.profiler import profile_gradients
from ..concepts import prepare_concept
from ..trainer import Trainer
from .config import ConceptSpec, ConfigError, RunConfig, load_config
from .models import Model, load_model

__all__ = ["main", "console", "Launch", "train_concept", "assign"]


@dataclass
class Launch:
    """Where this process stands in the job: its rank among ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @classmethod
    def from_env(cls) -> "Launch":
        """torchrun's (and accelerate's) environment; a plain process is rank 0 of 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing in a plain process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def assign(n_concepts: int, launch: Launch, data_parallel: bool) -> list[int]:
    """The concepts this rank trains: i with i mod N = rank, or all of them with ``data_parallel``."""
    if data_parallel or launch.world_size == 1:
        return list(range(n_concepts))
    return [i for i in range(n_concepts) if i % launch.world_size == launch.rank]


def _say(launch: Launch, message: str) -> None:
    prefix = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
    print(prefix + message, file=sys.stderr, flush=True)


class _Bar:
    """A tqdm bar per concept (plain lines where tqdm is missing); the trainer's callback."""

    def __init__(self, name: str, total: int, start: int, launch: Launch, quiet: bool):
        self.name, self.total, self.launch, self.quiet = name, total, launch, quiet
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc=(f"[rank {launch.rank}] " if launch.world_size > 1
                                                                  else "") + name, position=launch.local_rank,
                                leave=True, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, info) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{info.loss:.4f}", refresh=False)
        elif not self.quiet and (info.step % 50 == 0 or info.step == self.total):
            _say(self.launch, f"{self.name}: step {info.step}/{self.total} loss {info.loss:.4f}")
        for w in info.warnings:
            _say(self.launch, f"{self.name}: {w}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_concept(model: Model, cfg: RunConfig, c: ConceptSpec, launch: Launch, data_parallel: bool = False,
                  quiet: bool = False) -> dict[str, Any]:
    """One concept from its folder to its file: images, init, profile (high_grad*), method, run files,
    the trainer. Returns its summary for the report. Only the rank that owns the files writes them."""
    t0 = time.perf_counter()
    writer = not data_parallel or launch.rank == 0
    opts = c.training_options(model.option_defaults)
    loaded = load_concept_folder(c.images, c.size or model.native_size, c.fit, c.alpha_as_mask)
    for name, why in loaded.skipped:
        _say(launch, f"{c.name}: skipped {name}: {why}")
    pixels, masks = loaded.pixels()
    emb = make_embedding(model.text, c.name, init_text=c.init_text.strip() or None,
                         init_word=c.init_word.strip() or None, k=c.k)
    concept = prepare_concept(model.latents, pixels, emb, captions=loaded.captions_for(emb.placeholder), masks=masks,
                              flip=opts.flip)
    T = model.denoiser.num_timesteps
    profile = None
    if PRESETS[c.method].needs_profile:
        p = c.profile
        profile = profile_gradients(model.text, model.denoiser, [concept], bins=p.bins, samples_per_bin=p.samples_per_bin,
                                    batch_size=p.batch_size, seed=p.seed, templates=opts.template_list(),
                                    reading=opts.g_reading, autocast_dtype=model.autocast_dtype)
    method = build_method(c.method, model.text, T, opts.method, profile=profile, init_vectors=emb.vectors,
                          init_text=c.init_text.strip() or None)
    kw = {"warn": lambda m: _say(launch, f"{c.name}: {m}"), "interrupted": (KeyboardInterrupt,)}
    files, resume = RunFiles.open([c.name], c.if_exists, cfg.out, cfg.runs, **kw)
    config = opts.train_config(steps=c.steps, batch_size=c.batch_size, seed=c.seed, lr=c.learning_rate or None,
                               autocast_dtype=model.autocast_dtype, loss_scale=model.loss_scale)
    replica = None
    if data_parallel and launch.distributed:
        from ..replica import TorchReplica

        replica = TorchReplica()
    metadata = {"method": c.method, "model_family": model.family, "batch_size": str(c.batch_size),
                "trainer": "inversion-train", "images": str(len(loaded))}
    trainer = Trainer(model.text, model.denoiser, [concept], config, timesteps=method.sampler,
                      optimizer=method.optimizer, regularizers=opts.regularizers(1), resume=resume,
                      checkpoint=files.checkpoint if writer else None, snapshot=files.snapshot if writer else None,
                      metadata=metadata, replica=replica)
    bar = _Bar(c.name, c.steps, trainer.step, launch, quiet or not writer)
    try:
        if writer:
            result, written = files.run(trainer, bar)
            path = str(written[0])
        else:  # a data-parallel rank > 0: the same steps, no files (rank 0 writes them)
            result, path = trainer.run(bar), ""
    finally:
        bar.close()
    emb = result.embedding
    summary = {"name": c.name, "path": path, "rank": launch.rank, "method": c.method, "steps": result.steps_done,
               "seconds": round(time.perf_counter() - t0, 2), "loss": [round(x, 6) for x in result.history.loss],
               "final_loss": result.history.loss[-1] if result.history.loss else None,
               "final_norm": {k: float(v.norm(dim=-1).mean()) for k, v in emb.vectors.items()},
               "stop_reason": result.stop_reason, "images": len(loaded), "lr": trainer.lr}
    if writer:
        norm = ", ".join(f"{k} {v:.3f}" for k, v in summary["final_norm"].items())
        _say(launch, f"{c.name}: {result.steps_done} steps in {summary['seconds']:.1f} s, final loss "
             f"{summary['final_loss']:.4f}, norm {norm}" + (f", {result.stop_reason}" if result.stop_reason else "")
             + f" -> {path}")
    return summary


def _dry_run(cfg: RunConfig, launch: Launch, data_parallel: bool) -> None:
    """Every image folder read (not encoded), and what would run on which rank."""
    if launch.rank == 0:
        print(f"model: {cfg.model}\nout: {cfg.out}\nruns: {cfg.runs}\nreport: {cfg.report}")
        for i, c in enumerate(cfg.concepts):
            loaded = load_concept_folder(c.images, c.size or 64, c.fit, c.alpha_as_mask)
            rank = ("one process" if launch.world_size == 1 else "all ranks" if data_parallel
                    else f"rank {i % launch.world_size}")
            line = cfg.describe()[i]
            print(f"  [{rank}] {line} ({len(loaded)} images" + (f", {len(loaded.skipped)} skipped" if loaded.skipped
                                                             else "") + ")")
        print(f"{len(cfg.concepts)} concept(s) would run; nothing was trained (--dry-run)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inversion.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the TOML or JSON file (inversion.cli.config documents its keys)")
    ap.add_argument("--dry-run", action="store_true", help="check the whole file and list what would run")
    ap.add_argument("--data-parallel", action="store_true",
                    help="under torchrun: all ranks train each concept together (global batch = batch_size)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (summaries still)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    launch = Launch.from_env()
    try:
        if args.dry_run:
            try:
                _dry_run(cfg, launch, args.data_parallel)
            except ValueError as e:
                print(f"config error: {e}", file=sys.stderr)
                return 2
            return 0
        return _train(cfg, launch, args)
    finally:
        launch.close()


def _train(cfg: RunConfig, launch: Launch, args) -> int:
    t0 = time.perf_counter()
    model = load_model(cfg.model, launch.device, cfg.model_config)
    mine = assign(len(cfg.concepts), launch, args.data_parallel)
    summaries = []
    for i in mine:
        c = cfg.concepts[i]
        try:
            summaries.append(train_concept(model, cfg, c, launch, args.data_parallel, args.quiet))
        except KeyboardInterrupt:
            _say(launch, f"{c.name}: interrupted; the last good state is kept (if_exists = resume continues it)")
            return 130
        except ValueError as e:  # bad input, a diverged run: say which concept, stop the job (torchrun stops the rest)
            _say(launch, f"{c.name}: {e}")
            return 1
    everyone = [s for part in launch.gather(summaries) for s in part]
    if launch.rank == 0:
        order = {c.name: i for i, c in enumerate(cfg.concepts)}
        everyone.sort(key=lambda s: order[s["name"]])
        report = {"config": str(cfg.source or ""), "model": cfg.model, "world_size": launch.world_size,
                  "data_parallel": bool(args.data_parallel), "wall_seconds": round(time.perf_counter() - t0, 2),
                  "concepts": [s for s in everyone if s["path"]]}
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.report, json.dumps(report, indent=1))
        _say(launch, f"{len(report['concepts'])} concept(s) in {report['wall_seconds']:.1f} s; report: {cfg.report}")
    # no rank tears its process group down while another still talks to it: gloo aborts the leaver
    # ("terminate called without an active exception", SIGABRT) and torchrun reports a failed job
    launch.barrier()
    return 0


def console() -> None:
    """The ``inversion-train`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
