"""Bring-your-own weights: Hugging Face CLIPSeg and released PartCLIPSeg checkpoints -> ours.

`import_weights(src, "init.pt")` reads a local HF CLIPSeg folder / safetensors / bin file or the
authors' detectron2 `.pth`, maps it onto PartCLIPSeg's keys (open_clip layout for the CLIP
towers, our decoder names), reports every dropped, unknown, approximate or initialized key, and
writes an ordinary partclipseg checkpoint tagged `kind: "init"`. See `clipseg` for the layouts.
"""

from .clipseg import Conversion, clipseg_model_config, convert_clipseg, detect_layout
from .importer import ImportResult, import_weights, resolve_vocabulary
from .sources import ForeignWeights, WeightsError, read_weights

__all__ = ["Conversion", "ForeignWeights", "ImportResult", "WeightsError", "clipseg_model_config",
           "convert_clipseg", "detect_layout", "import_weights", "read_weights",
           "resolve_vocabulary"]
