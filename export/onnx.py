"""`python -m export.onnx --ckpt best.pt [--out BUNDLE]`: checkpoint -> FP32 + FP16 ONNX bundle.

The bundle folder defaults to `best_bundle/` beside the checkpoint.

Steps: load the checkpoint; precompute the text side (vocab.npz); trace `DeployModel` to ONNX
(opset 17, so LayerNorm is one LayerNormalization node); check and simplify it (onnx checker,
onnxslim); derive the FP16 graph with ONNX Runtime's float16 converter, LayerNormalization kept
in FP32 (its variance overflows FP16 on CLIP's large activations; softmax subtracts its max and
stays FP16); run both graphs in ONNX Runtime on fresh random images and compare with PyTorch,
failing loudly above tolerance; write the manifest. The bundle is staged and swapped in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.errors import UserError, run_command

from .graph import FP16_KEEP_FP32, ort_run, relative_error, to_fp16, trace_deploy

__all__ = ["export_onnx", "ExportError", "parity", "build_parser", "main"]

FP32_TOLERANCE = 1e-4  # relative L2 error of the logits, ONNX Runtime FP32 vs PyTorch
FP16_TOLERANCE = 2e-2  # the same for the FP16 graph


class ExportError(UserError, RuntimeError):
    """An exported graph failed its checks (checker, parity with PyTorch)."""


def _log(msg: str) -> None:
    print(f"[export.onnx] {msg}", flush=True)


def parity(ours: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    """Relative L2 error of each output and the argmax agreement of the first (logits)."""
    rel = [relative_error(a, b) for a, b in zip(ours, ref)]
    agree = float((ours[0].argmax(1) == ref[0].argmax(1)).mean())
    return {"rel_error": max(rel), "argmax_agreement": agree}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxslim
    import torch

    import partclipseg

    return {"partclipseg": partclipseg.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxslim": onnxslim.__version__}


def export_onnx(ckpt: str | Path, out: str | Path, opset: int = 17, image_size: int | None = None,
                image_dtype: str = "uint8", fp16: bool = True, labels: bool = False,
                fast: Sequence[int] | None = None, slots: dict[str, int] | None = None,
                check_batch: int = 2,
                fp32_tolerance: float = FP32_TOLERANCE, fp16_tolerance: float = FP16_TOLERANCE,
                int8: bool = False, calibration: str | Path | None = None,
                int8_method: str | None = None, int8_min_agreement: float | None = None
                ) -> Any:
    """Write a bundle for checkpoint `ckpt` to folder `out`; returns its `runtime.bundle.Manifest`.

    image_size: model input side (default: the checkpoint's); position embeddings are resized.
    image_dtype: "uint8" or "float32" for the image input (both RGB, 0-255, (B, S, S, 3)).
    labels: also write label-map graphs (Pred-All in the graph, output (B, S, S) int32): the
        fast path on GPUs, where copying per-class maps to the host dominates.
    fast: batch sizes of fast slot graphs to write (`export.fast`: every dimension static, the
        vocabulary in zero-padded slots sized by `slots` {"max_parts", "max_objects",
        "max_classes"}, default `export.fast.DEFAULT_SLOTS`); None: none.
    int8: also write the INT8 twin of every FP32 graph (`export.int8`, for CPUs), calibrated on
        `calibration` (a folder of images; default: the checkpoint's training images).
        int8_method: "static" (default, `export.int8.DEFAULT_METHOD`) or "dynamic".
    Every bundle gets a check set (`export.check`): held-out images (the checkpoint's
    validation images, else images held out of calibration, else seeded noise) with PyTorch
    FP32's Pred-All labels and each precision's least share of equal labels
    (`export.check.MIN_AGREEMENT`; `int8_min_agreement` overrides INT8's). Every graph runs
    it here, through `runtime.verification`, as `partclipseg check` runs it where the bundle is
    deployed.
    Raises ExportError when a graph disagrees with PyTorch beyond the tolerances (relative L2
    of the logits on `check_batch` fresh random images), or an INT8 graph's check labels fall
    below its threshold; nothing is written then.
    """
    import torch

    from partclipseg.checkpoint import load_model
    from runtime.io import CLIP_MEAN, CLIP_STD, file_sha256
    from partclipseg.model.backbone import resize_pos_embed
    from runtime import bundle as spec

    from partclipseg.model.deploy import DeployModel, deploy_mode, example_inputs, vocab_arrays

    from .bundle import staged_bundle, write_manifest, write_vocab
    from .text import write_text_side

    if opset < 17:
        raise ValueError(f"opset {opset} < 17: LayerNormalization (kept in FP32 in the FP16 "
                         "graph) needs opset 17 or newer")
    if image_dtype not in ("uint8", "float32"):
        raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {image_dtype!r}")
    if int8_min_agreement is not None and not 0.0 <= int8_min_agreement <= 1.0:
        raise ValueError(f"--int8-min-agreement {int8_min_agreement} must be a share between 0 "
                         "and 1 (0.99: 99% of labels equal to PyTorch FP32's)")
    t_start = time.perf_counter()
    ckpt = Path(ckpt)
    model, vocab, record = load_model(ckpt)
    from .check import MIN_AGREEMENT, check_image_files, write_check_set

    train_config = record.get("train_config") or {}
    int8_images: list[Path] = []
    if int8:  # find the calibration images before anything is exported
        from .int8 import calibration_images

        int8_images = calibration_images(calibration, train_config)
    check_files, int8_images, check_source = check_image_files(train_config, int8_images)
    thresholds = {**MIN_AGREEMENT, **({"int8": int8_min_agreement}
                                      if int8_min_agreement is not None else {})}
    if image_size and image_size != model.cfg.image_size:
        patch = model.cfg.patch_size
        if image_size % patch:
            raise ValueError(f"--image-size {image_size} must be a multiple of {patch}")
        model.cfg = model.cfg.replace(image_size=image_size)
        with torch.no_grad():
            pos = resize_pos_embed(model.vit.positional_embedding.detach(), model.cfg.grid_size)
        model.vit.positional_embedding = torch.nn.Parameter(pos, requires_grad=False)
    size, mode = model.cfg.image_size, deploy_mode(model.cfg)
    arrays = vocab_arrays(model, vocab)
    _log(f"{ckpt} -> {out}: {mode}, {vocab.num_classes} classes, input {size}x{size} {image_dtype}")

    parities: dict[str, Any] = {}
    with staged_bundle(out) as stage:
        write_vocab(stage, arrays, spec.VOCAB_FILE)
        trace_in = example_inputs(size, arrays, batch=1, seed=0, dtype=image_dtype)
        check_in = example_inputs(size, arrays, batch=check_batch, seed=1, dtype=image_dtype)
        logits_graph = DeployModel(model, CLIP_MEAN, CLIP_STD).eval()
        inputs = logits_graph.input_specs(image_dtype)  # the graph contract (runtime.bundle)
        names = list(inputs)
        files = {"vocab": spec.VOCAB_FILE}
        # The text side: new class names at run time, without torch (runtime.text).
        text_info, text_files = write_text_side(model, vocab, stage, opset)
        files.update(text_files)
        _log(f"  text side: {', '.join(text_files.values())} (ONNX text tower vs PyTorch: "
             f"relative error {text_info.parity['rel_error']:.1e})")
        for is_labels in (False, True) if labels else (False,):
            suffix = "_labels" if is_labels else ""
            (fp32_key, fp32_name), (fp16_key, fp16_name) = (
                spec.graph_file(p, is_labels) for p in ("fp32", "fp16"))
            graph_model = DeployModel(model, CLIP_MEAN, CLIP_STD, labels=is_labels).eval()
            t = time.perf_counter()
            graph = trace_deploy(graph_model, trace_in, stage / fp32_name, opset, image_dtype,
                                 log=_log)
            _log(f"  {fp32_name}: traced in {time.perf_counter() - t:.1f} s")
            files[fp32_key] = fp32_name
            if fp16:
                to_fp16(graph, stage / fp16_name)
                files[fp16_key] = fp16_name
            # Parity on images the trace never saw.
            with torch.no_grad():
                ref = [o.numpy() for o in graph_model(*(torch.from_numpy(check_in[n])
                                                        for n in names))]
            checks = [("fp32", fp32_name, fp32_tolerance)]
            if fp16:
                checks.append(("fp16", fp16_name, fp16_tolerance))
            for precision, name, tol in checks:
                got = ort_run(stage / name, check_in)
                if is_labels:  # label maps: agreement, against 1 - tolerance * 10
                    agree = float(np.mean(got[0] == ref[0]))
                    p = {"label_agreement": agree, "tolerance": 1 - 10 * tol}
                    ok, shown = agree >= 1 - 10 * tol, f"label agreement {100 * agree:.2f}%"
                else:
                    p = {**parity(got, ref), "tolerance": tol}
                    ok = p["rel_error"] <= tol  # also False for NaN
                    shown = (f"relative error {p['rel_error']:.2e} (tolerance {tol:.0e}), argmax "
                             f"agreement {100 * p['argmax_agreement']:.2f}%")
                parities[f"{precision}{suffix}"] = {**p, "images": check_batch}
                _log(f"  ONNX Runtime {name} vs PyTorch: {shown}")
                if not ok:
                    raise ExportError(f"{name} disagrees with PyTorch ({shown}); the bundle was "
                                      "not written (the previous one, if any, is untouched)")

        fast_info = None
        if fast:
            from .fast import DEFAULT_SLOTS, export_fast_graphs

            fast_info, fast_files = export_fast_graphs(
                model, stage, arrays, fast, **{**DEFAULT_SLOTS, **(slots or {})}, opset=opset,
                fp16=fp16, image_dtype=image_dtype, log=_log)
            files.update(fast_files)
        precisions = ("fp32", "fp16") if fp16 else ("fp32",)
        if int8:
            from .int8 import DEFAULT_METHOD, write_int8_graphs

            int8_files, int8_parity = write_int8_graphs(
                stage, files, arrays, {n: t for n, t in inputs.items() if n != spec.IMAGE},
                int8_images, size, image_dtype, fast_info, int8_method or DEFAULT_METHOD,
                log=_log)
            files.update(int8_files)
            parities.update(int8_parity)
            precisions += ("int8",)
        check = write_check_set(stage, logits_graph, arrays, vocab.class_names,
                                vocab.class_objects, check_files, check_source, size,
                                image_dtype, thresholds)
        files["check"] = spec.CHECK_FILE
        outputs = dict(logits_graph.output_specs())
        if labels:
            outputs.update(DeployModel(model, CLIP_MEAN, CLIP_STD, labels=True).output_specs())
        manifest = spec.Manifest(
            mode=mode, input_size=size, vocabulary=vocab, files={}, image_dtype=image_dtype,
            mean=CLIP_MEAN, std=CLIP_STD,
            inputs=inputs, outputs=outputs,
            model_config=model.cfg.to_dict(),
            checkpoint=spec.CheckpointRef(str(ckpt.absolute()), file_sha256(ckpt)),
            onnx=spec.OnnxInfo(opset, tuple(FP16_KEEP_FP32), parities),
            precisions=precisions, producer=_versions(),
            fast=fast_info,
            text=text_info,
            check=check,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ).with_files(stage, files)
        write_manifest(stage, manifest)
        manifest = _record_check(stage, manifest)
    _log(f"bundle written to {out} in {time.perf_counter() - t_start:.1f} s")
    return manifest.replace(path=Path(out) / spec.MANIFEST)


def _record_check(stage: Path, manifest: Any) -> Any:
    """Run the staged bundle's check set through every graph here (`export.check.measure`),
    record the results in its manifest and return it; ExportError when an INT8 graph falls
    below its threshold (a float graph below its own is logged: a random-init model's labels
    are near-ties)."""
    from runtime.verification import machine

    from .bundle import write_manifest
    from .check import measure

    measured = measure(stage, log=_log)
    limits = manifest.check.min_agreement
    for key, agree in measured.items():
        precision = key.split("/")[0]
        if agree >= limits[precision]:
            continue
        shown = (f"{key} labels agree with PyTorch FP32's on {100 * agree:.2f}% of the check "
                 f"images' pixels (< {100 * limits[precision]:.1f}%)")
        if precision == "int8":
            raise ExportError(f"{shown}; the bundle was not written (the previous one, if any, "
                              "is untouched)")
        _log(f"  warning: {shown}: `partclipseg check` will report it")
    parity = {k: dict(v) for k, v in manifest.onnx.parity.items()}
    for key in parity:
        if key.startswith("int8"):
            route = "" if key == "int8" else ("/labels" if key == "int8_labels" else "/fast")
            parity[key].update(label_agreement=measured[f"int8{route}"],
                               images=manifest.check.images)
    manifest = manifest.replace(
        check=manifest.check.replace(exported=measured, machine=machine()),
        onnx=dataclasses.replace(manifest.onnx, parity=parity))
    write_manifest(stage, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by partclipseg train")
    p.add_argument("--out", help="bundle folder to write, replaced atomically (default: "
                   "CKPT_bundle/ beside the checkpoint, e.g. best_bundle/ for best.pt)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--image-size", type=int, help="model input side (default: the checkpoint's)")
    p.add_argument("--image-dtype", choices=["uint8", "float32"], default="uint8",
                   help="dtype of the image input (RGB 0-255 either way; default uint8)")
    p.add_argument("--no-fp16", action="store_true", help="skip model_fp16.onnx")
    p.add_argument("--labels", action="store_true",
                   help="also write label-map graphs (Pred-All in the graph; fast GPU path)")
    p.add_argument("--fast", type=int, nargs="+", metavar="BATCH",
                   help="also write fast slot graphs (all dimensions static) for these batch "
                   "sizes, e.g. --fast 1 8 32 (GPU: CUDA graphs, static TensorRT profiles)")
    p.add_argument("--max-parts", type=int, default=88, help="fast graphs: part slots (88)")
    p.add_argument("--max-objects", type=int, default=48, help="fast graphs: object slots (48)")
    p.add_argument("--max-classes", type=int, default=240,
                   help="fast graphs: class slots (240; Pascal-Part-116 and ADE20K-Part-234 fit)")
    p.add_argument("--int8", action="store_true",
                   help="also write INT8 graphs for CPUs (calibrated, checked against FP32)")
    p.add_argument("--calibration", metavar="DIR",
                   help="--int8: folder of calibration images (default: the checkpoint's "
                   "training images)")
    p.add_argument("--int8-method", choices=["static", "dynamic"],
                   help="--int8: calibrated static QDQ (default) or dynamic quantization")
    p.add_argument("--int8-min-agreement", type=float, metavar="SHARE",
                   help="--int8: least share of the check images' labels equal to PyTorch "
                   "FP32's, here and where the bundle is checked (default 0.99)")
    p.add_argument("--fp32-tolerance", type=float, default=FP32_TOLERANCE)
    p.add_argument("--fp16-tolerance", type=float, default=FP16_TOLERANCE)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        from .bundle import default_bundle_dir

        out = Path(a.out) if a.out else default_bundle_dir(a.ckpt)
        export_onnx(a.ckpt, out, opset=a.opset, image_size=a.image_size,
                    image_dtype=a.image_dtype, fp16=not a.no_fp16, labels=a.labels,
                    fast=a.fast, slots={"max_parts": a.max_parts, "max_objects": a.max_objects,
                                        "max_classes": a.max_classes},
                    fp32_tolerance=a.fp32_tolerance, fp16_tolerance=a.fp16_tolerance,
                    int8=a.int8, calibration=a.calibration, int8_method=a.int8_method,
                    int8_min_agreement=a.int8_min_agreement)
        _log(f"bundle: {out.absolute()}")
        return 0
    return run_command("export.onnx", body)


if __name__ == "__main__":
    sys.exit(main())
