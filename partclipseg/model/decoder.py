"""CLIPSeg-style decoder pieces: visual adapters, FiLM, post-LN blocks, the mask head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Adapter", "FiLM", "DecoderBlock", "MaskHead"]


class Adapter(nn.Module):
    """Residual bottleneck adapter on a tapped ViT activation: a <- (1 - r) a + r MLP(a).

    (..., W) -> (..., W). MLP is W -> hidden -> W with ReLU and no biases. With `out_relu`, the
    MLP ends with one more ReLU: a <- (1 - r) a + r ReLU(MLP(a)), the released PartCLIPSeg
    `Adapter` (fc = Linear, ReLU, Linear, ReLU; applied as 0.2 fc(a) + 0.8 a). The ReLU has no
    weights, so the state-dict keys (mlp.0, mlp.2) are the same either way.
    """

    def __init__(self, width: int, hidden: int, ratio: float = 0.2, out_relu: bool = False):
        super().__init__()
        self.ratio = ratio
        layers = [nn.Linear(width, hidden, bias=False), nn.ReLU(),
                  nn.Linear(hidden, width, bias=False)]
        if out_relu:
            layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return (1 - self.ratio) * a + self.ratio * self.mlp(a)


class FiLM(nn.Module):
    """Feature-wise linear modulation from a text embedding.

    `vectors(e)`: (C, E) text embeddings -> (mul, add), each (C, D). They depend on text only,
    so deployment precomputes them; `apply` is the image-side half.
    """

    def __init__(self, embed_dim: int, dim: int):
        super().__init__()
        self.mul = nn.Linear(embed_dim, dim)
        self.add = nn.Linear(embed_dim, dim)

    def vectors(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mul(e), self.add(e)

    @staticmethod
    def apply(x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """x (B, 1, ..., D) or (B, C, ..., D); mul/add (C, D) -> (B, C, ..., D)."""
        shape = (1, mul.shape[0]) + (1,) * (x.dim() - 3) + (mul.shape[1],)
        return mul.reshape(shape) * x + add.reshape(shape)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderBlock(nn.Module):
    """Post-LN transformer block (CLIPSeg decoder layer). (N, T, D) -> (N, T, D).

    With `need_attention`, also returns the head-averaged self-attention probabilities
    (N, T, T), rows summing to 1; otherwise the fused SDPA kernel is used and None is returned.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str = "relu"):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim),
                                 nn.ReLU() if act == "relu" else _QuickGELU(),
                                 nn.Linear(mlp_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, need_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, t, d = x.shape
        q, k, v = (p(x).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if need_attention:
            probs = torch.softmax((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
            h = probs @ v
            attention = probs.mean(dim=1)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
            attention = None
        x = self.norm1(x + self.out_proj(h.transpose(1, 2).reshape(n, t, d)))
        x = self.norm2(x + self.mlp(x))
        return x, attention


class MaskHead(nn.Module):
    """(N, D, g, g) features -> (N, p g, p g) mask logits, p = ViT patch size (a multiple of 4).

    Conv3x3 D->D, ReLU, ConvT D->D/2 (k p/4, s p/4), ReLU, ConvT D/2->1 (k4, s4): for p = 16 the
    CLIPSeg "rd64-refined" head; smaller patches (tiny CPU models) shrink the first upsampling.
    """

    def __init__(self, dim: int, patch: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(dim, dim // 2, patch // 4, stride=patch // 4)
        self.up2 = nn.ConvTranspose2d(dim // 2, 1, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        x = F.relu(self.up1(x))
        return self.up2(x).squeeze(1)
