"""Reading foreign weight files into a flat tensor state dict, without unpickling objects.

Accepted inputs (local paths only; nothing is downloaded):
  - a Hugging Face model folder: `config.json` + `model.safetensors` or `pytorch_model.bin`
    (sharded `*.index.json` layouts too);
  - a single `.safetensors` file;
  - a single torch file (`pytorch_model.bin`, `.pt`, `.pth`), either a plain state dict or a
    detectron2-style record with the state dict under `"model"` (optionally `"state_dict"`).

Torch files are read with `torch.load(weights_only=True)`: a file that holds pickled
non-tensor objects is refused with instructions to re-save only its tensors.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.errors import UserError

__all__ = ["WeightsError", "ForeignWeights", "read_weights"]


class WeightsError(UserError, ValueError):
    """Foreign weights are missing, unreadable, unsafe to load, or of an unknown layout."""


@dataclass
class ForeignWeights:
    """A foreign checkpoint as read from disk.

    state_dict: name -> tensor, with detectron2 / DDP wrappers removed from the record (key
        prefixes are kept; the mapping code finds them).
    config: the Hugging Face `config.json` next to the weights, when there is one.
    path: what was read (the weights file, or the folder).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    path: Path
    files: list[Path] = field(default_factory=list)


_RESAVE_HINT = (
    "Re-save only its tensors in an environment where that file is trusted, e.g.\n"
    "  python -c \"import torch; ck = torch.load('IN.pth', map_location='cpu', weights_only=False); "
    "torch.save({'model': {k: v for k, v in ck['model'].items() if torch.is_tensor(v)}}, "
    "'model_only.pth')\"\n"
    "(detectron2 checkpoints also carry optimizer/scheduler objects; numpy-array .pkl "
    "checkpoints need `torch.from_numpy` on each value), then import model_only.pth.")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} holds pickled objects that a weights-only load refuses "
                           f"({str(e).splitlines()[0]}). Nothing from it was executed.\n"
                           + _RESAVE_HINT) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{path} is not a readable torch file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(record, dict):
        for key in ("model", "state_dict"):
            if isinstance(record.get(key), dict):
                record = record[key]
                break
    if not isinstance(record, dict) or not record:
        raise WeightsError(f"{path} does not hold a state dict (expected name -> tensor, or one "
                           "under 'model' / 'state_dict')")
    tensors = {k: v for k, v in record.items() if torch.is_tensor(v)}
    others = sorted(k for k in record if k not in tensors)
    if others:
        raise WeightsError(f"{path}: entries that are not tensors: {others[:5]}"
                           + (" ..." if len(others) > 5 else "") + "\n" + _RESAVE_HINT)
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors ships with transformers
        raise WeightsError(f"{path} is a safetensors file: `pip install safetensors`") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from e


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    return _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch_file(path)


def _folder_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise WeightsError(f"cannot read {folder / index}: {e}") from e
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin",
                                                                     ".pth", ".pt"))
    if len(found) == 1:
        return [folder / found[0]]
    raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin"
                       + (f" (and several candidate files: {found}; pass one)" if found else ""))


def read_weights(path: str | Path) -> ForeignWeights:
    """A weights file or Hugging Face folder -> `ForeignWeights` (tensors on the CPU)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist (give a local folder with config.json + "
                           "weights, or a .safetensors / .bin / .pth file)")
    folder = path if path.is_dir() else path.parent
    files = _folder_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_load_file(f))
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot read {folder / 'config.json'}: {e}") from e
    return ForeignWeights(state, config, path, files)
