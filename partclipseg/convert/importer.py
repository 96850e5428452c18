"""`partclipseg import-weights`: foreign weights -> a partclipseg checkpoint of kind "init".

The written file is an ordinary partclipseg checkpoint (`save_checkpoint`: weights, model
config, vocabulary), so `eval`, `export` and `load_model` take it as is. It also records
`kind: "init"`, where the weights came from and the import report (unused / unmapped /
approximate / initialized keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.vocabulary import Vocabulary, VocabularyError

from runtime.io import CLIP_MEAN, CLIP_STD, file_sha256

from ..checkpoint import save_checkpoint
from .clipseg import Conversion, convert_clipseg, detect_layout
from .sources import WeightsError, read_weights

__all__ = ["ImportResult", "import_weights", "resolve_vocabulary", "SOURCES"]

SOURCES = {"clipseg": "hf-clipseg", "partclipseg": "partclipseg-released"}

# Our keys a source may leave to the model's own initialization, by source format.
_MAY_BE_INITIALIZED = {
    "hf-clipseg": ("adapters.", "background", "mix.", "embed_mix."),
    "partclipseg-released": (),  # every weight comes from the source (either mixing version)
}


@dataclass
class ImportResult:
    path: Path
    conversion: Conversion
    initialized: list[str]  # our keys left at the model's initialization
    notes: list[str] = field(default_factory=list)  # e.g. input normalization differs


def resolve_vocabulary(spec: str | Vocabulary) -> Vocabulary:
    """A Vocabulary, a canonical dataset name ("pascal_part_116") or a JSON file holding
    `Vocabulary.to_dict()` (optionally under "vocabulary", as SynthParts' classes.json)."""
    if isinstance(spec, Vocabulary):
        return spec
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise VocabularyError(f"cannot read vocabulary file {path}: {e}") from e
        return Vocabulary.from_dict(d.get("vocabulary", d) if isinstance(d, dict) else d)
    from ..data.vocabularies import get_vocabulary

    return get_vocabulary(spec)


def import_weights(source: str | Path, out: str | Path, *, expect: str | None = None,
                   vocab: str | Vocabulary = "pascal_part_116", image_size: int = 352,
                   mode: str = "partclipseg", adapters: bool = True,
                   allow_partial: bool = False) -> ImportResult:
    """Convert `source` (HF CLIPSeg folder/file or released PartCLIPSeg .pth) and write `out`.

    expect: "clipseg" or "partclipseg" to insist on a source kind (None: either).
    allow_partial: write the checkpoint even with source keys this converter does not know
        (they are ignored and listed).
    A released PartCLIPSeg checkpoint builds the model with the source's Mix version (`mix`:
    "linear" or "mlp") and the released adapter's output ReLU (`adapter_out_relu`).
    Raises WeightsError naming every key that blocks an exact import.
    """
    import torch

    from ..model import PartCLIPSeg

    vocabulary = resolve_vocabulary(vocab)
    foreign = read_weights(source)
    _, fmt = detect_layout(foreign.state_dict)
    if expect is not None and SOURCES[expect] != fmt:
        other = "clipseg" if expect == "partclipseg" else "partclipseg"
        raise WeightsError(f"--{expect} was given but {source} is a {fmt} checkpoint; "
                           f"use --{other}")
    conv = convert_clipseg(foreign.state_dict, foreign.config, image_size=image_size, mode=mode,
                           adapters=adapters, allow_partial=allow_partial,
                           name=f"import-{Path(source).stem}")
    if conv.unmapped and not allow_partial:
        raise WeightsError(f"{len(conv.unmapped)} source keys are not understood by this "
                           f"converter: {conv.unmapped}. Re-run with --partial to import the "
                           "rest (they are then ignored).")
    torch.manual_seed(0)  # initialized parts are reproducible
    model = PartCLIPSeg(conv.config)
    ours = model.state_dict()
    extra = sorted(set(conv.state_dict) - set(ours))
    if extra:  # a converter bug, never the user's
        raise WeightsError(f"converted keys the model does not have: {extra}")
    for k, v in conv.state_dict.items():
        if v.shape != ours[k].shape:
            raise WeightsError(f"{k}: converted shape {tuple(v.shape)} != model "
                               f"{tuple(ours[k].shape)}")
    initialized = sorted(set(ours) - set(conv.state_dict))
    allowed = _MAY_BE_INITIALIZED[conv.source_format]
    blocked = [k for k in initialized if not k.startswith(allowed)]
    if blocked:
        raise WeightsError(f"the source does not provide these weights of the model: {blocked}")
    model.load_state_dict(conv.state_dict, strict=False)
    notes = _preprocessing_notes(Path(source))
    files = [str(f) for f in foreign.files]
    extra_record: dict[str, Any] = {
        "kind": "init",
        "imported_from": {"path": str(source), "files": files,
                          "sha256": [file_sha256(f) for f in foreign.files]},
        "import_report": {**conv.report(), "initialized": initialized, "notes": notes},
    }
    path = save_checkpoint(out, model, vocabulary, extra=extra_record)
    return ImportResult(path, conv, initialized, notes)


def _preprocessing_notes(source: Path) -> list[str]:
    """Compare the source's HF image normalization (preprocessor_config.json) with ours."""
    folder = source if source.is_dir() else source.parent
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return []
    try:
        pre = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"{path} is unreadable: input normalization not checked"]
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if mean is None or std is None:
        return []
    if all(abs(a - b) < 1e-6 for a, b in zip(list(mean) + list(std), CLIP_MEAN + CLIP_STD)):
        return []
    return [f"the source was trained on inputs normalized with mean {mean}, std {std} "
            f"({path.name}); partclipseg normalizes with CLIP's mean {list(CLIP_MEAN)}, std "
            f"{list(CLIP_STD)}: outputs differ from the source's until fine-tuned"]
