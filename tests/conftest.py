"""Shared fixtures: a small vocabulary, tiny random-init models and a synthetic labelled batch."""

from __future__ import annotations

import pytest

from runtime.vocabulary import Vocabulary

VOCAB = Vocabulary.from_names(
    [("red quadruped", "head"), ("red quadruped", "leg"), ("red quadruped", "eye"),
     ("blue bird", "head"), ("blue bird", "wing"), ("blue bird", "beak"), ("blue bird", "eye")],
    unseen_objects=["blue bird"],
)


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return VOCAB


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def make_batch(torch, size: int = 160, batch: int = 2, seed: int = 0):
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


# -- checkpoints and bundles (export / runtime tests) ------------------------------------------
@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, torch):
    """A random-init tiny PartCLIPSeg checkpoint over VOCAB."""
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", build_model("tiny"), VOCAB)


@pytest.fixture(scope="session")
def tiny_clipseg_ckpt(tmp_path_factory, torch):
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model

    torch.manual_seed(1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "clipseg.pt",
                           build_model("tiny", mode="clipseg"), VOCAB)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """FP32 + FP16 ONNX bundle of `tiny_ckpt` with label-map graphs (read-only: copy it before
    changing it)."""
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_onnx(tiny_ckpt, out, labels=True)
    return out
