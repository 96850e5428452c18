"""Writing bundles (the schema lives in `runtime.bundle`): atomic, never half-written.

A fresh bundle is staged in a hidden sibling folder and swapped in by rename, so an export that
is interrupted leaves the previous bundle untouched and usable; what a killed export leaves
behind (`.NAME.staging.*`) is removed by the next export of that bundle. Files added to an existing
bundle (an engine, a new vocabulary) are written to temp names and renamed; the manifest is
written last, so it never points at a file that is not complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no stale-staging cleanup
    fcntl = None  # type: ignore[assignment]

from runtime.io import atomic_write, atomic_write_text
from runtime.bundle import MANIFEST, Manifest, read_manifest

__all__ = ["staged_bundle", "clean_stale_staging", "write_manifest", "write_vocab",
           "update_manifest", "default_bundle_dir"]


def default_bundle_dir(ckpt: str | Path) -> Path:
    """The bundle folder the export commands write when `--out` is left out: `best_bundle/`
    beside checkpoint `best.pt`."""
    ckpt = Path(ckpt)
    return ckpt.with_name(f"{ckpt.stem}_bundle")


@contextlib.contextmanager
def staged_bundle(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out` (kept intact on failure).

    `out` must be absent, an empty folder or a bundle (it has a manifest.json): any other file
    or folder is refused, never replaced (FileExistsError). The staging folder
    `.NAME.staging.XXXX` (and `.NAME.staging.XXXX.old` during the swap) is guarded by an
    advisory lock on `.NAME.staging.XXXX.lock` held while this export runs; an export killed
    before it could clean up leaves them behind, and the next export of the same bundle removes
    them (`clean_stale_staging`). Readers never look at them: the runtime opens `out` only.
    """
    out = Path(out).absolute()
    _refuse_non_bundle(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    lock_fd, lock = _create_lock(out)
    stage = Path(str(lock)[: -len(".lock")])
    old = Path(f"{stage}.old")
    try:
        stage.mkdir()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        yield stage
        _refuse_non_bundle(out)  # it may have appeared while we exported
        if out.exists():
            old.mkdir()
            os.replace(out, old / out.name)  # the old bundle stays whole until the swap
            os.replace(stage, out)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(lock_fd)


def _refuse_non_bundle(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir())):
        return
    what = "a file" if out.is_file() else "a dangling link" if not out.exists() else \
        f"a folder that is not a bundle (no {MANIFEST})"
    raise FileExistsError(f"{out} exists and is {what}: refusing to replace it with a bundle "
                          "(nothing was written); choose another --out or remove it first")


def _create_lock(out: Path) -> tuple[int, Path]:
    """A new `.NAME.staging.XXXX.lock`, created and locked (fd, path)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.staging.", suffix=".lock", dir=out.parent)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, Path(name)


def clean_stale_staging(out: str | Path) -> list[Path]:
    """Remove what killed exports of `out` left next to it; returns the removed paths.

    A staging folder whose lock no live process holds is stale. If an export died between the
    two renames of the swap (`out` absent, the previous bundle parked in `.staging.XXXX.old`),
    the finished new bundle is moved into place first. Staging folders without a lock file
    (older versions of this writer) are removed too. Without fcntl (Windows) nothing is touched.
    """
    if fcntl is None:
        return []
    out = Path(out).absolute()
    removed: list[Path] = []
    prefix = f".{out.name}.staging."
    for lock in sorted(out.parent.glob(f"{glob.escape(prefix)}*.lock")):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue  # its owner just finished
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live export
            stage = Path(str(lock)[: -len(".lock")])
            old = Path(f"{stage}.old")
            if not out.exists() and (old / out.name).is_dir():
                target = stage if (stage / MANIFEST).is_file() else old / out.name
                os.replace(target, out)
            for p in (stage, old):
                if p.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
            lock.unlink(missing_ok=True)
            removed.append(lock)
        finally:
            os.close(fd)
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        if p.is_dir() and not p.name.endswith(".old") and not Path(f"{p}.lock").exists():
            shutil.rmtree(p, ignore_errors=True)  # lock-less: an older writer's leftovers
            removed.append(p)
    return removed


def write_vocab(root: Path, arrays: dict[str, np.ndarray], name: str = "vocab.npz") -> Path:
    """Atomically write the precomputed text side as an uncompressed npz."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(Path(root) / name, write)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Atomically write `manifest` as root/manifest.json (write it after the files it lists)."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    return atomic_write_text(Path(root) / MANIFEST, text)


def update_manifest(root: Path, files: Mapping[str, str] | None = None, **changes: Any
                    ) -> Manifest:
    """root's manifest with `changes` (Manifest fields) and `files` ({key: file name}, recorded
    as they are now), written back; returns it."""
    root = Path(root)
    manifest = read_manifest(root).replace(**changes).with_files(root, files or {})
    write_manifest(root, manifest)
    return manifest
