"""PartCLIPSeg: open-vocabulary part segmentation with generalized parts and object context.

Read top to bottom:
  1. text side (`encode_vocabulary`): plain part and object names -> CLIP text features ->
     FiLM vectors for stage 1, and for every object-specific class k = (o, p) the stage-2 vector
     e_k = We [e_o ; e_p] -> FiLM' vectors. Depends on the vocabulary only: deployment
     precomputes it (the `Conditioning`).
  2. image side (`forward_image`): CLIP ViT taps after blocks 3/6/9 -> adapters
     (`image_features`) -> CLIPSeg decoder run once per stage-1 condition, all conditions as
     one batch (`decode_stage1`) -> head H gives a logit map per generalized part, per object
     and for background (`mask_logits`).
  3. stage 2 (`stage2_from`): for each class k, G_k = Mix([F_p ; F_o]) -> FiLM'_{e_k} -> head
     H' -> logit T_k.
     Mix is the paper's per-pixel Linear 2D -> D (`mix: "linear"`) or the released code's MLP
     Linear 2D -> D, ReLU, Linear D -> D (`mix: "mlp"`).

`mode="clipseg"` is the baseline: stage 1 only, conditioned on object-specific names.
`colour_blind` (SynthParts' recipe, `ModelConfig.colour_blind`): the object conditions are the
words of the object names (a colour word, a body-plan word); parts and body-plan words are
decoded from the grey image, colour words from the colour image, and an object's logit is the
sum of its words' logits, its stage-2 features and embedding the mean of its words'.
`conv_branch` > 0 (random-init models only, e.g. `tiny`) adds a small convolutional encoder
beside the ViT whose features enter the decoder's tokens and both mask heads (`ConvBranch`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from runtime.io import CLIP_MEAN, CLIP_STD
from runtime.vocabulary import Vocabulary, name_pieces

from ..config import ModelConfig
from .backbone import TappedViT, TextEncoder, build_clip, tokenize, with_pretrained_activation
from .decoder import Adapter, ConvBranch, DecoderBlock, FiLM, MaskHead

__all__ = ["PartCLIPSeg", "Conditioning", "ObjectWords", "SegOutput", "ImageFeatures", "Stage1",
           "grey_matrix"]

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)


def grey_matrix(mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 3) weight and (3,) bias mapping a normalized RGB pixel to its luma in all three
    channels, normalized again: grey(x)_c = sum_j W[c, j] x_j + b_c. A 1 x 1 convolution, so the
    grey image costs nothing next to the second ViT pass."""
    mean_t, std_t, luma = (torch.tensor(v, dtype=torch.float64) for v in (mean, std, LUMA))
    # luma of the unnormalized pixel: sum_j l_j (x_j std_j + mean_j)
    weight = (luma * std_t).expand(3, 3) / std_t[:, None]
    bias = ((luma * mean_t).sum() - mean_t) / std_t
    return weight.float(), bias.float()


@dataclass(frozen=True)
class ObjectWords:
    """Object names as a colour word plus a body-plan word ("green quadruped"): the conditions of
    the colour-blind object head (`ModelConfig.colour_blind`, SynthParts' recipe). The split is
    `runtime.vocabulary.name_pieces`, the one the exported text head's recipe declares.

    colours, plans: the distinct words, in order of first appearance; the head's word rows are
        `words` = colours + plans (C + W_p of them).
    of_object: per object, (index into colours, index into plans).
    """

    colours: tuple[str, ...]
    plans: tuple[str, ...]
    of_object: tuple[tuple[int, int], ...]

    @classmethod
    def split(cls, objects: Sequence[str]) -> "ObjectWords":
        """Split each object name at its first space: colour word, then the body plan."""
        (colours, plans), (colour_rows, plan_rows) = name_pieces(objects, "object")
        return cls(colours, plans, tuple(zip(colour_rows, plan_rows)))

    @property
    def words(self) -> tuple[str, ...]:
        return self.colours + self.plans

    def matrix(self) -> list[list[float]]:
        """(O, C + W_p) 0/1 rows: object o's logit is the sum of its two words' logits."""
        n = len(self.colours)
        rows = []
        for c, p in self.of_object:
            row = [0.0] * (n + len(self.plans))
            row[c] = row[n + p] = 1.0
            rows.append(row)
        return rows


