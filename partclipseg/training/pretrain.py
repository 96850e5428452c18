"""Vision-language pretraining of random-init CLIP towers on SynthParts' *seen* objects.

The paper's method starts from CLIP, whose towers already align image regions with words.
Random-init towers lack that alignment, and SynthParts training alone does not give it in the
demo's budget (docs/synthparts_recipe.md). This stage gives the towers a small version of it:
dense image-text contrastive training, each ViT token against the text tower's embeddings of
four name sets, with the token's share of each name's pixels as its target:

- the seen object names ("red bird", ...) and "background";
- the generalized part names ("head", "wing", ...) and "background";
- the colour words and the body-plan words of the seen names ("red", "bird") and "background".

Zero-shot rules (issue 15): images hold seen objects only, rendered from a stream of their own
(split "pretrain", disjoint from train and val), and no unseen object name is ever tokenized.
Only the two towers are written (float16, `torch.load(weights_only=True)`); a model config
points at them with `pretrained: <file>` and `clip_name: null`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.io import IGNORE_LABEL, atomic_write
from runtime.preprocess import preprocess

from ..config import ModelConfig
from ..data.synthparts import SYNTHPARTS_VOCABULARY, render_sample
from ..model.backbone import build_clip, resize_pos_embed, tokenize

__all__ = ["SETS", "PretrainConfig", "NameSets", "pretrain", "render_seen_set", "dense_tokens",
           "token_targets", "pretrain_loss"]

BACKGROUND_NAME = "background"
SETS = ("objects", "parts", "colours", "plans")


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    images: int = 4000  # rendered once, then flipped at random
    seed: int = 0
    sets: tuple[str, ...] = SETS  # the name sets contrasted (a subset of SETS)
    # Share of images shown in grey, which train only the colour-free sets (parts, plans): with
    # each colour missing one body plan, a tower shown only colour images reads the plan from
    # the colour and cannot name the plan of an unseen pair (docs/synthparts_recipe.md).
    grey: float = 0.0

    def __post_init__(self) -> None:
        if not self.sets or not set(self.sets) <= set(SETS):
            raise ValueError(f"sets must be a non-empty subset of {SETS}, got {self.sets}")
        if not 0.0 <= self.grey < 1.0:
            raise ValueError(f"grey must be in [0, 1), got {self.grey}")


@dataclass(frozen=True)
class NameSets:
    """The names each pretraining term contrasts, and per-object label lookups.

    objects/parts/colours/plans: name lists (seen only; "background" is appended by the loss).
    object_of, colour_of, plan_of: (16,) int64 maps from a SynthParts object index to its index
    in `objects` (-1 for unseen objects), `colours`, `plans`; part_of: (K,) class -> part index.
    """

    objects: tuple[str, ...]
    parts: tuple[str, ...]
    colours: tuple[str, ...]
    plans: tuple[str, ...]
    object_of: np.ndarray
    colour_of: np.ndarray
    plan_of: np.ndarray
    part_of: np.ndarray

    @classmethod
    def synthparts(cls) -> NameSets:
        v = SYNTHPARTS_VOCABULARY
        unseen = set(v.unseen_objects)
        seen = [o for o in v.objects if o not in unseen]
        colours = sorted({o.split(" ", 1)[0] for o in seen})
        plans = sorted({o.split(" ", 1)[1] for o in seen})
        used_parts = sorted({v.parts[p] for o, p in v.classes if v.objects[o] in seen},
                            key=v.parts.index)
        return cls(
            objects=tuple(seen), parts=tuple(used_parts), colours=tuple(colours),
            plans=tuple(plans),
            object_of=np.array([seen.index(o) if o in seen else -1 for o in v.objects]),
            colour_of=np.array([colours.index(o.split(" ", 1)[0]) for o in v.objects]),
            plan_of=np.array([plans.index(o.split(" ", 1)[1]) for o in v.objects]),
            part_of=np.array([used_parts.index(v.parts[p]) if v.parts[p] in used_parts else -1
                              for _, p in v.classes]))

    def names(self, key: str) -> tuple[str, ...]:
        return getattr(self, key)

    def lookup(self, key: str) -> torch.Tensor:
        """(16,) object -> name index, or (K,) class -> name index for "parts"."""
        return torch.from_numpy({"objects": self.object_of, "parts": self.part_of,
                                 "colours": self.colour_of, "plans": self.plan_of}[key])

    def all_names(self, sets: tuple[str, ...] = SETS) -> list[str]:
        """Every name the text tower sees in pretraining (each set's list, then background)."""
        return [n for key in sets for n in self.names(key)] + [BACKGROUND_NAME]


def render_seen_set(n: int, seed: int, size: int, names: NameSets,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """n SynthParts images holding 1-3 seen objects each (split "pretrain").

    Returns image (n, size, size, 3) uint8, part and obj (n, size, size) uint8 (255 = none).
    """
    seen = np.flatnonzero(names.object_of >= 0)
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    parts = np.empty((n, size, size), np.uint8)
    objs = np.empty((n, size, size), np.uint8)
    for i in tqdm(range(n), desc="render seen-only images", disable=not progress, leave=False):
        cats = rng.choice(seen, size=int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])))
        images[i], parts[i], objs[i] = render_sample(seed, "pretrain", i, size, objects=cats)
    if np.isin(objs, np.flatnonzero(names.object_of < 0)).any():  # the zero-shot rule, checked
        raise AssertionError("an unseen object was rendered into the pretraining set")
    return {"image": images, "part": parts, "obj": objs}


