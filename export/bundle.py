"""Writing bundles (the schema lives in `runtime.bundle`): atomic, never half-written.

A fresh bundle is staged in a hidden sibling folder and swapped in by rename, so an export that
is interrupted leaves the previous bundle untouched and usable. Files added to an existing
bundle (an engine, a new vocabulary) are written to temp names and renamed; the manifest is
written last, so it never points at a file that is not complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from partclipseg.checkpoint import atomic_write
from runtime.bundle import MANIFEST, file_entry

__all__ = ["staged_bundle", "write_manifest", "write_vocab", "update_manifest"]


@contextlib.contextmanager
def staged_bundle(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out` (kept intact on failure)."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700
    try:
        yield stage
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)  # the old bundle stays whole until the swap
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_vocab(root: Path, arrays: dict[str, np.ndarray], name: str = "vocab.npz") -> Path:
    """Atomically write the precomputed text side as an uncompressed npz."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(Path(root) / name, write)


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    return atomic_write(Path(root) / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def update_manifest(root: Path, changes: dict[str, Any], files: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """Merge `changes` into root/manifest.json and (re)record `files` {key: file name}."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest.update(changes)
    for key, name in (files or {}).items():
        manifest["files"][key] = file_entry(root, name)
    write_manifest(root, manifest)
    return manifest
