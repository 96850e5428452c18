"""CLIPSeg-style decoder pieces: visual adapters, FiLM, post-LN blocks, the mask head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Adapter", "FiLM", "DecoderBlock", "MaskHead", "ConvBranch"]


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

    With `high_res` (the image's stride-4 features from `ConvBranch`, (B, D/2, S/4, S/4),
    shared by the C conditions of each image: N = B * C), they are added to the first
    upsampling's output before its ReLU, as SAM 2's mask decoder adds its image encoder's
    stride-4 features: the token grid says which part, the stride-4 features say where its
    edges are. Each condition weighs those channels by a gate computed from its own mean
    feature (`gate`, starting at 1 everywhere), so a condition picks the textures it is made
    of, like SAM's per-mask hypernetwork weights.
    """

    def __init__(self, dim: int, patch: int = 16, high_res: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(dim, dim // 2, patch // 4, stride=patch // 4)
        self.up2 = nn.ConvTranspose2d(dim // 2, 1, 4, stride=4)
        self.gate = nn.Linear(dim, dim // 2) if high_res else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.ones_(self.gate.bias)

    def forward(self, x: torch.Tensor, high_res: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, D, g, g); high_res (B, D/2, 4g', 4g') with N = B * C, or None."""
        if (high_res is None) != (self.gate is None):
            raise ValueError("high_res features must be given exactly when the head has a gate")
        up = self.up1(F.relu(self.conv(x)))
        if high_res is not None:
            b = high_res.shape[0]
            gate = self.gate(x.mean((2, 3)))[..., None, None]  # (N, D/2, 1, 1)
            up = (up.unflatten(0, (b, -1))
                  + gate.unflatten(0, (b, -1)) * high_res.unsqueeze(1)).flatten(0, 1)
        return _upsample_1(F.relu(up), self.up2)


def _upsample_1(x: torch.Tensor, up: nn.ConvTranspose2d) -> torch.Tensor:
    """`up(x).squeeze(1)` for a one-channel ConvTranspose2d whose kernel equals its stride:
    (N, C, h, w) -> (N, k h, k w).

    Kernel = stride means no overlap: each k x k output block is a linear map of one input
    vector, so the layer is a (C, k*k) matrix product followed by a pixel shuffle. Same
    numbers; on the CPU its forward + backward is ~3x faster than the ConvTranspose2d kernel,
    and the last upsampling is the largest tensor of a training step (B x classes x S x S).
    """
    if torch.onnx.is_in_onnx_export():
        # Exported graphs keep the ConvTranspose node: ONNX Runtime's Einsum is slower than
        # its ConvTranspose, and TensorRT fuses the latter.
        return up(x).squeeze(1)
    k = up.stride[0]
    w = up.weight.reshape(x.shape[1], k * k)
    y = torch.einsum("nchw,cq->nqhw", x, w) + up.bias
    return F.pixel_shuffle(y, k).squeeze(1)


class ConvBranch(nn.Module):
    """A small convolutional encoder beside the ViT, for random-init towers.

    (B, 3, S, S) normalized images -> (stride-4 features (B, D/2, S/4, S/4) for the mask heads,
    grid features (B, g*g, D) added to the decoder's deepest input tokens), g = S / patch.

    Four stride-2 stages (widths w, w, 2w, 2w; two 3x3 convolutions from stride 4 on) with a
    top-down path (FPN): the grid output sees ~100 pixels, the stride-4 output adds the coarse
    context to its own edges and textures. A random-init ViT at patch 16 sees a 160-pixel image
    as 10 x 10 frozen random tokens, coarser than the legs, eyes and wheels it must outline, and
    with little part information in them; this branch learns both from pixels
    (`ModelConfig.conv_branch`; 0 = off, the paper's CLIP-initialized model).
    """

    def __init__(self, width: int, dim: int, patch: int = 16):
        super().__init__()
        w = width

        def stage(cin: int, cout: int, n: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
            for _ in range(n - 1):
                layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()]
            return nn.Sequential(*layers)

        self.s2, self.s4 = stage(3, w, 1), stage(w, w, 2)
        self.s8, self.s16 = stage(w, 2 * w, 2), stage(2 * w, 2 * w, 2)
        self.lateral8 = nn.Conv2d(2 * w, w, 1)
        self.top16 = nn.Conv2d(2 * w, w, 1)
        self.out4 = nn.Conv2d(w, dim // 2, 1)
        self.out_grid = nn.Linear(2 * w, dim)
        self.patch = patch

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f4 = self.s4(self.s2(images))
        f8 = self.s8(f4)
        f16 = self.s16(f8)
        up8 = self.lateral8(f8) + F.interpolate(self.top16(f16), scale_factor=2.0)
        high_res = self.out4(F.relu(f4 + F.interpolate(up8, scale_factor=2.0)))
        # The ViT grid is S / patch: pool stride-16 features to it (identity at patch 16).
        g = images.shape[-1] // self.patch
        grid = F.adaptive_avg_pool2d(f16, g) if f16.shape[-1] != g else f16
        return high_res, self.out_grid(grid.flatten(2).transpose(1, 2))
