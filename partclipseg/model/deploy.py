"""The deployable model (what export traces and the torch backend runs).

uint8 images + precomputed vocabulary vectors -> logits, or -> Pred-All label maps.

`DeployModel` wraps a trained `PartCLIPSeg` and declares its tensor interface once
(`input_specs`, `output_specs`, `mask_specs`: names, order, shapes and the vocabulary axis of
each, `runtime.bundle.TensorSpec`); export writes that description into the manifest and every
reader of the bundle follows it. The text tower, FiLM/FiLM' vectors and We [e_o ; e_p] are
computed once by `vocab_arrays` and enter the graph as inputs, so the vocabulary can change
without a rebuild. `vocab_arrays` runs the model's `TextHead`, which export also traces into the
bundle (`text_head.onnx`), so the runtime turns new names into these inputs with the model's
own code and the recipe it declares (`TextHead.recipe`), knowing no model kind. Normalization is inside the graph; every class-dependent size (P, O, K) is
read from the input tensors, so it stays dynamic in the exported graph.

Model kinds and their vocabulary inputs (all on the part, object and class axes):
  partclipseg   part FiLM (P), object FiLM (O + 1), class FiLM' (K), class_part, class_object
  clipseg       class FiLM (K + 1): one stage-1 condition per object-specific class
  colour_blind  as partclipseg, plus colour FiLM (O): SynthParts' recipe (an object is a colour
                word + a body-plan word) stays inside: object FiLM rows are each object's
                body-plan word, colour rows its colour word, and the graph sums their logits
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .partclipseg import Conditioning, PartCLIPSeg
from runtime import bundle as spec
from runtime.vocabulary import Vocabulary, recipe_feeds

__all__ = ["DeployModel", "TextHead", "TEXT_HEADS", "register_text_head", "text_head",
           "vocab_arrays", "example_inputs", "deploy_mode", "COLOUR_FILM", "CLASS_CHUNK"]

COLOUR_FILM = ("colour_film_mul", "colour_film_add")  # colour-blind models: per-object rows

# Fast graphs: stage-2 classes per chunk of the fused tail (peak class maps: B x 16 x S x S).
CLASS_CHUNK = 16


def deploy_mode(cfg: Any) -> str:
    """The bundle mode of a model config: the name of its graph interface and text head."""
    return "colour_blind" if cfg.colour_blind else cfg.mode


class DeployModel(nn.Module):
    """Image side of a PartCLIPSeg (or CLIPSeg baseline) with the bundle's tensor interface.

    forward(image, *vocab inputs in `input_specs()` order, *masks in `mask_specs()` order):
      image: (B, S, S, 3) uint8 or float32, RGB, 0-255, already resized to S x S.
    Returns `logits` (B, K + 1, S, S) and, for partclipseg, `object_logits` (B, O + 1, S, S);
    float32 logits (sigmoid gives probabilities), background last.
    With `labels=True` it returns only `labels` (B, S, S) int32: the Pred-All label map at model
    resolution (-1 = background), so a GPU never copies the per-class maps back to the host.

    With `slots=True` (label maps only) the vocabulary comes as fixed-size slot arrays plus
    validity masks, the last inputs (`mask_specs`): `object_valid` (O_max + 1,) bool over the
    object rows (background last, always valid; clipseg: the class rows) and `class_valid`
    (K_max,) bool (stage-2 models). Invalid slots get -inf before every argmax, so a padded
    slot never wins; exported with every dimension static (the fast graph).
    """

    def __init__(self, model: PartCLIPSeg, mean: tuple[float, ...], std: tuple[float, ...],
                 labels: bool = False, slots: bool = False):
        super().__init__()
        if slots and not labels:
            raise ValueError("slot graphs give label maps: use labels=True with slots=True")
        self.model = model.eval()
        self.mode = deploy_mode(model.cfg)
        self.labels = labels
        self.slots = slots
        # Folded into one multiply-add: x * scale + shift == (x / 255 - mean) / std.
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean) / std_t)

    # -- the interface: what export writes into the manifest ----------------------------------
    def input_specs(self, image_dtype: str = "uint8") -> dict[str, spec.TensorSpec]:
        """{name: TensorSpec} of the graph inputs, in forward order (masks not included)."""
        size, d = self.model.cfg.image_size, self.model.cfg.reduce_dim
        film = lambda rows, bg=False: spec.TensorSpec.over(rows, (d,), background=bg)  # noqa
        specs = {spec.IMAGE: spec.TensorSpec(("B", size, size, 3), image_dtype)}
        if self.mode == "clipseg":  # one stage-1 condition per class, background last
            return {**specs, **{n: film("class", True) for n in spec.OBJECT_FILM}}
        specs.update({n: film("part") for n in spec.PART_FILM})
        specs.update({n: film("object", True) for n in spec.OBJECT_FILM})
        if self.mode == "colour_blind":
            specs.update({n: film("object") for n in COLOUR_FILM})
        specs.update({n: film("class") for n in spec.CLASS_FILM})
        specs[spec.CLASS_INDEX[0]] = spec.TensorSpec.over("class", dtype="int64", indexes="part")
        specs[spec.CLASS_INDEX[1]] = spec.TensorSpec.over("class", dtype="int64",
                                                          indexes="object")
        return specs

    def output_specs(self) -> dict[str, spec.TensorSpec]:
        """{name: TensorSpec} of the graph outputs, in forward order."""
        size = self.model.cfg.image_size
        if self.labels:
            return {spec.LABELS: spec.TensorSpec(("B", size, size), "int32")}
        out = {spec.LOGITS: spec.TensorSpec.over("class", (size, size), background=True,
                                                 batch=True)}
        if self.mode != "clipseg":
            out[spec.OBJECT_LOGITS] = spec.TensorSpec.over("object", (size, size),
                                                           background=True, batch=True)
        return out

    def mask_specs(self) -> dict[str, spec.TensorSpec]:
        """{name: TensorSpec} of a slot graph's validity masks (bool), after the inputs."""
        if self.mode == "clipseg":
            return {spec.OBJECT_VALID: spec.TensorSpec.over("class", dtype="bool",
                                                            background=True)}
        return {spec.OBJECT_VALID: spec.TensorSpec.over("object", dtype="bool", background=True),
                spec.CLASS_VALID: spec.TensorSpec.over("class", dtype="bool")}

    def forward(self, image: torch.Tensor, *vocab: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.stages(image, *vocab)

    def stages(self, image: torch.Tensor, *vocab: torch.Tensor,
               mark: Callable[[str], None] = lambda stage: None) -> tuple[torch.Tensor, ...]:
        """`forward`, calling `mark(stage)` after each stage ("normalize", "vit",
        "stage1_decoder", "stage2_mix_film", "heads"): the GPU profile's timing points."""
        m = self.model
        valid: tuple[torch.Tensor, ...] = ()
        if self.slots:  # the validity masks follow the vocabulary arrays
            n_masks = len(self.mask_specs())
            vocab, valid = vocab[:-n_masks], vocab[-n_masks:]
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
        if self.mode == "colour_blind":  # per object: a colour row and a body-plan row
            (part_mul, part_add, obj_mul, obj_add, colour_mul, colour_add,
             cls_mul, cls_add, class_part, class_object) = vocab
            cond = Conditioning(torch.cat([part_mul, colour_mul, obj_mul]),
                                torch.cat([part_add, colour_add, obj_add]), part_mul.shape[0], 0,
                                num_colour=colour_mul.shape[0])
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


# -- the text head: names -> the graph's vocabulary inputs -------------------------------------
TEXT_HEADS: dict[str, type["TextHead"]] = {}


def register_text_head(name: str) -> Callable[[type], type]:
    """Class decorator: the text head of models whose `deploy_mode` (or `cfg.text_head`) is
    `name`. A new model kind registers its head here; the runtime needs no change."""
    def add(cls: type) -> type:
        TEXT_HEADS[name] = cls
        return cls
    return add


def text_head(model: PartCLIPSeg) -> "TextHead":
    """The registered text head of `model`: `cfg.text_head` when set, else its `deploy_mode`."""
    name = getattr(model.cfg, "text_head", None) or deploy_mode(model.cfg)
    if name not in TEXT_HEADS:
        raise ValueError(f"no text head registered as {name!r} (known: {sorted(TEXT_HEADS)})")
    return TEXT_HEADS[name](model)


class TextHead(nn.Module):
    """The text-only layers of a model as export traces them (`text_head.onnx`).

    `recipe`: {input: rule} in forward order, how each input is made from a vocabulary
    (`runtime.vocabulary.recipe_feeds` lists the rules): text features (N, E) float32 of a list
    of names, or an int64 index array. forward(*inputs) -> {image graph vocabulary input: array},
    every vocabulary input `DeployModel.input_specs` declares, with its rows and dtype. Input
    names differ from output names (an ONNX graph cannot have both).
    """

    recipe: dict[str, dict[str, Any]] = {}

    def __init__(self, model: PartCLIPSeg):
        super().__init__()
        self.model = model.eval()

    def outputs(self) -> list[str]:
        """The image graph's vocabulary inputs, in its order: what forward returns."""
        return [n for n in DeployModel(self.model, (0.0,) * 3, (1.0,) * 3).input_specs()
                if n != spec.IMAGE]

    def inputs(self, vocab: Vocabulary) -> list[torch.Tensor]:
        """`vocab` through the recipe: the forward arguments, the names encoded by the model's
        own text tower (as the runtime encodes them with the exported one)."""
        texts, indices = recipe_feeds(vocab, self.recipe)
        device = self.model.background.device
        return [self.model.encode_names(texts[k]) if k in texts
                else torch.from_numpy(indices[k]).to(device) for k in self.recipe]

    def background(self) -> torch.Tensor:
        return self.model.background


@register_text_head("clipseg")
class ClassesHead(TextHead):
    """CLIPSeg: one stage-1 condition per object-specific class name, background last."""

    recipe = {"class_text": {"text": "class"}}

    def forward(self, class_text: torch.Tensor) -> dict[str, torch.Tensor]:
        mul, add = self.model.film.vectors(torch.cat([class_text, self.background()]))
        return {spec.OBJECT_FILM[0]: mul, spec.OBJECT_FILM[1]: add}


@register_text_head("partclipseg")
class PartsObjectsHead(TextHead):
    """PartCLIPSeg: generalized parts and objects (stage 1), then each class's embedding
    We [e_object ; e_part] through FiLM' (stage 2); `PartCLIPSeg.encode_vocabulary`'s
    arithmetic on the deployed layout."""

    recipe = {"part_text": {"text": "part"}, "object_text": {"text": "object"},
              "part_of_class": {"index": "class", "of": "part"},
              "object_of_class": {"index": "class", "of": "object"}}

    def stage2(self, e_obj: torch.Tensor, e_part: torch.Tensor, class_part: torch.Tensor,
               class_object: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class FiLM' rows and the index arrays, from per-object and per-part embeddings."""
        e_k = self.model.embed_mix(torch.cat([e_obj[class_object], e_part[class_part]], dim=1))
        mul, add = self.model.film2.vectors(e_k)
        return {spec.CLASS_FILM[0]: mul, spec.CLASS_FILM[1]: add,
                spec.CLASS_INDEX[0]: class_part, spec.CLASS_INDEX[1]: class_object}

    def forward(self, part_text: torch.Tensor, object_text: torch.Tensor,
                class_part: torch.Tensor, class_object: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        film = self.model.film
        part_mul, part_add = film.vectors(part_text)
        obj_mul, obj_add = film.vectors(torch.cat([object_text, self.background()]))
        return {spec.PART_FILM[0]: part_mul, spec.PART_FILM[1]: part_add,
                spec.OBJECT_FILM[0]: obj_mul, spec.OBJECT_FILM[1]: obj_add,
                **self.stage2(object_text, part_text, class_part, class_object)}


@register_text_head("colour_blind")
class ObjectWordsHead(PartsObjectsHead):
    """SynthParts' colour-blind recipe: an object name is a colour word and a body-plan word
    (its first word and the rest); per object one colour row and one body-plan row (object
    FiLM, background last), and its embedding is the mean of its words'."""

    recipe = {"part_text": {"text": "part"},
              "colour_text": {"text": "object", "piece": 0},
              "plan_text": {"text": "object", "piece": 1},
              "object_colour": {"index": "object", "piece": 0},
              "object_plan": {"index": "object", "piece": 1},
              "part_of_class": {"index": "class", "of": "part"},
              "object_of_class": {"index": "class", "of": "object"}}

    def forward(self, part_text: torch.Tensor, colour_text: torch.Tensor,
                plan_text: torch.Tensor, object_colour: torch.Tensor, object_plan: torch.Tensor,
                class_part: torch.Tensor, class_object: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        film = self.model.film
        part_mul, part_add = film.vectors(part_text)
        colour_mul, colour_add = film.vectors(colour_text[object_colour])
        plan = torch.cat([plan_text[object_plan], self.background()])
        plan_mul, plan_add = film.vectors(plan)
        e_obj = (colour_text[object_colour] + plan_text[object_plan]) / 2
        return {spec.PART_FILM[0]: part_mul, spec.PART_FILM[1]: part_add,
                spec.OBJECT_FILM[0]: plan_mul, spec.OBJECT_FILM[1]: plan_add,
                COLOUR_FILM[0]: colour_mul, COLOUR_FILM[1]: colour_add,
                **self.stage2(e_obj, part_text, class_part, class_object)}


@torch.no_grad()
def vocab_arrays(model: PartCLIPSeg, vocab: Vocabulary) -> dict[str, np.ndarray]:
    """Everything that depends only on text, as the graph's vocabulary inputs: the model's
    `TextHead` on `vocab`. {name: array} for `DeployModel.input_specs()` minus the image:
    float32 (rows, D) FiLM vectors and int64 (K,) index vectors (runtime.bundle: the layout)."""
    was_training = model.training
    head = text_head(model)
    try:
        out = head(*head.inputs(vocab))
    finally:
        model.train(was_training)
    return {k: np.ascontiguousarray(out[k].detach().cpu().numpy().astype(
        np.int64 if not out[k].is_floating_point() else np.float32)) for k in head.outputs()}


def example_inputs(size: int, arrays: dict[str, np.ndarray], batch: int = 1, seed: int = 0,
                   dtype: str = "uint8") -> dict[str, np.ndarray]:
    """Random images (B, S, S, 3) plus the vocabulary arrays, keyed by graph input name."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return {spec.IMAGE: image.astype(dtype), **arrays}

