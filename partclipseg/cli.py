"""`partclipseg` command line: synth, pretrain, train, eval, demo, predict, check, serve,
import-weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from runtime.errors import run_command
from runtime.options import nonneg_int, positive_int

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="partclipseg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="generate the SynthParts dataset (OV-PARTS Pascal layout)")
    s.add_argument("--out", required=True, help="dataset folder to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=nonneg_int, default=800, help="training images (default 800)")
    s.add_argument("--val", type=nonneg_int, default=200, help="validation images (default 200)")
    s.add_argument("--image-size", type=positive_int, default=160)

    r = sub.add_parser("pretrain", help="image-text pretraining of a random-init model's "
                       "towers on SynthParts' seen objects (no unseen image or name)")
    r.add_argument("--out", required=True, help="towers file to write (float16, ~17 MB for tiny)")
    r.add_argument("--model", default="tiny", help="model config: a name or a JSON path (tiny)")
    r.add_argument("--steps", type=positive_int, help="optimizer steps (default 1500)")
    r.add_argument("--images", type=positive_int, help="seen-only images rendered (default 4000)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sets", nargs="+", choices=["objects", "parts", "colours", "plans"],
                   help="name sets contrasted (default: all four)")
    r.add_argument("--grey", type=float, help="share of images shown in grey, training only "
                   "the colour-free sets (default 0)")

    t = sub.add_parser("train", help="train PartCLIPSeg (or the CLIPSeg baseline)")
    t.add_argument("--config", required=True,
                   help="training YAML: a path or a shipped name (synthparts_tiny, ...)")
    t.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.csv")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished or interrupted run in --out (default: refuse)")
    t.add_argument("--data", help="dataset folder (default: the config's data.root)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; YAML values, dotted sections): "
                   "--set steps=400 --set loss.sep=0 --set model_overrides.mode=clipseg")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")

    e = sub.add_parser("eval", help="evaluate a checkpoint (seen / unseen / h-IoU)")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", help="dataset folder (default: the checkpoint's training data)")
    e.add_argument("--kind", help="dataset kind (default: the checkpoint's)")
    e.add_argument("--split", default="val")
    e.add_argument("--setting", choices=["oracle-obj", "pred-all"], default="oracle-obj")
    e.add_argument("--json", help="write the metrics (with the per-class table) here")
    e.add_argument("--limit", type=positive_int, help="evaluate the first N samples only")
    e.add_argument("--device", default=None)

    d = sub.add_parser("demo", help="the whole pipeline on SynthParts in minutes on a CPU")
    d.add_argument("--out", default="demo", help="output folder (default ./demo)")
    d.add_argument("--steps", type=positive_int, help="training steps (default: the config's)")
    d.add_argument("--config", default="synthparts_tiny")

    from runtime.predict import add_arguments as add_predict_arguments

    add_predict_arguments(sub.add_parser(
        "predict", help="segment images with an exported bundle (numpy + a backend; no torch)"))

    from runtime.check import add_arguments as add_check_arguments

    add_check_arguments(sub.add_parser(
        "check", help="run a bundle's check images on this machine and compare its labels with "
        "the exporter's (exit 1 below a precision's threshold; no torch)"))

    from runtime.serve import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser(
        "serve", help="serve a bundle behind Triton Inference Server (HTTP, gRPC, dynamic "
        "batching, metrics; the [serve] extra, no torch)"))

    w = sub.add_parser("import-weights", help="start from real weights: HF CLIPSeg or the "
                       "authors' released PartCLIPSeg checkpoint -> a partclipseg checkpoint")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--clipseg", metavar="DIR_OR_FILE", help="Hugging Face CLIPSeg folder "
                     "(config.json + weights) or .safetensors / pytorch_model.bin")
    src.add_argument("--partclipseg", metavar="FILE", help="released PartCLIPSeg .pth "
                     "(detectron2 record, model under 'model')")
    w.add_argument("--out", required=True, help="checkpoint to write (e.g. init.pt)")
    w.add_argument("--vocab", default="pascal_part_116",
                   help="vocabulary stored in the checkpoint: a dataset name (pascal_part_116, "
                   "ade20k_part_234, partimagenet) or a JSON file (default pascal_part_116)")
    w.add_argument("--image-size", type=positive_int, default=352, help="model input side (352)")
    w.add_argument("--mode", choices=["partclipseg", "clipseg"], default="partclipseg",
                   help="model to build from CLIPSeg weights (released PartCLIPSeg: always "
                   "partclipseg)")
    w.add_argument("--no-adapters", action="store_true",
                   help="CLIPSeg: build without visual adapters (plain CLIPSeg numerics)")
    w.add_argument("--partial", action="store_true", help="write the checkpoint even when some "
                   "source keys are not understood by the converter (they are ignored, listed)")
    return p


# -- commands ----------------------------------------------------------------------------------
def cmd_synth(a: argparse.Namespace) -> int:
    from .data.synthparts import generate

    path = generate(a.out, seed=a.seed, n_train=a.train, n_val=a.val, image_size=a.image_size)
    print(f"SynthParts written to {path}")
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import load_model_config
    from .training.pretrain import PretrainConfig, pretrain

    changes = {k: v for k, v in (("steps", a.steps), ("images", a.images), ("grey", a.grey),
                                 ("sets", a.sets and tuple(a.sets))) if v is not None}
    cfg = replace(PretrainConfig(seed=a.seed), **changes)
    summary = pretrain(load_model_config(a.model), cfg, a.out)
    print(f"towers written to {a.out} in {summary['seconds']:.0f} s; held-out token accuracy "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                      summary["held_out_named_token_accuracy"].items()))
    return 0


def _train_config(a: argparse.Namespace) -> Any:
    from .training.config import apply_overrides, load_train_config

    data = [f"data.root={json.dumps(a.data)}"] if a.data else []
    return apply_overrides(load_train_config(a.config), data + a.set)


def cmd_train(a: argparse.Namespace) -> int:
    from .training.trainer import train

    if a.resume and a.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    result = train(_train_config(a), a.out, resume=a.resume, device=a.device,
                   overwrite=a.overwrite)
    if result:
        print(f"best {result['best_score']:.2f} h-IoU; checkpoints in {result['out']}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from runtime.io import atomic_write_text

    from .checkpoint import load_model
    from .evaluation.evaluate import eval_dataset, evaluate
    from .evaluation.metrics import format_table

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab, record = load_model(a.ckpt, map_location=device)
    data_cfg = record.get("train_config", {}).get("data", {})
    root, kind = a.data or data_cfg.get("root"), a.kind or data_cfg.get("kind", "synthparts")
    if not root:
        raise ValueError("--data is required: the checkpoint does not name its dataset")
    dataset = eval_dataset(kind, root, a.split, a.setting)
    result = evaluate(model, dataset, a.setting, limit=a.limit)
    print(format_table(result))
    if a.json:
        text = json.dumps(result, indent=2, default=float)
        atomic_write_text(a.json, text)
        print(f"metrics written to {a.json}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out), config=a.config, steps=a.steps)
    return 0


def cmd_import_weights(a: argparse.Namespace) -> int:
    from .convert import import_weights

    kind = "clipseg" if a.clipseg else "partclipseg"
    result = import_weights(a.clipseg or a.partclipseg, a.out, expect=kind, vocab=a.vocab,
                            image_size=a.image_size, mode=a.mode, adapters=not a.no_adapters,
                            allow_partial=a.partial)
    conv = result.conversion
    print(f"{conv.source_format} weights ({len(conv.state_dict)} tensors"
          + (f", mixing layer: {conv.mixing} version" if conv.mixing else "") + ")")
    reasons: dict[str, int] = {}
    for line in conv.unused:
        reason = line.split(": ", 1)[1]
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in reasons.items():
        print(f"  unused   {n:4d} keys: {reason}")
    for line in conv.unmapped:
        print(f"  UNMAPPED {line} (ignored, --partial)")
    for line in conv.approximate:
        print(f"  approx.  {line}")
    for line in conv.not_in_source:
        print(f"  init     {line}")
    for line in result.notes:
        print(f"  NOTE     {line}")
    print(f"checkpoint (kind: init) written to {result.path}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from runtime.predict import run

    return run(a)


def cmd_check(a: argparse.Namespace) -> int:
    from runtime.check import run

    return run(a)


def cmd_serve(a: argparse.Namespace) -> int:
    from runtime.serve import run

    return run(a)


COMMANDS = {"synth": cmd_synth, "pretrain": cmd_pretrain, "train": cmd_train, "eval": cmd_eval,
            "demo": cmd_demo, "predict": cmd_predict, "check": cmd_check, "serve": cmd_serve,
            "import-weights": cmd_import_weights}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"partclipseg {args.command}", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
