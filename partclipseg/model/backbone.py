"""The CLIP towers PartCLIPSeg builds on: open_clip's CLIP, tapped and trimmed.

The image tower runs only up to the deepest tapped block (blocks past it are deleted, not
skipped), and its position embeddings are bicubically resized once to the model input size.
The text tower encodes plain class names to the projected EOS feature.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig

# Towers written by `partclipseg pretrain` that ship with the package (see docs).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

__all__ = ["build_clip", "TappedViT", "TextEncoder", "tokenize", "with_pretrained_activation"]


def with_pretrained_activation(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with quick_gelu switched on when its open_clip pretrained tag was trained with it
    (OpenAI's weights were; open_clip only warns). Local weight files: set quick_gelu yourself."""
    if cfg.pretrained and cfg.clip_name and not cfg.quick_gelu:
        tag = open_clip.get_pretrained_cfg(cfg.clip_name, cfg.pretrained) or {}
        if tag.get("quick_gelu"):
            return cfg.replace(quick_gelu=True)
    return cfg


def build_clip(cfg: ModelConfig) -> open_clip.CLIP:
    """open_clip CLIP with `cfg`'s towers: pretrained when `cfg.pretrained` is set, else random.

    `cfg.pretrained` is an open_clip pretrained tag ("openai", "laion2b_s34b_b88k") or a local
    weight file; open_clip resolves both. Nothing is downloaded when it is None. Without a
    `clip_name`, it names towers written by `partclipseg pretrain` for exactly this config: a
    path, or the file name of one shipped in `partclipseg/weights/`.
    """
    if cfg.pretrained and not cfg.clip_name:
        return _load_towers(cfg)
    if cfg.pretrained:
        model = open_clip.create_model(cfg.clip_name, pretrained=cfg.pretrained,
                                       force_quick_gelu=cfg.quick_gelu)
        got = (model.visual.transformer.width, len(model.visual.transformer.resblocks))
        want = (cfg.vision_cfg["width"], cfg.vision_cfg["layers"])
        if got != want:
            raise ValueError(f"pretrained {cfg.clip_name}/{cfg.pretrained} has vision (width, "
                             f"layers) {got}, the config expects {want}")
        return model
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=dict(cfg.vision_cfg),
                          text_cfg=dict(cfg.text_cfg), quick_gelu=cfg.quick_gelu)


def _load_towers(cfg: ModelConfig) -> open_clip.CLIP:
    path = Path(cfg.pretrained)
    if not path.exists() and (WEIGHTS_DIR / path.name).exists() and path.name == str(path):
        path = WEIGHTS_DIR / path.name
    if not path.is_file():
        raise ConfigError(f"pretrained towers {cfg.pretrained!r} not found (a path, or one of "
                          f"{sorted(p.name for p in WEIGHTS_DIR.glob('*.pt'))}); write them "
                          "with `partclipseg pretrain --out FILE`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        state = record["state_dict"]
    except Exception as e:  # a truncated zip, a pickle that is not ours, a missing key
        raise ConfigError(f"{path} is not a `partclipseg pretrain` file ({type(e).__name__}: "
                          f"{e}); write it again with `partclipseg pretrain --out {path}`") from e
    model = open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=dict(cfg.vision_cfg),
                           text_cfg=dict(cfg.text_cfg), quick_gelu=cfg.quick_gelu)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
    except RuntimeError as e:
        raise ConfigError(f"{path} holds towers of another shape than model {cfg.name!r} "
                          f"({str(e).splitlines()[0]}); pretrain for this config") from e
    return model


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g0*g0, W) CLS + square grid position embedding -> (1 + grid*grid, W), bicubic."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    g0 = int(math.isqrt(patch_pos.shape[0]))
    if g0 == grid:
        return pos
    patch_pos = patch_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


class TappedViT(nn.Module):
    """open_clip's ViT image tower returning the token activations after the tapped blocks.

    Input: (B, 3, S, S) float, CLIP-normalized, S = cfg.image_size.
    Output: list of (B, 1 + g*g, W) tensors, g = S / 16, shallow to deep (one per tapped block).
    """

    def __init__(self, visual: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.taps = cfg.extract_layers
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = nn.Parameter(
            resize_pos_embed(visual.positional_embedding.detach(), cfg.grid_size),
            requires_grad=visual.positional_embedding.requires_grad)
        self.ln_pre = visual.ln_pre
        # Blocks past the deepest tap never influence the output: drop them.
        self.blocks = nn.ModuleList(visual.transformer.resblocks[: self.taps[-1] + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                taps.append(x)
        return taps


class TextEncoder(nn.Module):
    """open_clip's text tower: token ids (N, L) int64 -> projected EOS features (N, E) float."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.context_length = clip.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        # The EOS token has the largest id in CLIP's BPE vocabulary.
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def tokenize(names: list[str], context_length: int) -> torch.Tensor:
    """Plain class names (no prompt template) -> (N, context_length) int64 CLIP BPE ids."""
    return open_clip.tokenize(names, context_length=context_length)
