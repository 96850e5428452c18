"""Checkpoints: round trip, atomic writes, clear errors for bad files."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from partclipseg.checkpoint import (CheckpointError, atomic_write, load_checkpoint,  # noqa: E402
                                    load_model, save_checkpoint)
from partclipseg.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, vocab):
    torch.manual_seed(1)
    model = build_model("tiny").eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, vocab, train_config={"lr": 1e-4}, extra={"step": 7})
    return path, model


def test_round_trip_gives_identical_outputs(ckpt, vocab, make_batch):
    path, model = ckpt
    loaded, vocab2, record = load_model(path)
    assert vocab2 == vocab
    assert record["train_config"] == {"lr": 1e-4} and record["step"] == 7
    assert loaded.cfg == model.cfg
    x, _, _ = make_batch(torch)
    with torch.no_grad():
        a, b = model(x, vocab), loaded(x, vocab2)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.object_logits, b.object_logits)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_checkpoint(ckpt, tmp_path, keep):
    data = ckpt[0].read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a partclipseg checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):  # would run a command if unpickled unsafely
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "partclipseg-checkpoint", "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_checkpoint(path)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    torch.save({"format": "partclipseg-checkpoint", "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="upgrade partclipseg"):
        load_checkpoint(path)


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"old")

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
