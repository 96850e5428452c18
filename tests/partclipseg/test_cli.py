"""`partclipseg` argument errors: a clear message on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import pytest

from partclipseg.cli import main

pytest.importorskip("torch")


def _exit_code(argv: list[str]) -> int:
    """main()'s return value, or the code of the SystemExit argparse raises."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_train_with_missing_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert _exit_code(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "partclipseg train: error:" in err and "nope.yaml" in err and "synthparts_tiny" in err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps must be a positive integer"), ("steps=-3", "steps must be a positive"),
    ("steps=ten", "steps must be a positive"), ("steps", "not KEY=VALUE"),
    ("loss.nope=1", "unknown keys in loss: ['nope']"), ("nope.x=1", "'nope' is not a section"),
])
def test_train_with_bad_override(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert _exit_code(["train", "--config", "synthparts_tiny", "--out", str(out),
                       "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_train_resume_without_last_checkpoint(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    assert _exit_code(["train", "--config", "synthparts_tiny", "--out", str(out), "--resume",
                       "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "last.pt does not exist" in err
    assert not out.exists() and not data.exists()  # no run folder, no dataset generated


def test_train_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    out = tmp_path / "run"
    assert _exit_code(["train", "--config", "synthparts_tiny", "--out", str(out), "--resume",
                       "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not out.exists()


def test_train_with_invalid_config_values(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny\nlr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string
    out = tmp_path / "run"
    assert _exit_code(["train", "--config", str(cfg), "--out", str(out)]) == 2
    assert "write 1.0e-4" in capsys.readouterr().err
    assert not out.exists()


def test_eval_on_missing_checkpoint(tmp_path, capsys):
    metrics = tmp_path / "m.json"
    assert _exit_code(["eval", "--ckpt", str(tmp_path / "missing.pt"), "--json",
                       str(metrics)]) == 2
    err = capsys.readouterr().err
    assert "partclipseg eval: error:" in err and "missing.pt" in err
    assert not metrics.exists()


def test_eval_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert _exit_code(["eval", "--ckpt", str(bogus)]) == 2
    assert "partclipseg eval: error:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--train", "--val"])
def test_synth_with_negative_counts(tmp_path, capsys, flag):
    out = tmp_path / "data"
    assert _exit_code(["synth", "--out", str(out), flag, "-1"]) == 2
    assert f"{flag}: must be >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_synth_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _exit_code(["synth", "--out", str(out), "--train", "1", "--val", "1"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_synth_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "1",
                 "--image-size", "64"]) == 0
    assert (out / "classes.json").is_file()
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 2


def test_pretrain_with_bad_grey_share(tmp_path, capsys):
    out = tmp_path / "towers.pt"
    assert _exit_code(["pretrain", "--out", str(out), "--grey", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "grey must be in [0, 1)" in err and "Traceback" not in err
    assert not out.exists()
