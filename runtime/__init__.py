"""Lean PartCLIPSeg runtime: numpy in, label map out. Never imports torch at module level.

    from runtime import Segmenter
    seg = Segmenter.load("bundles/x")
    labels = seg.predict(rgb_uint8_image).labels   # (H, W) int32, -1 = background
"""

from .bundle import BundleError
from .preprocess import InputError
from .segmenter import Prediction, Segmenter
from .stream import Source, SourceError, Stream
from .vocabulary import Vocabulary, VocabularyError

__all__ = ["Segmenter", "Prediction", "Stream", "Source", "SourceError", "Vocabulary",
           "VocabularyError", "InputError", "BundleError"]
