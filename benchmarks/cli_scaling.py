"""Concepts per hour of the command line: one process against torchrun with N ranks, measured in one run.

The same config of K concepts (the miniature world by default, or ``--model`` with ``--images``) is
trained by ``python -m inversion.train`` in one process and by ``torchrun --standalone --nproc_per_node N``
(the concepts shared out, concept i on rank i mod N), the two alternated ``--reps`` times; it prints each
repetition's wall clock (model loading included, as a user waits for it), concepts per hour and the
ratio, and their median. On a CPU the single process uses every core and each rank 1/N of them; on a
machine with N GPUs each rank has its own.

    python benchmarks/cli_scaling.py --concepts 4 --steps 100 --nproc 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "example_configs" / "world" / "crescent"


def write_config(folder: Path, concepts: int, steps: int, batch: int, model: str, images: Path) -> Path:
    body = {"model": model, "out": "out/embeddings", "if_exists": "overwrite",
            "defaults": {"steps": steps, "batch_size": batch, "method": "adaptive"},
            "concepts": [{"name": f"bench-{i}", "images": str(images), "init_word": "thing", "seed": i}
                         for i in range(concepts)]}
    path = folder / "bench.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="miniature-world")
    ap.add_argument("--images", default=str(IMAGES), help="one folder of images, used for every concept")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cli-scaling-"))
    cfg = write_config(work, args.concepts, args.steps, args.batch, args.model, Path(args.images))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    cores = os.cpu_count() or 1
    one = [sys.executable, "-m", "inversion.train", str(cfg), "--quiet"]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "--module", "inversion.train", str(cfg), "--quiet"]
    rows = []
    try:
        for r in range(args.reps):
            t1 = timed(one, work, dict(env, OMP_NUM_THREADS=str(cores)))
            tn = timed(many, work, dict(env, OMP_NUM_THREADS=str(max(1, cores // args.nproc))))
            rows.append((t1, tn))
            print(f"rep {r}: 1 process {t1:.1f} s ({3600 * args.concepts / t1:.0f} concepts/h), {args.nproc} ranks "
                  f"{tn:.1f} s ({3600 * args.concepts / tn:.0f} concepts/h): {t1 / tn:.2f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in rows]
    out = {"concepts": args.concepts, "steps": args.steps, "batch": args.batch, "nproc": args.nproc, "cores": cores,
           "seconds_one": [a for a, _ in rows], "seconds_ranks": [b for _, b in rows],
           "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    print(f"median speed-up of {args.nproc} ranks over one process: {out['ratio_median']:.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}, {args.reps} repetitions, {cores} CPU cores)")
    return out


if __name__ == "__main__":
    main()
