"""The deployable model (what export traces and the torch backend runs).

uint8 images + precomputed vocabulary vectors -> logits, or -> Pred-All label maps.

`DeployModel` wraps a trained `PartCLIPSeg` with the tensor interface of `runtime.bundle`
(names, order, shapes): the text tower, FiLM/FiLM' vectors and We [e_o ; e_p] are computed once
by `vocab_arrays` and enter the graph as inputs, so the vocabulary can change without a
rebuild. Normalization is inside the graph; every class-dependent size (P, O, K) is read from
the input tensors, so it stays dynamic in the exported graph.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .partclipseg import Conditioning, PartCLIPSeg
from runtime import bundle as spec
from runtime.vocabulary import Vocabulary

__all__ = ["DeployModel", "vocab_arrays", "example_inputs", "deploy_mode", "CLASS_CHUNK"]

# Fast graphs: stage-2 classes per chunk of the fused tail (peak class maps: B x 16 x S x S).
CLASS_CHUNK = 16


def deploy_mode(cfg: Any) -> str:
    """The bundle mode of a model config (`runtime.bundle.MODES`): its graph interface."""
    return "colour_blind" if cfg.colour_blind else cfg.mode


class DeployModel(nn.Module):
    """Image side of a PartCLIPSeg (or CLIPSeg baseline) with the bundle's tensor interface.

    forward(image, *vocab inputs in `runtime.bundle.inputs_for_mode(mode)` order):
      image: (B, S, S, 3) uint8 or float32, RGB, 0-255, already resized to S x S.
    Returns `logits` (B, K + 1, S, S) and, for partclipseg, `object_logits` (B, O + 1, S, S);
    float32 logits (sigmoid gives probabilities), background last.
    With `labels=True` it returns only `labels` (B, S, S) int32: the Pred-All label map at model
    resolution (-1 = background), so a GPU never copies the per-class maps back to the host.

    With `slots=True` (label maps only) the vocabulary comes as fixed-size slot arrays plus
    validity masks, the last inputs (`runtime.bundle.SLOT_MASKS`): `object_valid` (O_max + 1,)
    bool over the object rows (background last, always valid; clipseg: the class rows) and
    `class_valid` (K_max,) bool (partclipseg). Invalid slots get -inf before every argmax, so
    a padded slot never wins; exported with every dimension static (the fast graph).
    """

    def __init__(self, model: PartCLIPSeg, mean: tuple[float, ...], std: tuple[float, ...],
                 labels: bool = False, slots: bool = False):
        super().__init__()
        if slots and not labels:
            raise ValueError("slot graphs give label maps: use labels=True with slots=True")
        self.model = model.eval()
        self.mode = deploy_mode(model.cfg)
        if slots and self.mode == "colour_blind":
            raise ValueError("fast slot graphs are not built for colour-blind models")
        self.labels = labels
        self.slots = slots
        # Folded into one multiply-add: x * scale + shift == (x / 255 - mean) / std.
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean) / std_t)

    def forward(self, image: torch.Tensor, *vocab: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.stages(image, *vocab)

    def stages(self, image: torch.Tensor, *vocab: torch.Tensor,
               mark: Callable[[str], None] = lambda stage: None) -> tuple[torch.Tensor, ...]:
        """`forward`, calling `mark(stage)` after each stage ("normalize", "vit",
        "stage1_decoder", "stage2_mix_film", "heads"): the GPU profile's timing points."""
        m = self.model
        valid: tuple[torch.Tensor, ...] = ()
        if self.slots:  # the validity masks follow the vocabulary arrays
            vocab, valid = vocab[:-len(spec.slot_masks(self.mode))], \
                vocab[-len(spec.slot_masks(self.mode)):]
        mark("start")
        # Cast before the transpose: TensorRT transposes no uint8 tensors.
        # (In the model's precision: a .half() DeployModel normalizes in FP16.)
        x = (image.to(self.scale.dtype) * self.scale + self.shift).permute(0, 3, 1, 2)
        mark("normalize")
        if self.mode == "clipseg":
            image_feats = m.image_features(x)
            mark("vit")
            mul, add = vocab
            cond = _conditioning(mul, add)
            feats, _ = m.decode_stage1(image_feats, cond)
            logits = m.mask_logits(m.head, feats, image_feats)
            if self.slots:
                logits = _mask_rows(logits, valid[0])
            return (_labels(logits),) if self.labels else (logits,)
        if self.mode == "colour_blind":
            (part_mul, part_add, obj_mul, obj_add, colour_mul, colour_add, object_words,
             cls_mul, cls_add, class_part, class_object) = vocab
            cond = Conditioning(torch.cat([part_mul, colour_mul, obj_mul]),
                                torch.cat([part_add, colour_add, obj_add]), part_mul.shape[0], 0,
                                num_colour=colour_mul.shape[0], object_words=object_words)
        else:
            part_mul, part_add, obj_mul, obj_add, cls_mul, cls_add, class_part, class_object = vocab
            cond = Conditioning(torch.cat([part_mul, obj_mul]), torch.cat([part_add, obj_add]),
                                part_mul.shape[0], 0)
        s1 = m.stage1(x, cond, part_logits=False, mark=mark)  # parts: not deployed
        mark("stage1_decoder")
        class_feats = m.stage2_from(s1.part_feats, s1.object_feats, class_part, class_object,
                                    cls_mul, cls_add)
        mark("stage2_mix_film")
        object_logits, image_feats = s1.object_logits, s1.image
        if self.slots:
            object_valid, class_valid = valid
            object_logits = _mask_rows(object_logits, object_valid)
            labels = self._chunked_labels(class_feats, image_feats, object_logits, class_object,
                                          class_valid)
            mark("heads")
            return (labels,)
        logits = torch.cat([m.mask_logits(m.head2, class_feats, image_feats),
                            object_logits[:, -1:]], 1)
        mark("heads")
        if self.labels:
            return (_labels(logits, object_logits, class_object),)
        return logits, object_logits


    def _chunked_labels(self, class_feats: torch.Tensor, image_feats: Any,
                        object_logits: torch.Tensor, class_object: torch.Tensor,
                        class_valid: torch.Tensor) -> torch.Tensor:
        """Pred-All labels (B, S, S) int32 without the (B, K, S, S) class maps: stage 2's head
        runs on `CLASS_CHUNK` classes at a time, each chunk reduced at once to its best gated
        logit and class, kept where it beats the chunks before it. At most (B, CLASS_CHUNK, S, S)
        class logits exist at a time (static slots: the loop unrolls in the exported graph).

        The same labels as `_labels` on the whole map, ties included: argmax takes the first
        maximum, a later chunk replaces the running best only when strictly greater, and
        background (last in `_labels`) wins only when strictly above the best class.
        """
        m, k = self.model, class_feats.shape[1]
        winner = object_logits.argmax(1, keepdim=True)  # (B, 1, S, S); O = background
        background = object_logits[:, -1]
        best = torch.full_like(background, -torch.inf)
        best_class = torch.zeros(background.shape, dtype=torch.int64,
                                 device=background.device)
        for start in range(0, k, CLASS_CHUNK):
            end = min(k, start + CLASS_CHUNK)
            logits = m.mask_logits(m.head2, class_feats[:, start:end], image_feats)
            keep = ((class_object[start:end].reshape(1, -1, 1, 1) == winner)
                    & class_valid[start:end].reshape(1, -1, 1, 1))
            chunk_best, chunk_class = torch.where(keep, logits, -torch.inf).max(1)
            better = chunk_best > best
            best = torch.where(better, chunk_best, best)
            best_class = torch.where(better, chunk_class + start, best_class)
        labels = torch.where(background > best, torch.full_like(best_class, -1), best_class)
        return labels.to(torch.int32)