@dataclass
class Conditioning:
    """Vocabulary-dependent inputs of the image side (D = decoder width, E = text width).

    Stage-1 conditions are ordered [P generalized parts, O objects, background]
    (partclipseg) or [K object-specific classes, background] (clipseg, P = 0, O = K). A
    colour-blind model's object rows are words: [P parts, C colour words, W_p body-plan words,
    background], num_objects = C + W_p, and `object_words` maps objects to them; or, as
    deployed (`object_words` None), one colour row and one body-plan row per object:
    [P parts, O colour rows, O body-plan rows, background], num_colour = O.

    film1_mul, film1_add: (P + O + 1, D) float.
    film2_mul, film2_add: (K, D) float, stage-2 FiLM' vectors (None for clipseg).
    class_part: (K,) int64 index of each class's part in [0, P) (None for clipseg).
    class_object: (K,) int64 index of each class's object in [0, O) (None for clipseg).
    num_colour: C, the colour rows (colour-blind only; 0 otherwise).
    object_words: (O, C + W_p) float 0/1, each object's two words (colour-blind word rows only).
    """

    film1_mul: torch.Tensor
    film1_add: torch.Tensor
    num_parts: int
    num_objects: int
    film2_mul: torch.Tensor | None = None
    film2_add: torch.Tensor | None = None
    class_part: torch.Tensor | None = None
    class_object: torch.Tensor | None = None
    num_colour: int = 0
    object_words: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Conditioning":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Conditioning(move(self.film1_mul), move(self.film1_add), self.num_parts,
                            self.num_objects, move(self.film2_mul), move(self.film2_add),
                            move(self.class_part), move(self.class_object), self.num_colour,
                            move(self.object_words))


@dataclass
class ImageFeatures:
    """The vocabulary-independent image side.

    taps: adapted ViT activations, deep to shallow, each (B, 1 + g*g, W).
    high_res: (B, D/2, S/4, S/4) stride-4 features for the mask heads, or None.
    grid: (B, g*g, D) features added to the decoder's first input tokens, or None.
    (Both from the convolutional branch, `ModelConfig.conv_branch`; None when it is off.)
    """

    taps: list[torch.Tensor]
    high_res: torch.Tensor | None = None
    grid: torch.Tensor | None = None


@dataclass
class SegOutput:
    """Logits at model resolution S (sigmoid gives per-class probabilities).

    logits: (B, K + 1, S, S) object-specific classes, then background.
    object_logits: (B, O + 1, S, S) objects, then background (None for clipseg).
    part_logits: (B, P + 1, S, S) generalized parts, then background (None for clipseg).
    attention: (B, P + O + 1, g*g, g*g) last stage-1 block self-attention, head-averaged,
        CLS dropped (rows are probabilities over all g*g+1 keys), only when requested.
    """

    logits: torch.Tensor
    object_logits: torch.Tensor | None = None
    part_logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None


