"""Lean PartCLIPSeg runtime: numpy in, label map out. Never imports torch at module level."""

from .vocabulary import Vocabulary, VocabularyError

__all__ = ["Vocabulary", "VocabularyError"]
