"""Shared fixtures: the test vocabulary, a synthetic labelled batch, random-init checkpoints and
their bundles (one factory for every model size), a SynthParts set for training runs.

Model sizes: "tiny" (the package's CPU model) for parity and behaviour tests; "micro" (3-block
64-wide ViT at 64 px, ~5 ms a prediction) where a test runs the model hundreds of times (fuzzing,
threads, training runs). Session fixtures are read-only: copy a bundle before changing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.vocabulary import Vocabulary

from .support import VOCAB


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return VOCAB


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def _make_batch(torch, size: int = 160, batch: int = 2, seed: int = 0):
    """Images (B, 3, S, S) plus part/object labels drawing two objects with their parts.

    Part labels index VOCAB classes (255 = none); object labels index VOCAB.objects
    (255 = background).
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    part = torch.full((batch, size, size), 255, dtype=torch.long)
    obj = torch.full((batch, size, size), 255, dtype=torch.long)
    s = size // 16
    obj[:, 1 * s:7 * s, 1 * s:7 * s] = 0
    part[:, 1 * s:3 * s, 1 * s:7 * s] = 0  # head
    part[:, 3 * s:7 * s, 1 * s:7 * s] = 1  # leg
    part[:, 1 * s:2 * s, 1 * s:2 * s] = 2  # eye (small)
    obj[:, 8 * s:15 * s, 8 * s:15 * s] = 1
    part[:, 8 * s:10 * s, 8 * s:15 * s] = 3
    part[:, 10 * s:15 * s, 8 * s:15 * s] = 4
    part[:, 9 * s:10 * s, 14 * s:15 * s] = 5
    return images, part, obj


@pytest.fixture(scope="session")
def make_batch():
    """`make_batch(torch, size=160, batch=2, seed=0)` -> (images, part labels, object labels)."""
    return _make_batch


# -- checkpoints and bundles: one factory each ---------------------------------------------------
def make_checkpoint(tmp_dir: Path, size: str = "tiny", mode: str = "partclipseg", seed: int = 0,
                    vocab: Vocabulary = VOCAB) -> Path:
    """A random-init model of config `size` ("tiny", "micro", ...) and bundle mode `mode`
    ("partclipseg", "clipseg" or "colour_blind": partclipseg with `colour_blind`), built after
    `torch.manual_seed(seed)`, saved over `vocab` in `tmp_dir`."""
    torch = pytest.importorskip("torch")
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(seed)
    model = (build_model(size, colour_blind=True) if mode == "colour_blind"
             else build_model(size, mode=mode))
    return save_checkpoint(Path(tmp_dir) / f"{size}_{mode}_seed{seed}.pt", model, vocab)


def make_bundle(ckpt: Path, out: Path, labels: bool = False) -> Path:
    """FP32 + FP16 ONNX bundle of `ckpt` in folder `out` (`labels`: with label-map graphs)."""
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    export_onnx(ckpt, out, labels=labels)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random-init tiny PartCLIPSeg checkpoint over VOCAB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_clipseg_ckpt(tmp_path_factory):
    """A random-init tiny CLIPSeg-baseline checkpoint over VOCAB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", mode="clipseg", seed=1)


@pytest.fixture(scope="session")
def micro_ckpt(tmp_path_factory):
    """A random-init micro PartCLIPSeg checkpoint over VOCAB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "micro", seed=0)


@pytest.fixture(scope="session")
def micro_cb_ckpt(tmp_path_factory):
    """A random-init micro colour-blind PartCLIPSeg checkpoint over VOCAB."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "micro", mode="colour_blind", seed=2)


@pytest.fixture(scope="session")
def micro_cb_bundle(tmp_path_factory, micro_cb_ckpt):
    """Bundle of `micro_cb_ckpt` (no label-map graphs: their code is the plain model's, tested
    on `tiny_bundle`; what differs comes before it, in the logits graph)."""
    return make_bundle(micro_cb_ckpt, tmp_path_factory.mktemp("bundle") / "micro_cb")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """Bundle of `tiny_ckpt` with label-map graphs."""
    return make_bundle(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "tiny", labels=True)


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory, micro_ckpt):
    """Bundle of `micro_ckpt` (no label-map graphs)."""
    return make_bundle(micro_ckpt, tmp_path_factory.mktemp("bundle") / "micro")


@pytest.fixture(scope="session")
def micro_seg(micro_bundle):
    """A `runtime.Segmenter` on `micro_bundle`: ONNX Runtime FP32, one thread."""
    from runtime import Segmenter

    return Segmenter.load(micro_bundle, backend="onnxruntime", threads=1)


# -- data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 64 px SynthParts set (16 train, 4 val images, seed 0) for micro training runs."""
    from partclipseg.data.synthparts import generate

    return generate(tmp_path_factory.mktemp("synthparts"), seed=0, n_train=16, n_val=4,
                    image_size=64, progress=False)


@pytest.fixture(scope="session")
def trained_micro_ckpt(tmp_path_factory, synth_root) -> Path:
    """The micro model trained 40 steps on `synth_root` (~15 s): unlike a random-init model,
    whose Pred-All labels are near-ties that any change of arithmetic flips, most of its labels
    hold with a margin, so INT8 and FP16 tests measure our code, not the CPU. Its checkpoint
    records `synth_root` as its data (calibration and check images come from there)."""
    pytest.importorskip("torch")
    from partclipseg.training.config import DataConfig, LossConfig, TrainConfig
    from partclipseg.training.trainer import train

    cfg = TrainConfig(model="micro", data=DataConfig(root=str(synth_root), val_limit=4),
                      steps=40, batch_size=4, lr=2e-3, warmup_steps=2, grad_clip=1.0,
                      eval_every=40, log_every=10, num_workers=0, seed=0,
                      loss=LossConfig(kind="softmax"))
    out = tmp_path_factory.mktemp("trained_micro")
    train(cfg, out, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory, trained_micro_ckpt) -> Path:
    """FP32 + INT8 bundle (logits, label-map and fast b2 graphs) of `trained_micro_ckpt`,
    calibrated on its training images, with its 4 validation images as the check set."""
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("int8") / "b"
    export_onnx(trained_micro_ckpt, out, fp16=False, labels=True, fast=[2],
                slots={"max_parts": 16, "max_objects": 16, "max_classes": 96}, int8=True)
    return out


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory) -> Path:
    """A scratch folder the fuzzing tests overwrite example after example."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture
def tensorrt_builder() -> None:
    """Skip (with the reason) unless a TensorRT flavour that can build engines is installed
    (CI: TensorRT-RTX, which builds on CPU-only machines)."""
    from runtime.backends.tensorrt import TensorRTUnavailable, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(str(e))
