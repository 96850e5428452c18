"""PartCLIPSeg losses: L = L_os + L_obj + L_part + 0.1 L_sep + 0.01 L_enh.

Targets use one convention throughout (see `build_targets`): a class/object index, the
background index (= number of classes/objects, i.e. the last channel), or -1 = no supervision.

Attention control (docs/design.md, "The method"). For each ground-truth object o in an image and each part
class j of o present there, the last stage-1 block's self-attention of the part and object
conditions, A_j = (A_part + A_obj) / 2, is pooled over the queries inside the part's mask,
blurred (3x3 Gaussian) and min-max normalized: map_j over the g x g keys, values in [0, 1].

- L_sep: the paper counts the share of object pixels claimed by more than one part, with claims
  B_j = [map_j > gamma]; that hard threshold carries no gradient (the released code's L_sep
  trains nothing). We relax each claim to a probability s_j = sigmoid((map_j - gamma) / tau)
  and take the probability that at least two independent claims fire,
  P(>=2) = 1 - P(0) - P(1). For 0/1 claims this equals the paper's indicator exactly, so the
  relaxation changes the gradient, not the quantity measured.
- L_enh = 1 - min_j max_{x in object} map_j: the weakest part's peak inside its object. (With
  the max taken over the whole map, min-max normalization would make it identically 0.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from runtime.io import IGNORE_LABEL
from runtime.vocabulary import Vocabulary

from ..model.partclipseg import SegOutput
from .config import LossConfig

__all__ = ["PartCLIPSegLoss", "build_targets", "weighted_bce", "softmax_ce",
           "attention_losses", "stage2_classes", "IGNORE", "DATA_IGNORE"]

IGNORE = -1  # no supervision, in loss targets
DATA_IGNORE = -1  # object label of pixels that must not be supervised (e.g. unseen objects)

# Maps a local count (a 0-d tensor: valid pixels, object instances) to the normalizer a mean
# divides by. None = the count itself (one process). Under DistributedDataParallel the trainer
# passes "global count / world size", so that DDP's gradient averaging gives exactly the
# gradient of the mean over the whole global batch, whatever each rank's share of valid pixels.
Count = Callable[[torch.Tensor], torch.Tensor]


def build_targets(part: torch.Tensor, obj: torch.Tensor, num_classes: int, num_objects: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset labels -> loss targets.

    part: (B, H, W) int64 class index in [0, K), 255 = no part label.
    obj: (B, H, W) int64 object index in [0, O), 255 = background, -1 = ignore (unseen object).
    Returns class_target in [0, K] (K = background) or -1, object_target in [0, O] or -1.
    Pixels inside an object without a part label get no class supervision.
    """
    background = obj == IGNORE_LABEL
    ignored = obj == DATA_IGNORE
    has_part = (part >= 0) & (part < num_classes)
    class_t = torch.where(has_part, part, torch.where(background, num_classes, IGNORE))
    obj_t = torch.where(background, num_objects, obj)
    class_t = torch.where(ignored, IGNORE, class_t)
    obj_t = torch.where(ignored | (obj_t > num_objects), IGNORE, obj_t)
    return class_t, obj_t


