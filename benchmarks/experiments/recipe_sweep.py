"""Demo-recipe sweep: variants of `synthparts_tiny` at the demo budget, ranked by Oracle-Obj.

The CPU demo must learn within about 5 minutes of training on 2 cores; this sweep finds which
recipe changes buy the most mIoU per step on a fast machine, so the CPU only has to confirm the
winner. Each variant is a list of config overrides (`KEY=VALUE`, YAML values, one dot for
sub-keys, as `partclipseg train --set`); each run's last.pt is evaluated under
Oracle-Obj on the whole val split. Results are appended to OUT/sweep.jsonl as runs finish, so a
sweep cut short by a deadline keeps what it measured.

    python -m benchmarks.experiments.recipe_sweep --out /tmp/sweep --device cuda --jobs 6 --deadline 420
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from runtime.errors import run_command

TINY_VISION = {"image_size": 224, "layers": 6, "width": 128, "head_width": 32, "patch_size": 16}
P8 = json.dumps({**TINY_VISION, "patch_size": 8})

VARIANTS: dict[str, list[str]] = {
    # Longest first, so a deadline cuts the short ones.
    "noattn_steps3200": ["loss.sep=0", "loss.enh=0", "steps=3200"],
    "noattn_patch8_steps3200": ["loss.sep=0", "loss.enh=0", f"model_overrides.vision_cfg={P8}",
                                "steps=3200"],
    "noattn_train_vision_steps3200": ["loss.sep=0", "loss.enh=0",
                                      "model_overrides.train_vision=true", "steps=3200"],
    "noattn_patch8_steps1600": ["loss.sep=0", "loss.enh=0", f"model_overrides.vision_cfg={P8}",
                                "steps=1600"],
    "train_vision_steps3200": ["model_overrides.train_vision=true", "steps=3200"],
    "patch8_steps3200": [f"model_overrides.vision_cfg={P8}", "steps=3200"],
    "steps3200": ["steps=3200"],
    "patch8_rd64": [f"model_overrides.vision_cfg={P8}", "model_overrides.reduce_dim=64"],
    "patch8": [f"model_overrides.vision_cfg={P8}"],
    "batch16": ["batch_size=16"],
    "base": [],
    "rd64": ["model_overrides.reduce_dim=64"],
    "no_attn_losses": ["loss.sep=0", "loss.enh=0"],
    "size224": ["model_overrides.image_size=224"],
    "lr1e-3": ["lr=1.0e-3"],
    "bg0.2": ["loss.background_weight=0.2"],
    "no_clip": ["grad_clip=0"],
    "train_vision": ["model_overrides.train_vision=true"],
}


def _config(base: str, data: Path, overrides: list[str], device: str,
            steps: int | None = None) -> Any:
    from partclipseg.training.config import apply_overrides, load_train_config

    common = [f"data.root={json.dumps(str(data))}", "data.val_limit=null", "num_workers=0"]
    if device != "cpu":
        common.append("amp=false")
    cfg = apply_overrides(load_train_config(base),
                          common + overrides + ([f"steps={steps}"] if steps else []))
    return cfg.replace(eval_every=max(1, cfg.steps // 4))


def run_one(job: tuple[str, str, Path, Path, str, int, int | None]) -> dict[str, Any]:
    name, base, data, out, device, threads, steps = job
    import torch

    from partclipseg.checkpoint import load_model
    from partclipseg.evaluation.evaluate import eval_dataset, evaluate
    from partclipseg.training.trainer import train

    torch.set_num_threads(threads)
    if device != "cpu":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cfg = _config(base, data, VARIANTS[name], device, steps)
    t0 = time.perf_counter()
    res = train(cfg, out / name, device=device, progress=False, overwrite=True)
    train_s = time.perf_counter() - t0
    model, _, _ = load_model(out / name / "last.pt", map_location=device)
    m = evaluate(model, eval_dataset(cfg.data.kind, cfg.data.root, cfg.data.val_split,
                                     "oracle-obj"), "oracle-obj", progress=False)
    rec = {"variant": name, "overrides": VARIANTS[name], "steps": cfg.steps,
           "batch_size": cfg.batch_size, "train_s": round(train_s, 1),
           "ms_per_step": round(1000 * train_s / cfg.steps, 1),
           "oracle_obj": {k: round(float(m[k]), 2) for k in ("miou_seen", "miou_unseen", "h_iou")},
           "history": res["history"]}
    with open(out / "sweep.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{name}: seen {m['miou_seen']:.1f} unseen {m['miou_unseen']:.1f} "
          f"h {m['h_iou']:.1f} ({rec['ms_per_step']} ms/step)", flush=True)
    return rec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="synthparts_tiny")
    p.add_argument("--data", type=Path, help="SynthParts folder (default OUT/synthparts)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--steps", type=int, help="override every variant's steps (smoke tests)")
    p.add_argument("--deadline", type=float, default=0, help="stop waiting after S seconds")
    return p


def _main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()  # the deadline counts dataset generation too
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "synthparts"
    from partclipseg.training.config import load_train_config

    cfg = load_train_config(args.config)
    if not (data / "classes.json").is_file():
        from partclipseg.data.synthparts import generate
        generate(data, seed=cfg.data.synth_seed, n_train=cfg.data.synth_train,
                 n_val=cfg.data.synth_val, progress=False)
    jobs = [(v, args.config, data, args.out, args.device, args.threads, args.steps) for v in args.variants]
    import multiprocessing as mp
    pool = mp.get_context("spawn").Pool(args.jobs)
    pending = [pool.apply_async(run_one, (j,)) for j in jobs]
    while any(not r.ready() for r in pending):
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            print(f"deadline: {sum(not r.ready() for r in pending)} runs unfinished", flush=True)
            pool.terminate()
            break
        time.sleep(1)
    for r in pending:
        if r.ready() and not r.successful():
            try:
                r.get()
            except Exception as e:  # report, keep the others
                print(f"run failed: {e!r}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.experiments.recipe_sweep", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