@dataclass
class Stage1:
    """What stage 2 and the object head need from stage 1 (partclipseg mode).

    image: the image features stage 2's head H' reads (a colour-blind model: the grey image's).
    part_feats: (B, P, g, g, D); object_feats: (B, O, g, g, D) decoder features.
    object_logits: (B, O + 1, S, S) objects, then background.
    part_logits: (B, P + 1, S, S) generalized parts, then background; only on request.
    attention: (B, P + O + 1, g*g, g*g) as `SegOutput.attention`; only on request.
    """

    image: ImageFeatures
    part_feats: torch.Tensor
    object_feats: torch.Tensor
    object_logits: torch.Tensor
    part_logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def _mix_rows(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(O, W) weights x (B, W, ...) per-row tensors -> (B, O, ...): one MatMul in a graph."""
    b, w = rows.shape[:2]
    return (weights @ rows.reshape(b, w, -1)).reshape(b, weights.shape[0], *rows.shape[2:])


class PartCLIPSeg(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = with_pretrained_activation(cfg)  # recorded, so checkpoints rebuild the same net
        self.cfg = cfg
        clip = build_clip(cfg)
        width, dim, emb = cfg.vision_width, cfg.reduce_dim, cfg.embed_dim
        self.vit = TappedViT(clip.visual, cfg)
        self.text = TextEncoder(clip)
        n_taps = len(cfg.extract_layers)
        self.adapters = nn.ModuleList(
            Adapter(width, cfg.adapter_hidden, cfg.adapter_ratio, cfg.adapter_out_relu)
            for _ in range(n_taps)
        ) if cfg.adapters else None
        self.background = nn.Parameter(torch.randn(1, emb) * 0.02)
        # Stage 1 (CLIPSeg decoder); reduces/blocks are ordered deep to shallow.
        self.film = FiLM(emb, dim)
        self.reduces = nn.ModuleList(nn.Linear(width, dim) for _ in range(n_taps))
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.decoder_act)
            for _ in range(n_taps))
        patch = cfg.patch_size
        self.head = MaskHead(dim, patch, bool(cfg.conv_branch))
        self.conv_branch = ConvBranch(cfg.conv_branch, dim, patch) if cfg.conv_branch else None
        if cfg.mode == "partclipseg":
            # Stage 2. Mix and We start as averages of their two inputs (our choice: stage 2
            # then starts from stage-1 features), FiLM' and H' as copies of FiLM and H.
            if cfg.mix == "linear":
                self.mix = nn.Linear(2 * dim, dim)
            else:
                self.mix = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
            self.embed_mix = nn.Linear(2 * emb, emb)
            with torch.no_grad():
                first = self.mix if cfg.mix == "linear" else self.mix[0]
                for lin, d in ((first, dim), (self.embed_mix, emb)):
                    lin.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1) / 2)
                    lin.bias.zero_()
                if cfg.mix == "mlp":
                    # The MLP starts as the same average: ReLU(avg + c) - c == avg wherever
                    # avg > -c. Stage-1 features are LayerNorm outputs; with unit gain and zero
                    # shift (the init) every element of a D-vector lies within +-sqrt(D - 1),
                    # so with c = sqrt(D) the MLP equals the linear Mix's init (up to float
                    # rounding) with every hidden unit active, so gradients reach all of them;
                    # training then moves the biases to where the ReLU bends. (Plain
                    # ReLU(avg) would start by zeroing about half of every feature.)
                    shift = float(dim) ** 0.5
                    self.mix[0].bias.fill_(shift)
                    self.mix[2].weight.copy_(torch.eye(dim))
                    self.mix[2].bias.fill_(-shift)
            self.film2 = copy.deepcopy(self.film)
            self.head2 = copy.deepcopy(self.head)
        if cfg.head_prior is not None:
            with torch.no_grad():
                for head in (self.head, getattr(self, "head2", None)):
                    if head is not None:
                        head.up2.bias.fill_(math.log(cfg.head_prior / (1 - cfg.head_prior)))
        if cfg.colour_blind:
            weight, bias = grey_matrix()
            self.register_buffer("grey_weight", weight, persistent=False)
            self.register_buffer("grey_bias", bias, persistent=False)
        self._freeze_clip()

    # -- parameters ----------------------------------------------------------------------------
    def _freeze_clip(self) -> None:
        """Trainable: adapters, text token/position embeddings, FiLMs, decoder, background
        (and the image tower with `train_vision`, the whole text tower with `train_text`)."""
        for p in self.vit.parameters():
            p.requires_grad_(self.cfg.train_vision)
        for p in self.text.parameters():
            p.requires_grad_(self.cfg.train_text)
        self.text.token_embedding.weight.requires_grad_(True)
        self.text.positional_embedding.requires_grad_(True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # -- 1. text side --------------------------------------------------------------------------
    def encode_names(self, names: list[str]) -> torch.Tensor:
        """Plain names -> (N, E) CLIP text features (projected EOS token, not normalized)."""
        device = self.background.device
        return self.text(tokenize(names, self.text.context_length).to(device))

    def encode_vocabulary(self, vocab: Vocabulary) -> Conditioning:
        """Everything that depends on the vocabulary only."""
        device = self.background.device
        if self.cfg.mode == "clipseg":
            e = torch.cat([self.encode_names(list(vocab.class_names)), self.background])
            mul, add = self.film.vectors(e)
            return Conditioning(mul, add, num_parts=0, num_objects=vocab.num_classes)
        n_parts = len(vocab.parts)
        words = ObjectWords.split(vocab.objects) if self.cfg.colour_blind else None
        rows = list(vocab.objects) if words is None else list(words.words)
        e = self.encode_names(list(vocab.parts) + rows)
        mul1, add1 = self.film.vectors(torch.cat([e, self.background]))
        e_obj, object_words = e[n_parts:], None
        if words is not None:  # an object's embedding is the mean of its words'
            object_words = torch.tensor(words.matrix(), dtype=e.dtype, device=device)
            e_obj = object_words @ e_obj / 2
        class_part = torch.tensor(vocab.class_parts, dtype=torch.long, device=device)
        class_object = torch.tensor(vocab.class_objects, dtype=torch.long, device=device)
        e_k = self.embed_mix(torch.cat([e_obj[class_object], e[class_part]], dim=1))
        mul2, add2 = self.film2.vectors(e_k)
        return Conditioning(mul1, add1, n_parts, len(rows), mul2, add2, class_part, class_object,
                            0 if words is None else len(words.colours), object_words)

    # -- 2. image side -------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) normalized -> adapted taps (deep to shallow) and stride-4 features."""
        # The tower is frozen: skip its autograd graph (a large saving in training).
        with torch.set_grad_enabled(torch.is_grad_enabled() and
                                    any(p.requires_grad for p in self.vit.parameters())):
            taps = self.vit(images)
        if self.adapters is not None:
            taps = [adapter(a) for adapter, a in zip(self.adapters, taps)]
        if self.conv_branch is None:
            return ImageFeatures(taps[::-1])
        return ImageFeatures(taps[::-1], *self.conv_branch(images))

    def decode_stage1(self, image: ImageFeatures, cond: Conditioning,
                      need_attention: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image features -> features (B, C, g, g, D) per condition and last-block attention."""
        taps = image.taps
        b, t, _ = taps[0].shape
        c = cond.film1_mul.shape[0]
        x = self.reduces[0](taps[0])
        if image.grid is not None:  # the CLS token gets no grid feature
            x = torch.cat([x[:, :1], x[:, 1:] + image.grid], 1)
        x = FiLM.apply(x.unsqueeze(1), cond.film1_mul, cond.film1_add)
        x = x.reshape(b * c, t, -1)
        attention = None
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = (self.reduces[i](taps[i]).unsqueeze(1) + x.reshape(b, c, t, -1)).flatten(0, 1)
            x, attention = block(x, need_attention and i == len(self.blocks) - 1)
        g = self.cfg.grid_size
        feats = x[:, 1:].reshape(b, c, g, g, -1)
        if attention is not None:
            attention = attention[:, 1:, 1:].reshape(b, c, g * g, g * g)
        return feats, attention

    def mask_logits(self, head: MaskHead, feats: torch.Tensor, image: ImageFeatures
                    ) -> torch.Tensor:
        """Per-condition features (B, C, g, g, D) -> (B, C, S, S) logits with `head` (H or H')."""
        b, c = feats.shape[:2]
        out = head(feats.flatten(0, 1).permute(0, 3, 1, 2), image.high_res)
        return out.reshape(b, c, *out.shape[-2:])

    # -- 3. stage 2 ----------------------------------------------------------------------------
    def stage2_from(self, part_feats: torch.Tensor, object_feats: torch.Tensor,
                    class_part: torch.Tensor, class_object: torch.Tensor,
                    film2_mul: torch.Tensor, film2_add: torch.Tensor) -> torch.Tensor:
        """Part (B, P, g, g, D) and object (B, >= O, g, g, D) features -> (B, K, g, g, D).

        Extra object rows (e.g. background) are never gathered. Shapes come from the tensors,
        so an exported graph keeps P, O and K dynamic. The linear Mix is applied to parts and
        objects separately, then gathered; the MLP Mix (not linear) to each class's gathered
        [F_p ; F_o].
        """
        if self.cfg.mix == "mlp":
            # Gather [F_p ; F_o] per class: (B, K, g, g, 2D) -> MLP -> (B, K, g, g, D).
            g = self.mix(torch.cat([part_feats[:, class_part], object_feats[:, class_object]],
                                   dim=-1))
            return FiLM.apply(g, film2_mul, film2_add)
        d = part_feats.shape[-1]
        # Mix is linear, so mix parts and objects once each, then gather per class:
        # costs P + O projections instead of K.
        w = self.mix.weight
        mixed_parts = part_feats @ w[:, :d].T  # Mix([F_p ; F_o]): parts come first
        mixed_objects = object_feats @ w[:, d:].T + self.mix.bias
        g = mixed_parts[:, class_part] + mixed_objects[:, class_object]
        return FiLM.apply(g, film2_mul, film2_add)

    def grey(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> their luma in all three channels, normalized."""
        return nn.functional.conv2d(images, self.grey_weight.to(images.dtype)[:, :, None, None],
                                    self.grey_bias.to(images.dtype))

    def stage1(self, images: torch.Tensor, cond: Conditioning, need_attention: bool = False,
               part_logits: bool = True, mark: Callable[[str], None] = lambda stage: None
               ) -> Stage1:
        """(B, 3, S, S) normalized images -> stage-1 features and logits (partclipseg mode).
        `mark("vit")` is called once the image features exist (the GPU profile's stages)."""
        if cond.num_colour:
            return self._stage1_colour_blind(images, cond, need_attention, part_logits, mark)
        image = self.image_features(images)
        mark("vit")
        feats, attention = self.decode_stage1(image, cond, need_attention)
        p = cond.num_parts
        if part_logits:
            s1 = self.mask_logits(self.head, feats, image)
            objects, parts = s1[:, p:], torch.cat([s1[:, :p], s1[:, -1:]], 1)
        else:  # deployment reads the object head only
            objects, parts = self.mask_logits(self.head, feats[:, p:], image), None
        return Stage1(image, feats[:, :p], feats[:, p:-1], objects, parts, attention)

    def _stage1_colour_blind(self, images: torch.Tensor, cond: Conditioning,
                             need_attention: bool, part_logits: bool,
                             mark: Callable[[str], None]) -> Stage1:
        """Parts, body-plan words and background decoded from the grey image, colour words from
        the colour image; objects from their words (logits summed, features and attention
        averaged). Rows of `cond`: [P parts, C colours, W_p plans, background], or one colour
        and one plan row per object (`object_words` None: the deployed layout)."""
        p, c = cond.num_parts, cond.num_colour
        mul, add = cond.film1_mul, cond.film1_add
        colour = self.image_features(images)
        grey = self.image_features(self.grey(images))
        mark("vit")
        grey_rows = Conditioning(torch.cat([mul[:p], mul[p + c:]]),
                                 torch.cat([add[:p], add[p + c:]]), 0, 0)
        f_g, a_g = self.decode_stage1(grey, grey_rows, need_attention)
        f_c, a_c = self.decode_stage1(colour, Conditioning(mul[p:p + c], add[p:p + c], 0, 0),
                                      need_attention)
        s_g = self.mask_logits(self.head, f_g if part_logits else f_g[:, p:], grey)
        s_c = self.mask_logits(self.head, f_c, colour)
        plans = s_g[:, -(f_g.shape[1] - p):]  # [plan words, background]
        words = cond.object_words
        if words is None:  # object o = colour row o + plan row o: the same sums, no matrix
            object_feats = (f_c + f_g[:, p:-1]) / 2
            objects = s_c + plans[:, :-1]
        else:
            mean = words / words.sum(1, keepdim=True)
            object_feats = _mix_rows(mean, torch.cat([f_c, f_g[:, p:-1]], 1))
            objects = _mix_rows(words, torch.cat([s_c, plans[:, :-1]], 1))
        parts = torch.cat([s_g[:, :p], s_g[:, -1:]], 1) if part_logits else None
        attention = None
        if need_attention:
            word_att = ((a_c + a_g[:, p:-1]) / 2 if words is None
                        else _mix_rows(mean, torch.cat([a_c, a_g[:, p:-1]], 1)))
            attention = torch.cat([a_g[:, :p], word_att, a_g[:, -1:]], 1)
        return Stage1(grey, f_g[:, :p], object_feats, torch.cat([objects, plans[:, -1:]], 1),
                      parts, attention)

    def forward_image(self, images: torch.Tensor, cond: Conditioning,
                      need_attention: bool = False, classes: torch.Tensor | None = None
                      ) -> SegOutput:
        """(B, 3, S, S) CLIP-normalized float images + conditioning -> SegOutput.

        classes: optional (K',) int64 indices into the vocabulary's classes: stage 2 runs for
        these only and `logits` is (B, K' + 1, S, S) in that order (training computes stage 2
        for the classes of the objects in the batch; see `training.losses.stage2_classes`).
        """
        if self.cfg.mode == "clipseg":
            if classes is not None:
                raise ValueError("classes selects stage-2 classes; the clipseg baseline has no "
                                 "stage 2 (pass a vocabulary subset instead)")
            image = self.image_features(images)
            feats, attention = self.decode_stage1(image, cond, need_attention)
            return SegOutput(logits=self.mask_logits(self.head, feats, image), attention=attention)
        s1 = self.stage1(images, cond, need_attention)
        class_part, class_object = cond.class_part, cond.class_object
        mul2, add2 = cond.film2_mul, cond.film2_add
        if classes is not None:
            class_part, class_object = class_part[classes], class_object[classes]
            mul2, add2 = mul2[classes], add2[classes]
        class_feats = self.stage2_from(s1.part_feats, s1.object_feats, class_part, class_object,
                                       mul2, add2)
        s2 = self.mask_logits(self.head2, class_feats, s1.image)
        return SegOutput(logits=torch.cat([s2, s1.object_logits[:, -1:]], 1),
                         object_logits=s1.object_logits, part_logits=s1.part_logits,
                         attention=s1.attention)

    def forward(self, images: torch.Tensor, vocab: Vocabulary, need_attention: bool = False,
                classes: torch.Tensor | None = None) -> SegOutput:
        return self.forward_image(images, self.encode_vocabulary(vocab), need_attention, classes)
