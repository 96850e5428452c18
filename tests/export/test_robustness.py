"""Export reliability: corrupt checkpoints and class files, killed exports, atomic bundles.

A corrupt input writes nothing; an export never replaces what is not a bundle; an export killed
before its swap leaves the previous bundle whole and usable, and the next export cleans up.
Runtime, checkpoint and training robustness: tests/runtime/ and tests/partclipseg/.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from export.bundle import clean_stale_staging, staged_bundle  # noqa: E402
from partclipseg.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from runtime import BundleError, Segmenter, VocabularyError  # noqa: E402
from runtime import bundle as spec  # noqa: E402

from ..support import (FUZZ, MUTATION, child_env, copy_bundle, hidden, mutate,  # noqa: E402
                       random_image, wait_for)


# -- checkpoints in, bundles out ---------------------------------------------------------------
@FUZZ
@given(**MUTATION)
def test_export_of_a_corrupt_checkpoint_writes_nothing(micro_ckpt, fuzz_dir, offset, xor,
                                                       truncate):
    from export.onnx import main as export_main

    bad = fuzz_dir / "export_ckpt.pt"
    bad.write_bytes(mutate(micro_ckpt.read_bytes(), offset, xor, truncate))
    out = fuzz_dir / "never"
    try:
        load_checkpoint(bad)
    except CheckpointError:
        assert export_main(["--ckpt", str(bad), "--out", str(out)]) == 2
        assert not out.exists() and not hidden(fuzz_dir, "never")


def test_export_never_replaces_what_is_not_a_bundle(micro_ckpt, tmp_path, capsys):
    """`--out` = the checkpoint itself, or a training run folder: refused, nothing lost."""
    from export.onnx import main as export_main

    ckpt = tmp_path / "best.pt"
    shutil.copy(micro_ckpt, ckpt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"weights")
    for out in (ckpt, run):
        before = {p: p.read_bytes() for p in ([out] if out.is_file() else list(out.iterdir()))}
        assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 2
        assert "refusing to replace" in capsys.readouterr().err
        for p, data in before.items():
            assert p.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "run"]


# -- vocab class files ------------------------------------------------------------------------
@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.lists(st.sampled_from(["red quadruped's head", "dog's", "'s leg",
                                                "# c", "", "cat's tail *", "cat's tail",
                                                "a's b's c", "\x00's \x00"]),
                               max_size=6).map(lambda ls: "\n".join(ls).encode())))
def test_class_files_parse_or_are_refused_with_a_line(fuzz_dir, data):
    from runtime.vocabulary import read_class_file

    path = fuzz_dir / "classes.txt"
    path.write_bytes(data)
    try:
        vocab = read_class_file(path)
    except VocabularyError as e:
        assert str(path) in str(e)
        return
    assert vocab.num_classes >= 1 and len(set(vocab.class_names)) == vocab.num_classes


def test_garbage_class_file_leaves_the_bundle_untouched(micro_bundle, micro_ckpt, tmp_path):
    from export.vocab import main

    b = copy_bundle(micro_bundle, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    for data in (b"\xff\xfe\x00garbage", b"", b"red quadruped's head\nred quadruped's head\n"):
        (tmp_path / "c.txt").write_bytes(data)
        assert main(["--bundle", str(b), "--ckpt", str(micro_ckpt), "--classes",
                     str(tmp_path / "c.txt")]) == 2
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before


# == killed exports ===========================================================================
# Exports `ckpt` to `out`, but just before the manifest of the new bundle is written says so
# and waits to be killed.
_KILL_IN_EXPORT = r"""
import sys, time
from pathlib import Path
import export.bundle as eb
from export.onnx import export_onnx

ckpt, out, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def stall(root, manifest):
    ready.write_text(str(root))
    while True:
        time.sleep(1)
eb.write_manifest = stall
export_onnx(ckpt, out, fp16=False)
"""


def test_export_killed_midway_leaves_the_old_bundle_usable_and_is_cleaned(
        micro_ckpt, micro_bundle, micro_seg, tmp_path):
    out = copy_bundle(micro_bundle, tmp_path / "bundle")
    images = [random_image(seed=s) for s in range(3)]
    ref = [p.labels for p in micro_seg.predict_batch(images)]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_IN_EXPORT, str(micro_ckpt), str(out),
                             str(ready)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, proc)
        stage = Path(ready.read_text())
        assert stage.parent == tmp_path and stage.name.startswith(".bundle.staging.")
        # While the export runs, a reader sees the old bundle, whole.
        live = Segmenter.load(out, backend="onnxruntime", threads=1)
        assert clean_stale_staging(out) == []  # a live export's staging is left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = hidden(tmp_path, "bundle")
    assert left == sorted([stage.name, stage.name + ".lock"])  # what SIGKILL leaves
    for p, r in zip(Segmenter.load(out, backend="onnxruntime", threads=1).predict_batch(images),
                    ref):
        np.testing.assert_array_equal(p.labels, r)
    assert live.predict(images[0]).labels.shape == images[0].shape[:2]
    with pytest.raises(BundleError, match="not a bundle"):  # the staging folder is no bundle
        Segmenter.load(stage)
    # The next export of that bundle removes the leftovers first.
    removed = clean_stale_staging(out)
    assert stage in removed and hidden(tmp_path, "bundle") == []


def test_export_killed_between_the_two_renames_is_repaired(tmp_path):
    """Killed after the old bundle was parked and before the new one moved in: the next export
    (clean_stale_staging) puts the finished new bundle in place."""
    out = tmp_path / "b"
    stage = tmp_path / ".b.staging.abc123"
    (stage).mkdir()
    (stage / spec.MANIFEST).write_text("new")
    (tmp_path / ".b.staging.abc123.old" / "b").mkdir(parents=True)
    (tmp_path / ".b.staging.abc123.old" / "b" / spec.MANIFEST).write_text("old")
    (tmp_path / ".b.staging.abc123.lock").write_text("")
    clean_stale_staging(out)
    assert (out / spec.MANIFEST).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_staged_bundle_failure_and_success_leave_no_hidden_files(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(out) as stage:
            (stage / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".b.staging.legacy1").mkdir()  # an older writer's leftover, no lock
    with staged_bundle(out) as stage:
        (stage / spec.MANIFEST).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with staged_bundle(out) as stage:  # replacing a bundle
        (stage / spec.MANIFEST).write_text('{"v": 2}')
    assert (out / spec.MANIFEST).read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