def dense_tokens(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ViT on (B, 3, S, S) CLIP-normalized images -> (B, g*g, E) projected patch
    tokens (g = S / patch), position embeddings resized as `TappedViT` resizes them."""
    x = visual.conv1(x)
    g = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + resize_pos_embed(visual.positional_embedding, g).to(x.dtype)
    x = visual.ln_post(visual.transformer(visual.ln_pre(x)))
    return x[:, 1:] @ visual.proj


def token_targets(labels: torch.Tensor, lookup: torch.Tensor, classes: int,
                  grid: int) -> torch.Tensor:
    """Each token's share of each name's pixels.

    labels: (B, S, S) int64 SynthParts indices (255 = none); lookup: maps an index to a name
    index (-1: no name, counted as background). Returns (B, g*g, classes + 1) float, rows
    summing to 1, background last.
    """
    idx = torch.full_like(labels, classes)
    valid = labels != IGNORE_LABEL
    named = lookup[labels[valid]]
    idx[valid] = torch.where(named >= 0, named, torch.full_like(named, classes))
    onehot = F.one_hot(idx, classes + 1).permute(0, 3, 1, 2).float()
    share = F.adaptive_avg_pool2d(onehot, grid)
    return share.flatten(2).transpose(1, 2)


def pretrain_loss(tokens: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                  targets: list[torch.Tensor], sizes: list[int],
                  weights: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Mean over the name sets of the soft cross-entropy of cosine logits.

    tokens (B, T, E); text (sum(sizes) + 1, E): each set's names, then background (shared);
    targets[i] (B, T, sizes[i] + 1); weights[i]: None or (B,) per-image weights of set i (0
    leaves an image out of that set's mean). Returns a scalar.
    """
    tokens = F.normalize(tokens, dim=-1)
    text = F.normalize(text, dim=-1)
    bg = text[-1:]
    losses, start = [], 0
    for i, (target, n) in enumerate(zip(targets, sizes)):
        logits = scale * tokens @ torch.cat([text[start:start + n], bg]).T
        per_image = -(target * logits.log_softmax(-1)).sum(-1).mean(-1)  # (B,)
        w = None if weights is None else weights[i]
        losses.append(per_image.mean() if w is None
                      else (per_image * w).sum() / w.sum().clamp(min=1e-6))
        start += n
    return torch.stack(losses).mean()


def pretrain(model_cfg: ModelConfig, cfg: PretrainConfig, out: str | Path,
             progress: bool = True) -> dict[str, Any]:
    """Pretrain `model_cfg`'s random towers; write them (float16) to `out` atomically.

    Returns a summary (steps, seconds, final loss, per-set token accuracy on held-out images).
    """
    torch.manual_seed(cfg.seed)
    names = NameSets.synthparts()
    size = model_cfg.image_size
    t0 = time.perf_counter()
    data = render_seen_set(cfg.images, cfg.seed, size, names, progress)
    held = render_seen_set(64, cfg.seed + 1, size, names, progress=False)
    clip = build_clip(model_cfg.replace(pretrained=None))
    clip.train()
    tokens = tokenize(names.all_names(cfg.sets), clip.context_length)
    sizes = [len(names.names(key)) for key in cfg.sets]
    lookups = [names.lookup(key) for key in cfg.sets]
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    rng = np.random.default_rng(cfg.seed)
    grid = size // model_cfg.patch_size
    loss_value = float("nan")

    def batch(d: dict[str, np.ndarray], idx: np.ndarray, flip: np.ndarray,
              grey: np.ndarray) -> tuple[Any, ...]:
        img, part, obj = d["image"][idx], d["part"][idx], d["obj"][idx]
        img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
        luma = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
        img = np.where(grey[:, None, None, None], (luma + 0.5).astype(np.uint8)[..., None], img)
        part = np.where(flip[:, None, None], part[:, :, ::-1], part)
        obj = np.where(flip[:, None, None], obj[:, :, ::-1], obj)
        x = torch.from_numpy(np.stack([preprocess(i, size) for i in img]))
        p, o = torch.from_numpy(part.astype(np.int64)), torch.from_numpy(obj.astype(np.int64))
        # parts through the class map, the other sets through the object map
        tg = [token_targets(p if key == "parts" else o, lookup, n, grid)
              for key, lookup, n in zip(cfg.sets, lookups, sizes)]
        coloured = torch.from_numpy(~grey).float()
        w = [coloured if key in ("objects", "colours") else None for key in cfg.sets]
        return x, tg, w

    bar = tqdm(range(cfg.steps), desc="pretrain towers", disable=not progress)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (
            1 + math.cos(math.pi * step / cfg.steps))
        for g in optim.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, cfg.images, cfg.batch_size)
        x, tg, w = batch(data, idx, rng.random(cfg.batch_size) < 0.5,
                         rng.random(cfg.batch_size) < cfg.grey)
        loss = pretrain_loss(dense_tokens(clip.visual, x), clip.encode_text(tokens),
                             clip.logit_scale.exp().clamp(max=100), tg, sizes, w)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optim.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()

    clip.eval()
    with torch.no_grad():
        x, tg, _ = batch(held, np.arange(64), np.zeros(64, bool), np.zeros(64, bool))
        tok = F.normalize(dense_tokens(clip.visual, x), dim=-1)
        text = F.normalize(clip.encode_text(tokens), dim=-1)
        acc, start = {}, 0
        for key, target, n in zip(cfg.sets, tg, sizes):
            pred = (tok @ torch.cat([text[start:start + n], text[-1:]]).T).argmax(-1)
            truth = target.argmax(-1)
            named = truth != n  # tokens mostly covered by a name: background would dominate
            acc[key] = round(float((pred == truth)[named].float().mean()), 4)
            start += n
    summary = {"config": asdict(cfg), "model": model_cfg.name, "seconds": round(
        time.perf_counter() - t0, 1), "final_loss": round(loss_value, 4),
        "held_out_named_token_accuracy": acc, "names": names.all_names(cfg.sets)}
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}
    atomic_write(Path(out), lambda f: torch.save(
        {"state_dict": state, "model_config": model_cfg.replace(pretrained=None).to_dict(),
         "pretrain": summary}, f))
    return summary
