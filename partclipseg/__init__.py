"""PartCLIPSeg: training, evaluation and checkpoints (torch + open_clip).

Submodules import torch; `import partclipseg` alone stays light.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
