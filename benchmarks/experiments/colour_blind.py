"""Experiment (not part of the package): a colour-blind body-plan pathway for SynthParts.

docs/synthparts_recipe.md, "The colour-blind pathway": Pred-All h-IoU 43.6 against 10.1 for the
demo recipe (one seed, 2026-12-01). This module patches `PartCLIPSeg` for training and
evaluation only; the export path does not know it. It is kept as the reference for building
the option properly (model option, graph inputs for the word rows and the object-word matrix,
the grey pass in the exported graph).

- Object names are split into a colour word and a body-plan word ("green quadruped").
- Parts and body-plan words are decoded from the features of the grey image, colour words from
  the colour image's; an object's logit is the sum of its two words' logits, its stage-2
  features and embedding the mean of theirs.

    partclipseg pretrain --out towers_grey.pt --sets parts colours plans --grey 0.5
    python -m benchmarks.experiments.colour_blind train --config synthparts_tiny --out runs/cb \
        --set model_overrides.pretrained=towers_grey.pt
    python -m benchmarks.experiments.colour_blind eval --ckpt runs/cb/last.pt --setting pred-all
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

from partclipseg.model.partclipseg import Conditioning, PartCLIPSeg, SegOutput
from runtime.io import CLIP_MEAN, CLIP_STD

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """CLIP-normalized (B, 3, S, S) images -> their luma, CLIP-normalized, in 3 channels."""
    mean, std = MEAN.to(x), STD.to(x)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(x)
    y = ((x * std + mean) * luma).sum(1, keepdim=True)
    return (y.expand(-1, 3, -1, -1) - mean) / std


def encode_vocabulary(self: PartCLIPSeg, vocab: Any) -> Conditioning:
    """Stage-1 rows [parts, colour words, plan words, background]; `words` (O, W) maps objects
    to their words."""
    device = self.background.device
    cw, pw = [], []
    for o in vocab.objects:
        c, p = o.split(" ", 1)
        cw += [c] if c not in cw else []
        pw += [p] if p not in pw else []
    words = cw + pw
    m = torch.zeros(len(vocab.objects), len(words), device=device)
    for i, o in enumerate(vocab.objects):
        c, p = o.split(" ", 1)
        m[i, words.index(c)] = 1.0
        m[i, words.index(p)] = 1.0
    n_parts = len(vocab.parts)
    e = self.encode_names(list(vocab.parts) + words)
    mul1, add1 = self.film.vectors(torch.cat([e, self.background]))
    e_obj = (m / m.sum(1, keepdim=True)) @ e[n_parts:]
    class_part = torch.tensor(vocab.class_parts, dtype=torch.long, device=device)
    class_object = torch.tensor(vocab.class_objects, dtype=torch.long, device=device)
    e_k = self.embed_mix(torch.cat([e_obj[class_object], e[class_part]], dim=1))
    mul2, add2 = self.film2.vectors(e_k)
    c = Conditioning(mul1, add1, n_parts, len(words), mul2, add2, class_part, class_object)
    c.words, c.n_colour = m, len(cw)
    return c


def _rows(cond: Conditioning, idx: torch.Tensor) -> Conditioning:
    return Conditioning(cond.film1_mul[idx], cond.film1_add[idx], 0, 0)


def forward_image(self: PartCLIPSeg, images: torch.Tensor, cond: Conditioning,
                  need_attention: bool = False, classes: torch.Tensor | None = None
                  ) -> SegOutput:
    m, nc = cond.words, cond.n_colour
    mn = m / m.sum(1, keepdim=True)
    p, w = cond.num_parts, cond.num_objects
    n = cond.film1_mul.shape[0]
    colour_idx = torch.arange(p, p + nc)
    grey_idx = torch.cat([torch.arange(0, p), torch.arange(p + nc, n)])  # parts, plans, bg
    img_c = self.image_features(images)
    img_g = self.image_features(grey(images))
    f_c, a_c = self.decode_stage1(img_c, _rows(cond, colour_idx), need_attention)
    f_g, a_g = self.decode_stage1(img_g, _rows(cond, grey_idx), need_attention)
    s_c = self.mask_logits(self.head, f_c, img_c)
    s_g = self.mask_logits(self.head, f_g, img_g)
    # reassemble rows in the conditioning order [parts, colour words, plan words, bg]
    feats = torch.cat([f_g[:, :p], f_c, f_g[:, p:]], 1)
    s1 = torch.cat([s_g[:, :p], s_c, s_g[:, p:]], 1)
    class_part, class_object = cond.class_part, cond.class_object
    mul2, add2 = cond.film2_mul, cond.film2_add
    if classes is not None:
        class_part, class_object = class_part[classes], class_object[classes]
        mul2, add2 = mul2[classes], add2[classes]
    obj_feats = torch.einsum("ow,bwxyd->boxyd", mn, feats[:, p:p + w])
    class_feats = self.stage2_from(feats[:, :p], obj_feats, class_part, class_object, mul2, add2)
    s2 = self.mask_logits(self.head2, class_feats, img_g)
    background = s1[:, -1:]
    obj_logits = torch.einsum("ow,bwxy->boxy", m, s1[:, p:p + w])
    attention = None
    if need_attention:
        att = torch.cat([a_g[:, :p], a_c, a_g[:, p:]], 1)
        attention = torch.cat([att[:, :p], torch.einsum("ow,bwqk->boqk", mn, att[:, p:p + w]),
                               att[:, -1:]], 1)
    return SegOutput(logits=torch.cat([s2, background], 1),
                     object_logits=torch.cat([obj_logits, background], 1),
                     part_logits=torch.cat([s1[:, :p], background], 1), attention=attention)


def main(argv: Sequence[str] | None = None) -> int:
    """`partclipseg` (train, eval, ...) with the colour-blind model patched in."""
    from partclipseg.cli import main as partclipseg_main

    PartCLIPSeg.encode_vocabulary = encode_vocabulary  # type: ignore[method-assign]
    PartCLIPSeg.forward_image = forward_image  # type: ignore[method-assign]
    return partclipseg_main(argv)


if __name__ == "__main__":
    sys.exit(main())