def _mask_rows(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, R, S, S) logits with the rows where `valid` (R,) is False set to -inf."""
    return torch.where(valid.reshape(1, -1, 1, 1), logits,
                       torch.full_like(logits[:, :1], -torch.inf))


def _labels(logits: torch.Tensor, object_logits: torch.Tensor | None = None,
            class_object: torch.Tensor | None = None) -> torch.Tensor:
    """Pred-All at model resolution, as `runtime.postprocess.pred_all` without the resize.

    logits (B, K + 1, S, S), object_logits (B, O + 1, S, S) -> (B, S, S) int32, -1 background.
    """
    k = logits.shape[1] - 1
    if object_logits is not None:
        winner = object_logits.argmax(1, keepdim=True)  # (B, 1, S, S), O = background
        gate = class_object.reshape(1, -1, 1, 1) == winner
        classes = torch.where(gate, logits[:, :-1], torch.full_like(logits[:, :1], -torch.inf))
        logits = torch.cat([classes, logits[:, -1:]], 1)
    win = logits.argmax(1).to(torch.int32)
    return torch.where(win == k, torch.full_like(win, -1), win)


def _conditioning(mul: torch.Tensor, add: torch.Tensor) -> Conditioning:
    # num_parts/num_objects are unused by decode_stage1; shapes come from the tensors.
    return Conditioning(mul, add, num_parts=0, num_objects=0)


@torch.no_grad()
def vocab_arrays(model: PartCLIPSeg, vocab: Vocabulary) -> dict[str, np.ndarray]:
    """Everything that depends only on text, as the graph's vocabulary inputs.

    Returns {name: array} for `runtime.bundle.inputs_for_mode(mode)[1:]`: float32 (rows, D)
    FiLM vectors and int64 (K,) index vectors (see runtime.bundle for the layout).
    """
    was_training = model.training
    model.eval()
    cond = model.encode_vocabulary(vocab)
    model.train(was_training)
    f = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    if model.cfg.mode == "clipseg":
        return {spec.OBJECT_FILM[0]: f(cond.film1_mul), spec.OBJECT_FILM[1]: f(cond.film1_add)}
    p, c = cond.num_parts, cond.num_colour  # rows: [parts, colour words (if any), objects, bg]
    words = {}
    if cond.object_words is not None:
        words = {spec.COLOUR_FILM[0]: f(cond.film1_mul[p:p + c]),
                 spec.COLOUR_FILM[1]: f(cond.film1_add[p:p + c]),
                 spec.OBJECT_WORDS: f(cond.object_words)}
    return {
        spec.PART_FILM[0]: f(cond.film1_mul[:p]), spec.PART_FILM[1]: f(cond.film1_add[:p]),
        spec.OBJECT_FILM[0]: f(cond.film1_mul[p + c:]),
        spec.OBJECT_FILM[1]: f(cond.film1_add[p + c:]), **words,
        spec.CLASS_FILM[0]: f(cond.film2_mul), spec.CLASS_FILM[1]: f(cond.film2_add),
        spec.CLASS_INDEX[0]: cond.class_part.cpu().numpy().astype(np.int64),
        spec.CLASS_INDEX[1]: cond.class_object.cpu().numpy().astype(np.int64),
    }


def example_inputs(size: int, arrays: dict[str, np.ndarray], batch: int = 1, seed: int = 0,
                   dtype: str = "uint8") -> dict[str, np.ndarray]:
    """Random images (B, S, S, 3) plus the vocabulary arrays, keyed by graph input name."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return {spec.IMAGE: image.astype(dtype), **arrays}

