"""Benchmark models: random-init checkpoints exported to bundles, in one call.

    python -m benchmarks.reference --out bundles/reference      # the reference speed model (docs/design.md)
    python -m benchmarks.reference --out bundles/reference --int8   # + its INT8 graphs (CPU)

The reference speed model is ViT-B/16 at 352 px (`build_model("vit_b16")`, random weights) with
the Pascal-Part-116 vocabulary (116 object-specific classes over 42 generalized parts and 16
objects, `partclipseg.data.vocabularies.PASCAL_PART_116`). Random weights are fine for latency:
no kernel's speed depends on the values. The pytest suite uses the same code path with the
`tiny` model and the SynthParts vocabulary.

The checkpoint is written next to the bundle (`bundles/reference.pt` for `--out
bundles/reference`): the bundle folder is replaced atomically by every export, and the torch
reference backend finds the checkpoint through the path the manifest records.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from runtime.bundle import Manifest
from runtime.errors import run_command
from runtime.vocabulary import Vocabulary

__all__ = ["BuiltBundle", "reference_vocabulary", "synthparts_vocabulary",
           "write_random_checkpoint", "calibration_folder", "build_bundle", "checkpoint_path_for",
           "main"]


@dataclass(frozen=True)
class BuiltBundle:
    """A bundle folder, the checkpoint it was exported from and what the export took."""

    bundle: Path
    checkpoint: Path
    manifest: Manifest
    seconds: dict[str, float]  # {"checkpoint": s, "export": s}


def reference_vocabulary() -> Vocabulary:
    """Pascal-Part-116: 116 classes, 42 generalized parts, 16 objects (5 unseen)."""
    from partclipseg.data.vocabularies import PASCAL_PART_116

    return PASCAL_PART_116


def synthparts_vocabulary() -> Vocabulary:
    """The SynthParts vocabulary (88 classes, 13 parts, 16 objects, 4 unseen): parity runs need
    the data set's own vocabulary."""
    from partclipseg.data.synthparts import SYNTHPARTS_VOCABULARY

    return SYNTHPARTS_VOCABULARY


def checkpoint_path_for(bundle: str | Path) -> Path:
    """Where `build_bundle` keeps the checkpoint of `bundle`: a sibling file `<bundle>.pt`."""
    bundle = Path(bundle)
    return bundle.parent / f"{bundle.name}.pt"


def write_random_checkpoint(path: str | Path, config: str = "vit_b16",
                            vocab: Vocabulary | None = None, seed: int = 0) -> Path:
    """Random-init `build_model(config)` saved with `vocab` (default Pascal-Part-116)."""
    import torch

    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    return save_checkpoint(path, model, vocab or reference_vocabulary(),
                           train_config={"note": f"random init, seed {seed}, for benchmarks"})


def calibration_folder(out: str | Path, image_size: int, count: int = 64) -> Path:
    """`count` SynthParts images (seed 0) in `out`: calibration images for the INT8 graphs of a
    model without training data of its own (random init, or data not on this machine)."""
    from partclipseg.data.synthparts import generate

    root = generate(Path(out), seed=0, n_train=count, n_val=0, image_size=image_size,
                    progress=False)
    return Path(root) / "images" / "train"


def _calibration(checkpoint: Path, out: Path) -> Path | None:
    """None when the checkpoint's training images are here (export uses them), else a
    generated SynthParts folder at the model's input size."""
    from export.int8 import calibration_images
    from partclipseg.checkpoint import load_checkpoint

    record = load_checkpoint(checkpoint)
    try:
        calibration_images(None, record.get("train_config") or {})
        return None
    except ValueError:
        size = int(record["model_config"]["image_size"])
        return calibration_folder(out.parent / f"{out.name}_calibration", size)


def build_bundle(out: str | Path, config: str = "vit_b16", vocab: Vocabulary | None = None,
                 seed: int = 0, fp16: bool = True, check_batch: int = 1,
                 checkpoint: str | Path | None = None, fast: Sequence[int] | None = None,
                 slots: dict[str, int] | None = None, int8: bool = False,
                 int8_method: str | None = None, int8_min_agreement: float | None = None
                 ) -> BuiltBundle:
    """Export a bundle (FP32 + FP16 ONNX) of a random-init model to folder `out`.

    checkpoint: export this existing checkpoint instead of writing a random one (a trained
        model for parity runs); default: a fresh random-init `config` model saved at
        `checkpoint_path_for(out)`.
    check_batch: images of export's own ONNX Runtime (CPU) vs PyTorch parity check; keep it
        small for ViT-B/16 (each image runs the full model on the CPU twice per precision).
    fast, slots: also fast slot graphs for these batch sizes (`export.onnx --fast`).
    int8: also INT8 graphs, calibrated on the checkpoint's training images when they are
        here, else on generated SynthParts images (`calibration_folder`); int8_method and
        int8_min_agreement as `export.onnx.export_onnx`'s, except that a random-init model's
        INT8 agreement is recorded, not enforced (int8_min_agreement 0 unless given): its
        Pred-All labels are near-ties that INT8 rounding flips by the percent on every CPU
        (ViT-B/16: 95-96% with 7- or 8-bit weights), and the model is for latency only.
    """
    from export.onnx import export_onnx

    out = Path(out)
    t0 = time.perf_counter()
    if checkpoint is None:
        checkpoint = write_random_checkpoint(checkpoint_path_for(out), config, vocab, seed)
        if int8 and int8_min_agreement is None:
            int8_min_agreement = 0.0
    t1 = time.perf_counter()
    calibration = _calibration(Path(checkpoint), out) if int8 else None
    manifest = export_onnx(checkpoint, out, fp16=fp16, labels=True, check_batch=check_batch,
                           fast=fast, slots=slots, int8=int8, calibration=calibration,
                           int8_method=int8_method, int8_min_agreement=int8_min_agreement)
    t2 = time.perf_counter()
    return BuiltBundle(out, Path(checkpoint), manifest, {"checkpoint": t1 - t0, "export": t2 - t1})


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference",
                                description="write the reference speed model (docs/design.md): "
                                            "random-init ViT-B/16 @352, Pascal-Part-116 "
                                            "vocabulary, FP32 + FP16 ONNX bundle")
    p.add_argument("--out", default="bundles/reference", help="bundle folder (default "
                   "bundles/reference; the checkpoint goes to <out>.pt)")
    p.add_argument("--config", default="vit_b16", help="model config (default vit_b16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fp16", action="store_true", help="skip model_fp16.onnx")
    p.add_argument("--int8", action="store_true", help="also INT8 graphs (CPU), calibrated on "
                   "generated SynthParts images")
    p.add_argument("--check-batch", type=int, default=1,
                   help="images for export's CPU parity check (default 1)")
    a = p.parse_args(argv)
    if a.check_batch < 1:
        p.error("--check-batch must be >= 1")
    built = build_bundle(a.out, a.config, seed=a.seed, fp16=not a.no_fp16,
                         check_batch=a.check_batch, int8=a.int8)
    v = built.manifest.vocabulary
    print(f"reference bundle: {built.bundle} ({v.num_classes} classes, {len(v.parts)} parts, "
          f"{len(v.objects)} objects, input {built.manifest.input_size}); checkpoint "
          f"{built.checkpoint}; checkpoint {built.seconds['checkpoint']:.1f} s, export "
          f"{built.seconds['export']:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("benchmarks.reference", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
