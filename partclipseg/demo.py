"""`partclipseg demo`: SynthParts -> train the tiny model -> evaluate -> pictures -> table."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo", "write_overlays"]


def write_overlays(model: Any, dataset: Any, out: Path, n: int = 6) -> list[Path]:
    """Pred-All pictures (image | ground truth | prediction | legend) for the first n samples."""
    import torch

    from runtime.overlay import panel
    from runtime.postprocess import pred_all
    from runtime.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    vocab = dataset.vocabulary
    cond = model.encode_vocabulary(vocab)
    paths = []
    with torch.no_grad():
        for i in range(min(n, len(dataset))):
            s = dataset[i]
            x = torch.from_numpy(preprocess(s["image"], model.cfg.image_size))[None]
            o = model.forward_image(x, cond)
            obj = None if o.object_logits is None else o.object_logits[0].numpy()
            pred = pred_all(o.logits[0].numpy(), vocab.class_objects, s["part"].shape, obj)
            gt = np.where(s["part"] == 255, -1, s["part"])
            unseen = sorted({vocab.objects[c] for c in np.unique(s["object"])
                             if c != 255 and vocab.objects[c] in vocab.unseen_objects})
            title = f"{s['name']}  (Pred-All)" + (f"  unseen: {', '.join(unseen)}" if unseen else "")
            path = out / f"{s['name']}.png"
            panel(s["image"], vocab.class_names, pred, gt, title=title).save(path)
            paths.append(path)
    return paths


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name:<28} | {m['miou_seen']:6.1f} | {m['miou_unseen']:6.1f} | {m['h_iou']:6.1f} "
            f"| {m['biou_h']:6.1f} |")


def run_demo(out: Path, config: str = "synthparts_tiny", steps: int | None = None) -> dict:
    import torch

    from .checkpoint import load_model
    from .data.synthparts import generate
    from .evaluation.evaluate import SETTINGS, eval_dataset, evaluate
    from .training.config import load_train_config
    from .training.trainer import train

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_train_config(config)
    data_root = out / "synthparts"
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, root=str(data_root)))
    if steps:
        cfg = cfg.replace(steps=steps, eval_every=min(cfg.eval_every, steps))
    timings: dict[str, float] = {}

    print(f"[1/4] SynthParts -> {data_root}")
    t = time.perf_counter()
    if not (data_root / "classes.json").is_file():
        generate(data_root, seed=cfg.data.synth_seed, n_train=cfg.data.synth_train,
                 n_val=cfg.data.synth_val)
    timings["synth"] = time.perf_counter() - t

    print(f"[2/4] training {cfg.model} for {cfg.steps} steps -> {out / 'run'}")
    t = time.perf_counter()
    train(cfg, out / "run", overwrite=True)
    timings["train"] = time.perf_counter() - t

    print("[3/4] evaluating best.pt (seen / unseen / h-IoU)")
    t = time.perf_counter()
    model, vocab, _ = load_model(out / "run" / "best.pt")
    results = {}
    for setting in SETTINGS:
        ds = eval_dataset("synthparts", str(data_root), "val", setting)
        results[setting] = evaluate(model, ds, setting)
        (out / f"metrics_{setting}.json").write_text(json.dumps(results[setting], indent=2))
    timings["eval"] = time.perf_counter() - t

    print("[4/4] overlay pictures")
    pictures = write_overlays(model, eval_dataset("synthparts", str(data_root), "val", "pred-all"),
                              out / "overlays")
    timings["total"] = time.perf_counter() - t_start

    lines = ["", f"SynthParts val, {cfg.model} model, {cfg.steps} steps "
             f"({len(vocab.class_names)} classes, unseen objects: {', '.join(sorted(vocab.unseen_objects))})",
             "| setting                      | seen   | unseen | h-IoU  | h-BIoU |",
             "|------------------------------|--------|--------|--------|--------|"]
    lines += [_row(f"PyTorch FP32, {s}", results[s]) for s in SETTINGS]
    lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
              f"pictures: {pictures[0].parent}/ ({len(pictures)} files)",
              f"checkpoint: {out / 'run' / 'best.pt'}"]
    print("\n".join(lines))
    summary = {"results": {s: {k: v for k, v in r.items() if k != "per_class"}
                           for s, r in results.items()}, "timings_s": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
