"""The text side on the device (issue "Open vocabulary on the device"), on the bundle under test
(the demo's trained model when `demo/run/best.pt` exists):

- parity: the graph inputs `runtime.text` encodes (numpy + ONNX Runtime, no torch) equal the ones
  partclipseg computes in torch (relative error <= 1e-5), and a bundle whose vocabulary was
  written from them predicts the SynthParts val split exactly as the exported one;
- latency: encoding 1, 16 and 128 new names, and a cache hit: a speed target (a hit at most half
  the time of one new name, a ratio within the run; reported, fails only under --targets) with a
  gross-regression gate (a hit no slower than a miss) that fails on every run. That a hit runs
  no tower at all is a correctness check in tests/runtime/test_text.py.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.conftest import BenchBundle, BenchReport
from benchmarks.parity import compare, evaluate_segmenter
from benchmarks.targets import Target, TargetBook

MAX_REL_ERROR = 1e-5
CACHE_HIT_TARGET = 2.0  # a miss (one new name) / a hit (16 cached names), fastest runs
# Gross regression: a hit as slow as a miss, i.e. the cache no longer skips the tower. The
# ratio's spread is in docs/design.md ("Gates"); 1.0x sits far below it. Fastest runs, not
# medians: a hit's numpy matmuls share the cores with ONNX Runtime's spinning threads, and on
# a loaded 2-core machine one median of 10 hits read 8x a miss (2026-12-06).
CACHE_HIT_GATE = 1.0
_fresh = itertools.count()  # names never seen before in this process


def _new_names(n: int) -> list[str]:
    """n distinct names the encoder has not cached ("thing 17's part 3", ...)."""
    k = next(_fresh)
    return [f"thing {k}x{i}'s part {i % 7}" for i in range(n)]


@pytest.fixture(scope="module")
def text_side(bench_bundle: BenchBundle) -> Any:
    from runtime.bundle import read_manifest
    from runtime.text import TextSide

    return TextSide.open(read_manifest(bench_bundle.path), threads=None)


def test_text_side_equals_torch_on_the_bench_model(bench_bundle: BenchBundle, text_side: Any,
                                                   bench_report: BenchReport,
                                                   targets: TargetBook) -> None:
    if bench_bundle.checkpoint is None:
        pytest.skip("needs the bundle's checkpoint (--ckpt)")
    from partclipseg.checkpoint import load_model
    from partclipseg.model.deploy import vocab_arrays
    from runtime.vocabulary import Vocabulary, split_class_name

    model, vocab, _ = load_model(bench_bundle.checkpoint)
    new = Vocabulary.from_names([(f"{o} toy", p) for o, p in
                                 (split_class_name(n) for n in vocab.class_names[:20])])
    worst = 0.0
    for v in (vocab, new):
        got, want = text_side.vocab_arrays(v), vocab_arrays(model, v)
        for name, ref in want.items():
            if ref.dtype.kind == "i":
                np.testing.assert_array_equal(got[name], ref)
                continue
            err = float(np.linalg.norm(got[name] - ref) / np.linalg.norm(ref))
            if err > worst:
                worst, where = err, name
    bench_report.parity.append(f"text side (numpy + ORT) vs torch, {vocab.num_classes} + "
                               f"{new.num_classes} classes: max relative error {worst:.1e} "
                               f"(model: {bench_bundle.source})")
    targets.check(Target("text side vs torch: relative error", goal=MAX_REL_ERROR,
                         measured=worst, higher=False),
                  detail=f"worst input {where if worst else '-'}")


def test_runtime_encoded_vocabulary_predicts_like_the_exported_one(
        bench_bundle: BenchBundle, text_side: Any, val_split: dict[str, Any],
        tmp_path: Path, bench_report: BenchReport, targets: TargetBook) -> None:
    """The bundle's vocab.npz (torch, at export) replaced by the runtime's own encoding of the
    same names: Pred-All labels on SynthParts val agree."""
    from export.bundle import update_manifest, write_vocab
    from runtime import Segmenter
    from runtime.bundle import read_manifest

    b = tmp_path / "bundle"
    shutil.copytree(bench_bundle.path, b)
    vocab = read_manifest(b).vocabulary
    write_vocab(b, text_side.vocab_arrays(vocab), "vocab-runtime.npz")
    update_manifest(b, {"vocab": "vocab-runtime.npz"})
    ours = evaluate_segmenter(Segmenter.load(b, backend="onnxruntime", precision="fp32"),
                              val_split["pred-all"], "pred-all")
    ref = evaluate_segmenter(Segmenter.load(bench_bundle.path, backend="onnxruntime",
                                            precision="fp32"), val_split["pred-all"], "pred-all")
    c = compare(ours, ref)
    bench_report.parity.append(f"runtime-encoded vocabulary vs exported, Pred-All: max|d| "
                               f"{c.max_abs_delta():.3f} pt, agreement {100 * c.agreement:.4f}%")
    targets.check(Target("runtime-encoded vocabulary: Pred-All label agreement",
                         goal=99.99, measured=100 * c.agreement, unit="%"))
    targets.check(Target("runtime-encoded vocabulary: Pred-All max |dmIoU|", goal=0.05,
                         measured=c.max_abs_delta(), unit=" pt", higher=False))


@pytest.mark.parametrize("n", [1, 16, 128])
def test_encode_new_names(benchmark: Any, text_side: Any, environment: dict[str, Any],
                          n: int) -> None:
    """Tokenize + text tower + text layers for n names none of which is cached."""
    benchmark.group = "text/encode"
    benchmark.extra_info.update(environment, names=n)
    vocab = _vocab(_new_names(n))
    benchmark.pedantic(text_side.vocab_arrays, setup=lambda: ((_vocab(_new_names(n)),), {}),
                       rounds=5 if n == 128 else 10, warmup_rounds=1)
    assert text_side.vocab_arrays(vocab)["class_film_mul"].shape[0] == n


def test_encode_cache_hit_is_cheap(benchmark: Any, text_side: Any,
                                   environment: dict[str, Any], targets: TargetBook) -> None:
    """16 names encoded before: no tower run, so at most half the time of one new name."""
    import time

    benchmark.group = "text/encode"
    benchmark.extra_info.update(environment, names=16, cached=True)
    vocab = _vocab(_new_names(16))
    text_side.vocab_arrays(vocab)
    benchmark.pedantic(text_side.vocab_arrays, args=(vocab,), rounds=20, warmup_rounds=2)
    # A ratio within this run (the machine's speed cancels). Hits and misses are timed in
    # separate blocks: right after a miss, ONNX Runtime's worker threads still spin-wait and
    # take both cores of a 2-core machine, which made an interleaved hit 10x slower.
    hit = []
    for _ in range(20):
        t = time.perf_counter()
        text_side.vocab_arrays(vocab)
        hit.append(time.perf_counter() - t)
    miss = []
    for _ in range(10):
        one = _vocab(_new_names(1))
        t = time.perf_counter()
        text_side.vocab_arrays(one)
        miss.append(time.perf_counter() - t)
    targets.check(Target("text: one new name / 16 cached names (fastest runs)",
                         goal=CACHE_HIT_TARGET, measured=float(np.min(miss) / np.min(hit)),
                         unit="x", speed=True, gate=CACHE_HIT_GATE),
                  detail=f"miss s {miss}, hit s {hit}")


def _vocab(names: list[str]) -> Any:
    from runtime.vocabulary import Vocabulary, split_class_name

    return Vocabulary.from_names([split_class_name(n) for n in names])
