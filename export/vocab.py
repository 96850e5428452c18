"""`python -m export.vocab --bundle B --ckpt best.pt --classes FILE`: a new vocabulary, no rebuild.

The graphs and the engine take the text side as inputs with dynamic class dimensions, so a new
vocabulary is only a new vocab.npz (text tower + FiLM/FiLM' vectors, computed here with the
checkpoint's text tower) and a new manifest vocabulary. Names may be new: generalized parts and
objects are encoded as plain words.

FILE: one object-specific class per line, "object's part" (e.g. "dog's head"); blank lines and
'#' comments are skipped; a trailing " *" marks the class's object as unseen (reporting only).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from runtime.errors import run_command
from runtime.vocabulary import read_class_file

if TYPE_CHECKING:
    from runtime.bundle import Manifest
    from runtime.vocabulary import Vocabulary

__all__ = ["set_vocabulary", "build_parser", "main"]


def set_vocabulary(bundle: str | Path, ckpt: str | Path, vocab: Vocabulary,
                   allow_other_checkpoint: bool = False) -> "Manifest":
    """Write the text side of `vocab` into `bundle`; returns the new manifest.

    The new vocab file gets a new name and the manifest (written last) switches to it, so a
    reader never sees a manifest that disagrees with its vocab file.
    """
    import json

    from partclipseg.checkpoint import load_model
    from runtime.io import file_sha256
    from partclipseg.model.deploy import deploy_mode, vocab_arrays
    from runtime import bundle as spec

    from .bundle import update_manifest, write_vocab

    manifest = spec.read_manifest(bundle)
    root = manifest.root
    want = manifest.checkpoint.sha256 if manifest.checkpoint else None
    if want and file_sha256(ckpt) != want and not allow_other_checkpoint:
        raise ValueError(f"{ckpt} is not the checkpoint {root} was exported from: its text "
                         "vectors would not match the graph's weights (pass "
                         "--allow-other-checkpoint only for a checkpoint with the same weights)")
    model, _, _ = load_model(ckpt)
    if deploy_mode(model.cfg) != manifest.mode:
        raise ValueError(f"{ckpt} is a {deploy_mode(model.cfg)} model, the bundle is "
                         f"{manifest.mode}")
    arrays = vocab_arrays(model, vocab)
    digest = hashlib.sha256(json.dumps(vocab.to_dict(), sort_keys=True).encode()).hexdigest()
    name = f"vocab-{digest[:10]}.npz"
    write_vocab(root, arrays, name)
    old = manifest.files["vocab"].path
    new = update_manifest(root, {"vocab": name}, vocabulary=vocab)
    if old != name:
        (root / old).unlink(missing_ok=True)
    print(f"[export.vocab] {root}: {vocab.num_classes} classes ({len(vocab.objects)} objects, "
          f"{len(vocab.parts)} parts) -> {name}")
    worst = max(len(vocab.parts), len(vocab.objects), vocab.num_classes)
    if new.engine is not None and worst > new.engine.max_classes:
        print(f"[export.vocab] note: more than the engine's {new.engine.max_classes} classes; "
              "the TensorRT backend will run it in chunks")
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.vocab", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--ckpt", required=True, help="the checkpoint the bundle was exported from")
    p.add_argument("--classes", required=True, help="class file: one \"object's part\" per line")
    p.add_argument("--allow-other-checkpoint", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        set_vocabulary(a.bundle, a.ckpt, read_class_file(a.classes), a.allow_other_checkpoint)
        return 0
    return run_command("export.vocab", body)


if __name__ == "__main__":
    sys.exit(main())