def stage2_classes(class_t: torch.Tensor, vocab: Vocabulary, negatives: int = 0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The classes a training step runs stage 2 for: (K',) int64, sorted, indices into `vocab`.

    Every class of every object with a labelled part in `class_t` ((B, H, W) targets from
    `build_targets`), plus `negatives` classes of other objects drawn uniformly at random.
    Oracle-Obj and Pred-All both rank a pixel's stage-2 logits only against the classes of one
    object (the given one, or the object head's winner), so the classes of absent objects
    carry no ranking signal for that pixel; leaving them out of the step saves their upsampling
    and their full-resolution BCE. (The negatives keep absent classes' logits from drifting.)
    """
    k = vocab.num_classes
    class_object = torch.tensor(vocab.class_objects, device=class_t.device)
    present = torch.unique(class_t)
    present = present[(present >= 0) & (present < k)]
    keep = torch.isin(class_object, class_object[present])
    if negatives > 0:
        others = torch.nonzero(~keep).flatten()
        if len(others):
            pick = torch.randperm(len(others), generator=generator)[:negatives].to(others.device)
            keep[others[pick]] = True
    return torch.nonzero(keep).flatten()


def softmax_ce(logits: torch.Tensor, target: torch.Tensor, background_weight: float,
               allowed: torch.Tensor | None = None, count: Count | None = None,
               balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the channels, last channel = background weighted by
    `background_weight`; mean over valid pixels (`count` as in `weighted_bce`).

    logits (B, C, H, W); target (B, H, W) in [0, C) or -1 (ignored). allowed: optional
    (B, C - 1, H, W) bool, which non-background channels compete at each pixel (background
    always does; the target must be allowed). balance: a pixel of a class with n pixels in
    the batch weighs n^-balance, rescaled to a mean weight of 1 (0 = plain; 1 = every
    present class counts alike, as mIoU does).
    """
    if allowed is not None:
        logits = torch.cat([logits[:, :-1].masked_fill(~allowed, -1e4), logits[:, -1:]], 1)
    valid = target >= 0
    n = valid.sum()
    n = (n if count is None else count(n)).clamp(min=1)
    t = target.clamp(min=0)
    per_pixel = F.cross_entropy(logits, t, reduction="none")
    w = torch.where(target == logits.shape[1] - 1, background_weight, 1.0) * valid
    if balance:
        pixels = torch.bincount(t[valid], minlength=logits.shape[1]).to(logits.dtype)
        pw = pixels.clamp(min=1).pow(-balance)[t] * valid
        w = w * pw * (valid.sum() / pw.sum().clamp(min=1e-12))
    return (per_pixel * w).sum() / n


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, background_weight: float,
                 count: Count | None = None) -> torch.Tensor:
    """One-vs-all BCE-with-logits, last channel = background weighted by `background_weight`.

    logits (B, C, H, W); target (B, H, W) in [0, C) or -1 (ignored). Mean over valid pixels and
    channels. Uses sum_c w_c softplus(x_c) - w_t x_t, which never materializes a one-hot, and a
    hand-written backward (w_c sigmoid(x_c) - w_t [c = t]) that makes one pass over the logits
    instead of autograd's several (the loss is a large share of a CPU training step).
    `count` maps the local number of valid pixels to the normalizer (see `PartCLIPSegLoss`).
    """
    c = logits.shape[1]
    valid = target >= 0
    n = valid.sum()
    n = (n if count is None else count(n)).clamp(min=1) * c
    return _WeightedBCE.apply(logits, target, float(background_weight), n)


class _WeightedBCE(torch.autograd.Function):
    """sum over valid pixels of sum_c w_c softplus(x_c) - w_t x_t, divided by `n`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, bg: float,  # type: ignore[override]
                n: torch.Tensor) -> torch.Tensor:
        valid = target >= 0
        t = target.clamp(min=0).unsqueeze(1)
        sp = F.softplus(logits)
        neg = sp.sum(1)
        if bg != 1.0:
            neg = neg + (bg - 1.0) * sp[:, -1]
        del sp
        w_t = torch.where(t == logits.shape[1] - 1, bg, 1.0).to(logits.dtype)
        pos = (logits.gather(1, t) * w_t).squeeze(1)
        ctx.save_for_backward(logits, t, valid, w_t, n)
        ctx.bg = bg
        return ((neg - pos) * valid).sum() / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        logits, t, valid, w_t, n = ctx.saved_tensors
        scale = (valid.to(logits.dtype) * (grad / n)).unsqueeze(1)  # (B, 1, H, W)
        g = torch.sigmoid(logits)
        g.mul_(scale)
        if ctx.bg != 1.0:
            g[:, -1:].mul_(ctx.bg)
        g.scatter_add_(1, t, -(w_t * scale))
        return g, None, None, None


_BLUR = torch.tensor([1.0, 2.0, 1.0])
_BLUR = (_BLUR[:, None] * _BLUR[None, :] / 16).view(1, 1, 3, 3)  # 3x3 Gaussian, sigma ~0.85


def attention_losses(attention: torch.Tensor, vocab: Vocabulary, class_t: torch.Tensor,
                     obj_t: torch.Tensor, gamma: float = 0.3, tau: float = 0.05,
                     count: Count | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sep, L_enh), both scalars in [0, 1]: means over the ground-truth object instances.

    attention: (B, P + O + 1, g*g, g*g) stage-1 last-block attention (CLS dropped) for the
    conditions of `vocab`; class_t/obj_t: (B, S, S) targets from `build_targets`.
    `count` maps the local number of instances to the normalizer (see `PartCLIPSegLoss`); it
    is called exactly once on every path (it may be a collective).
    """
    count = count or (lambda x: x)
    b, _, n, _ = attention.shape
    g = int(round(n ** 0.5))
    k, p = vocab.num_classes, len(vocab.parts)
    class_part, class_object = vocab.class_parts, vocab.class_objects
    # Enumerate (image, object, part class) triples present in the ground truth: integer work.
    pair_img, pair_cls, pair_obj, pair_inst, inst_img, inst_obj = [], [], [], [], [], []
    for i in range(b):
        present = torch.unique(class_t[i]).tolist()
        by_obj: dict[int, list[int]] = {}
        for c in present:
            if 0 <= c < k:
                by_obj.setdefault(class_object[c], []).append(c)
        for o, classes in sorted(by_obj.items()):
            for c in classes:
                pair_img.append(i), pair_cls.append(c), pair_obj.append(o)
                pair_inst.append(len(inst_img))
            inst_img.append(i), inst_obj.append(o)
    zero = attention.sum() * 0
    if not pair_img:
        count(torch.zeros((), device=attention.device))
        return zero, zero
    dev = attention.device
    pi = torch.tensor(pair_img, device=dev)
    pc = torch.tensor(pair_cls, device=dev)
    po = torch.tensor(pair_obj, device=dev)
    # Masks at the g x g token grid, by area.
    part_masks = F.adaptive_avg_pool2d((class_t[pi] == pc[:, None, None]).float()[:, None], g)
    ii, io = torch.tensor(inst_img, device=dev), torch.tensor(inst_obj, device=dev)
    obj_masks = F.adaptive_avg_pool2d((obj_t[ii] == io[:, None, None]).float()[:, None], g)
    obj_masks = (obj_masks.flatten(1) >= 0.5).to(attention.dtype)  # (I, g*g)
    w = part_masks.flatten(1)
    w = w / w.sum(1, keepdim=True).clamp(min=1e-6)  # (n_pairs, g*g) query weights
    cp = torch.tensor([class_part[c] for c in pair_cls], device=dev)
    pooled = 0.5 * (torch.einsum("nq,nqk->nk", w, attention[pi, cp])
                    + torch.einsum("nq,nqk->nk", w, attention[pi, p + po]))
    maps = F.conv2d(pooled.view(-1, 1, g, g), _BLUR.to(pooled), padding=1).flatten(1)
    lo, hi = maps.min(1, keepdim=True).values, maps.max(1, keepdim=True).values
    maps = (maps - lo) / (hi - lo).clamp(min=1e-8)  # (n_pairs, g*g) in [0, 1]

    inst = torch.tensor(pair_inst, device=dev)
    inside = obj_masks[inst]  # (n_pairs, g*g)
    # Pad to (I, J, g*g) so the overlap probability is a loop over part slots, not classes.
    n_inst = len(inst_img)
    slot = torch.zeros_like(inst)
    counts: dict[int, int] = {}
    for j, s in enumerate(pair_inst):
        slot[j] = counts.get(s, 0)
        counts[s] = counts.get(s, 0) + 1
    claims = torch.zeros(n_inst, max(counts.values()), n, device=dev, dtype=maps.dtype)
    claims = claims.index_put((inst, slot), torch.sigmoid((maps - gamma) / tau) * inside)
    p0 = torch.ones(n_inst, n, device=dev, dtype=maps.dtype)
    p1 = torch.zeros_like(p0)
    for j in range(claims.shape[1]):
        s = claims[:, j]
        p1 = p1 * (1 - s) + p0 * s
        p0 = p0 * (1 - s)
    multi = (1 - p0 - p1).clamp(min=0)
    area = obj_masks.sum(1)
    keep = area > 0  # objects smaller than a token have no grid cells
    n_keep = count(keep.sum().to(maps.dtype))
    if not keep.any():
        return zero, zero
    n_keep = n_keep.clamp(min=1)
    l_sep = ((multi * obj_masks).sum(1)[keep] / area[keep]).sum() / n_keep

    peaks = (maps * inside).max(1).values  # (n_pairs,)
    weakest = torch.full((n_inst,), float("inf"), device=dev, dtype=maps.dtype)
    weakest = weakest.scatter_reduce(0, inst, peaks, reduce="amin")
    l_enh = (1 - weakest[keep]).sum() / n_keep
    return l_sep, l_enh


class PartCLIPSegLoss(torch.nn.Module):
    """Total loss and its parts for either model mode.

    forward(out, vocab, class_t, obj_t) -> (total scalar, {name: float}).

    `count` (optional) maps each local count a mean divides by (valid pixels, object
    instances) to its normalizer; the trainer sets it under DDP to the all-reduced count
    divided by the world size (see `Count`). The logged terms are then each rank's share.
    """

    def __init__(self, cfg: LossConfig = LossConfig(), count: Count | None = None):
        super().__init__()
        self.cfg = cfg
        self.count = count

    def forward(self, out: SegOutput, vocab: Vocabulary, class_t: torch.Tensor,
                obj_t: torch.Tensor, classes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """`classes`: the (K',) classes `out.logits` holds (stage 2 run for those only, see
        `stage2_classes`); every labelled class must be among them. None = all K."""
        c = self.cfg
        os_t = class_t
        if classes is not None:
            k = vocab.num_classes
            remap = torch.full((k + 1,), IGNORE, dtype=class_t.dtype, device=class_t.device)
            remap[classes] = torch.arange(len(classes), device=class_t.device)
            remap[k] = len(classes)  # background stays last
            os_t = torch.where(class_t >= 0, remap[class_t.clamp(min=0)], IGNORE)
            if bool(((os_t < 0) & (class_t >= 0)).any()):
                raise ValueError("stage-2 classes miss a labelled class (see stage2_classes)")
        allowed = None
        if c.kind == "softmax":
            # A pixel's classes compete within its object (all of them at background pixels).
            owner = torch.tensor(vocab.class_objects, device=class_t.device)
            if classes is not None:
                owner = owner[classes]
            where = obj_t.unsqueeze(1)
            allowed = (owner.view(1, -1, 1, 1) == where) | (where == len(vocab.objects))
        terms = {"os": self._term(out.logits, os_t, allowed, c.class_balance)}
        weights = {"os": c.os}
        if out.object_logits is not None:
            part_of = torch.tensor(vocab.class_parts + (len(vocab.parts),), device=class_t.device)
            part_t = torch.where(class_t >= 0, part_of[class_t.clamp(min=0)], IGNORE)
            terms["obj"] = self._term(out.object_logits, obj_t)
            terms["part"] = self._term(out.part_logits, part_t, balance=c.class_balance)
            weights.update(obj=c.obj, part=c.part)
            if out.attention is not None and (c.sep or c.enh):
                terms["sep"], terms["enh"] = attention_losses(
                    out.attention, vocab, class_t, obj_t, c.gamma, c.sep_temperature, self.count)
                weights.update(sep=c.sep, enh=c.enh)
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def _term(self, logits: torch.Tensor, target: torch.Tensor,
              allowed: torch.Tensor | None = None, balance: float = 0.0) -> torch.Tensor:
        """One classification term in the configured kind (`allowed`, `balance`: softmax only)."""
        c = self.cfg
        if c.kind == "softmax":
            return softmax_ce(logits, target, c.background_weight, allowed, self.count, balance)
        return weighted_bce(logits, target, c.background_weight, self.count)
