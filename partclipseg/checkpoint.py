"""Self-describing checkpoints: one file with weights, model config, vocabulary, training config.

Written atomically (temp file in the same folder + fsync + rename), so a crash mid-write leaves
the previous checkpoint intact. Read with `torch.load(weights_only=True)`: a file carrying
pickled objects is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from runtime.errors import UserError
from runtime.io import atomic_write
from runtime.vocabulary import Vocabulary

from . import __version__
from .config import ModelConfig

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "partclipseg-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt, foreign or of an unsupported version."""


def save_checkpoint(path: str | Path, model: torch.nn.Module, vocabulary: Vocabulary,
                    train_config: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (a PartCLIPSeg) with everything needed to rebuild and evaluate it.

    `extra` holds training state (step, optimizer, scheduler, RNG, metrics); it must contain
    only tensors, numbers, strings, lists and dicts so `weights_only=True` can load it.
    """
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model_config": model.cfg.to_dict(),
        "vocabulary": vocabulary.to_dict(),
        "train_config": train_config or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    return atomic_write(path, lambda tmp: torch.save(record, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint record (see `save_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train one with "
                              "`partclipseg train --config CONFIG --out DIR`)")
    _check_zip_crc(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds pickled objects that a weights-only load refuses "
                              f"(it was not written by partclipseg, or was tampered with): "
                              f"{str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); re-copy it or use "
                              "the previous checkpoint (last.pt / best.pt)") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a partclipseg checkpoint (no '{FORMAT}' marker); "
                              "to start from foreign weights use `partclipseg import-weights`")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}; this partclipseg "
                              f"({__version__}) reads up to {FORMAT_VERSION}: upgrade partclipseg")
    missing = {"model_config", "vocabulary", "state_dict"} - set(record)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}")
    return record


def _check_zip_crc(path: Path) -> None:
    """Verify the CRC-32 of every record of a zip-format torch file.

    `torch.load` does not check them: a flipped byte in the tensor data loads silently as
    different weights. One extra sequential read of the file (zlib's CRC-32 runs at GB/s).
    """
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy torch format or not a torch file: torch.load names it
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                              "re-copy it or use the previous checkpoint (last.pt / best.pt)"
                              ) from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: record {bad!r} fails its CRC-32 check (the "
                              "file was damaged after it was written); re-copy it or use the "
                              "previous checkpoint (last.pt / best.pt)")


def load_model(path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, Vocabulary, dict[str, Any]]:
    """Checkpoint -> (PartCLIPSeg in eval mode, vocabulary, record)."""
    from .model import PartCLIPSeg

    record = load_checkpoint(path, map_location)
    # The weights come from the checkpoint; never fetch the pretrained tower again.
    cfg = ModelConfig.from_dict(record["model_config"]).replace(pretrained=None)
    model = PartCLIPSeg(cfg)
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its own model config: {e}") from e
    return model.to(map_location).eval(), Vocabulary.from_dict(record["vocabulary"]), record
