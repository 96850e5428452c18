"""PartCLIPSeg and the CLIPSeg baseline on open_clip's CLIP."""

from __future__ import annotations

from ..config import ModelConfig, load_model_config
from .partclipseg import Conditioning, PartCLIPSeg, SegOutput

__all__ = ["PartCLIPSeg", "Conditioning", "SegOutput", "ModelConfig", "load_model_config",
           "build_model"]


def build_model(config: str | ModelConfig = "tiny", **overrides) -> PartCLIPSeg:
    """A model from a config name/path ("tiny", "vit_b16", "my.json") or a ModelConfig."""
    cfg = config if isinstance(config, ModelConfig) else load_model_config(config, **overrides)
    if isinstance(config, ModelConfig) and overrides:
        cfg = cfg.replace(**overrides)
    return PartCLIPSeg(cfg)
