"""`partclipseg demo`: the whole pipeline on SynthParts, minutes on a CPU.

SynthParts -> train the tiny model -> evaluate (PyTorch) -> export an ONNX bundle (with its
fast slot graphs and INT8 graphs calibrated on the training images) -> run it through the
runtime (ONNX Runtime FP32 / FP16 / INT8 and the fast graphs vs PyTorch: mIoU parity, pixel
agreement, latency; the fast graphs' labels must equal the exact path's) -> overlay pictures
from the deployed model -> one results table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.io import IGNORE_LABEL

__all__ = ["run_demo", "write_overlays"]

# The demo's fast slot graphs: batch 1, slots that fit SynthParts (13 parts, 16 objects,
# 88 classes) with room for new names.
FAST_BATCHES, FAST_SLOTS = (1,), {"max_parts": 16, "max_objects": 24, "max_classes": 128}
MIN_FAST_AGREEMENT = 0.999  # their labels vs the exact ONNX Runtime FP32 path, val images


def write_overlays(seg: Any, dataset: Any, out: Path, n: int = 6) -> list[Path]:
    """Pred-All pictures (image | ground truth | prediction | legend) of a deployed
    `runtime.Segmenter` for the first n samples."""
    from runtime.overlay import panel

    out.mkdir(parents=True, exist_ok=True)
    vocab = dataset.vocabulary
    paths = []
    for i in range(min(n, len(dataset))):
        s = dataset[i]
        pred = seg.predict(s["image"])
        gt = np.where(s["part"] == IGNORE_LABEL, -1, s["part"])
        unseen = sorted({vocab.objects[c] for c in np.unique(s["object"])
                         if c != IGNORE_LABEL and vocab.objects[c] in vocab.unseen_objects})
        title = (f"{s['name']}  (Pred-All, {seg.backend_name})"
                 + (f"  unseen: {', '.join(unseen)}" if unseen else ""))
        path = out / f"{s['name']}.png"
        panel(s["image"], vocab.class_names, pred.labels, gt, title=title).save(path)
        paths.append(path)
    return paths


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name:<28} | {m['miou_seen']:6.1f} | {m['miou_unseen']:6.1f} | {m['h_iou']:6.1f} "
            f"| {m['biou_h']:6.1f} |")


def run_demo(out: Path, config: str = "synthparts_tiny", steps: int | None = None,
             deploy_samples: int = 60) -> dict:
    """Run every stage into `out`; returns the summary written to out/summary.json. The export
    checks every graph on the bundle's check images (INT8: >= 99% of labels equal to PyTorch
    FP32's, else the demo stops); `partclipseg check --bundle out/bundle` repeats that check
    on any machine."""
    import torch

    from export.onnx import export_onnx
    from export.report import deployment_report, format_report
    from runtime import Segmenter

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

    def stage(name: str, t: float) -> None:
        timings[name] = time.perf_counter() - t

    print(f"[1/6] SynthParts -> {data_root}")
    t = time.perf_counter()
    if not (data_root / "classes.json").is_file():
        generate(data_root, seed=cfg.data.synth_seed, n_train=cfg.data.synth_train,
                 n_val=cfg.data.synth_val)
    stage("synth", t)

    print(f"[2/6] training {cfg.model} for {cfg.steps} steps -> {out / 'run'}")
    t = time.perf_counter()
    train(cfg, out / "run", overwrite=True)
    stage("train", t)
    ckpt = out / "run" / "best.pt"

    print(f"[3/6] evaluating {ckpt} in PyTorch (seen / unseen / h-IoU)")
    t = time.perf_counter()
    model, vocab, _ = load_model(ckpt)
    results = {}
    for setting in SETTINGS:
        ds = eval_dataset("synthparts", str(data_root), "val", setting)
        results[setting] = evaluate(model, ds, setting)
        (out / f"metrics_{setting}.json").write_text(json.dumps(results[setting], indent=2))
    del model
    stage("eval", t)

    print(f"[4/6] exporting {out / 'bundle'} (ONNX FP32 + FP16 + INT8, fast slot graphs, text "
          "side precomputed)")
    t = time.perf_counter()
    export_onnx(ckpt, out / "bundle", fast=FAST_BATCHES, slots=FAST_SLOTS, int8=True)
    stage("export", t)

    print(f"[5/6] runtime: every backend vs PyTorch on {deploy_samples} val images (Pred-All)")
    t = time.perf_counter()
    rows = deployment_report(out / "bundle", data_root, setting="pred-all",
                             limit=deploy_samples, latency_runs=10)
    (out / "deployment.json").write_text(json.dumps(rows, indent=2))
    stage("runtime", t)
    fast = [r for r in rows if "vs_exact" in r]
    if not fast or fast[0]["vs_exact"] < MIN_FAST_AGREEMENT:
        raise RuntimeError(f"the fast slot graphs' labels differ from the exact path's: {fast}")

    print("[6/6] overlay pictures from the deployed model (ONNX Runtime)")
    seg = Segmenter.load(out / "bundle", backend="onnxruntime", device="cpu")
    pictures = write_overlays(seg, eval_dataset("synthparts", str(data_root), "val", "pred-all"),
                              out / "overlays")
    timings["total"] = time.perf_counter() - t_start

    lines = ["", f"SynthParts val, {cfg.model} model, {cfg.steps} steps "
             f"({len(vocab.class_names)} classes, unseen objects: "
             f"{', '.join(sorted(vocab.unseen_objects))})",
             "| setting                      | seen   | unseen | h-IoU  | h-BIoU |",
             "|------------------------------|--------|--------|--------|--------|"]
    lines += [_row(f"PyTorch FP32, {s}", results[s]) for s in SETTINGS]
    lines += ["", "Deployed (runtime.Segmenter, uint8 image in, label map out; CPU):",
              format_report(rows, "pred-all")]
    check = seg.manifest.check
    lines += ["", f"Check set ({check.images} held-out images, labels vs PyTorch FP32 on this "
              "machine; `partclipseg check --bundle " + str(out / "bundle") + "` on another): "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in check.exported.items())]
    lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
              f"pictures: {pictures[0].parent}/ ({len(pictures)} files)",
              f"checkpoint: {ckpt}", f"bundle: {out / 'bundle'}"]
    print("\n".join(lines))
    summary = {"results": {s: {k: v for k, v in r.items() if k != "per_class"}
                           for s, r in results.items()},
               "deployment": rows, "timings_s": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
