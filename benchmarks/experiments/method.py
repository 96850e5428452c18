"""PartCLIPSeg vs the CLIPSeg baseline, and the L_sep / L_enh ablations, on SynthParts.

Every variant trains with the same config (the demo's, `synthparts_tiny`, unless --config),
budget and seeds, then its final weights (last.pt: no checkpoint selection on the data we report)
are evaluated on the whole SynthParts val split under Oracle-Obj and Pred-All:
seen mIoU, unseen mIoU, h-IoU.

    python -m benchmarks.experiments.method --out benchmarks/results/method --seeds 0 1

writes OUT/method.json (everything, per run and mean/std per variant) and OUT/method.md
(the table), atomically, and keeps each run's folder under OUT/runs/ (not meant for git).

Variants: partclipseg (the method), clipseg (baseline: stage 1 only, conditioned on the
object-specific names, BCE on K+1 channels), partclipseg_no_sep (L_sep weight 0),
partclipseg_no_enh (L_enh weight 0). Runs go to --jobs worker processes (spawned).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from typing import Any

from runtime.errors import run_command
from runtime.io import atomic_write_text

# Each variant is a list of config overrides (`partclipseg train --set`).
VARIANTS: dict[str, list[str]] = {
    "partclipseg": [],
    # The baseline has no object head to make colour-blind; it keeps the recipe's towers.
    "clipseg": ["model_overrides.mode=clipseg", "model_overrides.colour_blind=false"],
    "partclipseg_no_sep": ["loss.sep=0.0"],
    "partclipseg_no_enh": ["loss.enh=0.0"],
}
SETTINGS = ("oracle-obj", "pred-all")
METRICS = ("miou_seen", "miou_unseen", "h_iou")


def _config(args: argparse.Namespace, variant: str, seed: int) -> Any:
    from partclipseg.training.config import apply_overrides, load_train_config

    common = [f"seed={seed}", f"num_workers={args.num_workers}",
              f"data.root={json.dumps(str(args.data))}"]
    if args.steps:
        common.append(f"steps={args.steps}")
    if args.device != "cpu":
        common.append("amp=false")  # same numerics as the CPU demo
    return apply_overrides(load_train_config(args.config),
                           common + (args.set or []) + VARIANTS[variant])


def run_one(job: tuple[argparse.Namespace, str, int]) -> dict[str, Any]:
    """Train one (variant, seed) and evaluate its last.pt in both settings."""
    args, variant, seed = job
    import torch

    from partclipseg.checkpoint import load_model
    from partclipseg.evaluation.evaluate import eval_dataset, evaluate
    from partclipseg.training.trainer import train

    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cfg = _config(args, variant, seed)
    out = Path(args.out) / "runs" / f"{variant}_seed{seed}"
    t0 = time.perf_counter()
    train(cfg, out, device=args.device, progress=False, overwrite=True)
    train_s = time.perf_counter() - t0
    model, vocab, _ = load_model(out / "last.pt", map_location=args.device)
    result: dict[str, Any] = {"variant": variant, "seed": seed, "train_s": round(train_s, 1),
                              "steps": cfg.steps}
    for setting in SETTINGS:
        m = evaluate(model, eval_dataset(cfg.data.kind, cfg.data.root, cfg.data.val_split,
                                         setting), setting, progress=False)
        result[setting] = {k: float(m[k]) for k in METRICS + ("biou_h",) if k in m}
    print(f"{variant} seed {seed}: " + "; ".join(
        f"{s} " + "/".join(f"{result[s][k]:.1f}" for k in METRICS) for s in SETTINGS),
        flush=True)
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        out[variant] = {}
        for s in SETTINGS:
            out[variant][s] = {}
            for k in METRICS:
                vals = [r[s][k] for r in rs if math.isfinite(r[s][k])]
                out[variant][s][k] = {
                    "mean": statistics.fmean(vals) if vals else float("nan"),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "values": [r[s][k] for r in rs]}
    return out


def table(summary: dict[str, Any], seeds: list[int]) -> str:
    pm = (lambda d: f"{d['mean']:.1f} ± {d['std']:.1f}") if len(seeds) > 1 else \
        (lambda d: f"{d['mean']:.1f}")
    lines = ["| variant | Oracle-Obj seen | unseen | h-IoU | Pred-All seen | unseen | h-IoU |",
             "|---|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        cells = [pm(s[setting][k]) for setting in SETTINGS for k in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/method")
    p.add_argument("--config", default="synthparts_tiny")
    p.add_argument("--data", help="SynthParts folder (default OUT/synthparts; generated if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, help="override the config's steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="torch threads per run")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, repeatable (as partclipseg train --set)")
    p.add_argument("--name", default="method", help="file stem of the JSON / markdown")
    args = p.parse_args(argv)
    out = Path(args.out)
    args.data = Path(args.data) if args.data else out / "synthparts"

    from partclipseg.training.config import load_train_config

    cfg = load_train_config(args.config)
    if not (args.data / "classes.json").is_file():
        from partclipseg.data.synthparts import generate
        generate(args.data, seed=cfg.data.synth_seed, n_train=cfg.data.synth_train,
                 n_val=cfg.data.synth_val, progress=False)
    jobs = [(args, v, s) for s in args.seeds for v in args.variants]
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []

    def write() -> dict[str, Any]:
        """The record so far: written after every run, so a run cut short keeps its results."""
        import torch

        summary = summarize(runs)
        record = {
            "experiment": "PartCLIPSeg vs CLIPSeg baseline and L_sep/L_enh ablations on "
                          "SynthParts val",
            "date": _dt.date.today().isoformat(),
            "machine": {"device": args.device, "cpu_count": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None,
                        "python": platform.python_version(), "torch": torch.__version__},
            "command": "python -m benchmarks.experiments.method " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "config": _config(args, "partclipseg", args.seeds[0]).to_dict(),
            "checkpoint": "last.pt (final weights, no selection on val)",
            "seeds": args.seeds, "wall_s": round(time.perf_counter() - t0, 1),
            "complete": len(runs) == len(jobs), "summary": summary, "runs": runs,
        }
        atomic_write_text(out / f"{args.name}.json", json.dumps(record, indent=2) + "\n")
        return summary

    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, jobs, chunksize=1):
                runs.append(r)
                write()
    else:
        for j in jobs:
            runs.append(run_one(j))
            write()
    runs.sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
    summary = write()
    md = table(summary, args.seeds)
    atomic_write_text(out / f"{args.name}.md", md + "\n")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.experiments.method", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
