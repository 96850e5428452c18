"""The bundle's check set: held-out images with PyTorch FP32's labels, written at export and
run where the bundle is deployed (`runtime.check`, `partclipseg check`).

`check_image_files` picks the images (the checkpoint's validation images, else images held out
of INT8 calibration, else seeded noise); `write_check_set` labels them with the model itself and
writes `check.npz`; `measure` runs every graph of a staged bundle through `runtime.verification` on
this machine, the same code a deployed bundle runs, and records what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["CHECK_IMAGES", "MIN_AGREEMENT", "check_image_files", "label_maps",
           "write_check_set", "measure"]

CHECK_IMAGES = 8
# Least share of a route's labels equal to PyTorch FP32's on the check images. FP32 graphs
# differ from PyTorch by float rounding only; FP16 and INT8 by their precision (the demo model:
# 99.99% and 99.7%). INT8 at 99% is also the bar below which export writes nothing.
MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.99}


def check_image_files(train_config: Mapping[str, Any], calibration: Sequence[Path] = (),
                      count: int = CHECK_IMAGES, seed: int = 0
                      ) -> tuple[list[Path], list[Path], str]:
    """(check image files, the calibration files left, a description of the source).

    The checkpoint's validation images (`<data.root>/images/<data.val_split>/`) when they are
    here; else `count` of the `calibration` files, held out of calibration (seeded); else no
    files (the caller uses seeded noise)."""
    from .int8 import IMAGE_SUFFIXES, split_images

    data = dict(train_config.get("data") or {})
    if data.get("root"):
        folder = Path(str(data["root"])) / "images" / str(data.get("val_split", "val"))
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if files:
            order = np.random.default_rng(seed).permutation(len(files))[:count]
            return [files[i] for i in sorted(order)], list(calibration), f"{folder} (validation)"
    if len(calibration) > count:
        calib, check = split_images(calibration, len(calibration), count, seed)
        return check, calib, f"{Path(calibration[0]).parent} (held out of INT8 calibration)"
    return [], list(calibration), f"seeded noise ({count} images; the checkpoint records no data)"


def label_maps(outputs: Sequence[np.ndarray], names: Sequence[str],
               class_objects: Sequence[int]) -> np.ndarray:
    """(B, S, S) int32 Pred-All labels at model resolution from a graph's outputs: its `labels`
    output, or the runtime's Pred-All on its logits (and object logits)."""
    from runtime.postprocess import pred_all

    out = dict(zip(names, outputs))
    if "labels" in out:
        return np.asarray(out["labels"])
    logits, objects = out["logits"], out.get("object_logits")
    size = logits.shape[-2:]
    return np.stack([pred_all(logits[i], np.asarray(class_objects), size,
                              None if objects is None else objects[i])
                     for i in range(logits.shape[0])])


def write_check_set(stage: Path, graph_model: Any, arrays: Mapping[str, np.ndarray],
                    class_names: Sequence[str], class_objects: Sequence[int],
                    files: Sequence[Path], source: str, size: int, image_dtype: str,
                    min_agreement: Mapping[str, float], count: int = CHECK_IMAGES,
                    seed: int = 0) -> Any:
    """Write `stage`/check.npz: the `files` (or `count` seeded noise images when there are
    none) resized to `size` as the runtime resizes, and the Pred-All labels (int16, -1 =
    background) that `graph_model` (`partclipseg.model.deploy.DeployModel`, logits graph, FP32
    PyTorch) gives them over `arrays`. Returns the `runtime.bundle.CheckInfo` (without the
    measured agreements: `measure`)."""
    import torch

    from runtime import bundle as spec
    from runtime.io import atomic_write

    from .int8 import calibration_feeds

    if files:
        images = calibration_feeds(files, size, {}, "uint8")
        batch = np.concatenate([f["image"] for f in images])
    else:
        batch = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)
    names = list(graph_model.input_specs(image_dtype))
    labels = []
    with torch.no_grad():
        for image in batch:
            feed = {"image": image[None].astype(image_dtype), **arrays}
            out = graph_model(*(torch.from_numpy(np.asarray(feed[n])) for n in names))
            outs = [o.numpy() for o in out]
            labels.append(label_maps(outs, [n for n in graph_model.output_specs()],
                                     class_objects)[0])
    labels_arr = np.stack(labels).astype(np.int16)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=batch, labels=labels_arr)
    atomic_write(Path(stage) / spec.CHECK_FILE, write)
    return spec.CheckInfo(len(batch), tuple(class_names), source, dict(min_agreement))


def measure(stage: Path, log: Callable[[str], None] = print) -> dict[str, float]:
    """{route key: agreement} of every precision and route of the staged bundle `stage` on
    this machine's CPU, through `runtime.verification` (the code `partclipseg check` runs)."""
    from runtime import bundle as spec
    from runtime.verification import bundle_routes, check_segmenter
    from runtime.segmenter import Segmenter

    manifest = spec.read_manifest(stage)
    measured = {}
    for precision in manifest.precisions:
        for route in bundle_routes(manifest, precision):
            seg = Segmenter.load(stage, backend="onnxruntime", device="cpu", precision=precision,
                                 fast_labels=route != "exact", slots=route == "fast")
            try:
                r = check_segmenter(seg)
            finally:
                seg.close()
            log(f"  check: {r.line()}")
            measured[r.key] = r.agreement
    return measured
