"""Hugging Face CLIPSeg and the authors' released PartCLIPSeg weights -> our PartCLIPSeg keys.

Source layouts (key prefixes are found automatically, e.g. `partclipseg_model.` or `module.`):

Hugging Face `CLIPSegForImageSegmentation` (e.g. CIDAS/clipseg-rd64-refined):
  clip.vision_model.embeddings.{patch_embedding.weight (W, 3, 16, 16), class_embedding (W,),
      position_embedding.weight (1 + g0*g0, W)}; pre_layrnorm; encoder.layers.N.{self_attn.
      {q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2} (pre-LN blocks)
  clip.text_model.embeddings.{token_embedding.weight (V, Wt), position_embedding.weight (L, Wt)};
      encoder.layers.N.*; final_layer_norm;  clip.text_projection.weight (E, Wt)
  decoder.film_{mul,add} (D, E); decoder.reduces.i (D, W), i = 0 for the DEEPEST tap (HF reverses
      the activations, as we do); decoder.layers.i.* (post-LN, MLP D -> 2048 -> D, ReLU: the
      HF code sets the decoder's hidden_act to "relu" and ignores `decoder_hidden_act`);
      decoder.transposed_convolution.{0: Conv3x3 D->D, 2: ConvT D->D/2 k4 s4, 4: ConvT D/2->1
      k4 s4} when `use_complex_transposed_convolution` (the "refined" head = our MaskHead).

The authors' PartCLIPSeg (github.com/kaist-cvml/part-clipseg, detectron2 `.pth`, state dict under
"model", HF CLIPSeg wrapped as `partclipseg_model.`) adds:
  decoder.cond_film_{mul,add} -> film2 (FiLM');  decoder.reduce_cond_embed (E, 2E) -> embed_mix
      (input [e_o ; e_p], as ours; but the released forward at d75a599 fills the e_o slot with
      row `class_object` of [parts; objects; background] without skipping the P parts, so there
      its We saw a part's embedding; ours feeds the object's);
      decoder.part_obj_with_cond_embed.{0,2,4} -> head2 (H');
  non_object_embedding (1, E) -> background;
  visual_adapter.fc.{0: (W/4, W), 2: (W, W/4)} (ONE adapter shared by the three taps; fc is
      Linear, ReLU, Linear, ReLU and the taps become 0.2 fc(a) + 0.8 a) -> copied into each of
      our three adapters, built with `adapter_out_relu` (the ReLU on the MLP output): exact;
  decoder.part_obj_mlp: the part/object mixing layer, in one of two versions (`Conversion.mixing`,
      and the model config's `mix`):
      "linear": part_obj_mlp.{weight (D, 2D), bias} - the paper's per-pixel Linear -> mix.*;
      "mlp":    part_obj_mlp.{0: (D, 2D), 2: (D, D)} - Linear, ReLU, Linear (the released code)
                -> mix.0.*, mix.2.* of the MLP Mix;
  text_adapter.* (its output is multiplied by 0 in the released forward) and tunable_linear
  (unused there) carry no information and are dropped.

Position embeddings: HF interpolates them bicubically (align_corners=False) from g0 x g0 to the
input grid on every forward; we run the same interpolation once at conversion, so the numbers
are identical for the configured input size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..config import ModelConfig
from ..model.backbone import resize_pos_embed
from .sources import WeightsError

__all__ = ["Conversion", "detect_layout", "clipseg_model_config", "convert_clipseg",
           "HF_CLIPSEG_DEFAULTS"]

# Values a Hugging Face config.json may omit (transformers writes only non-defaults).
HF_CLIPSEG_DEFAULTS: dict[str, Any] = {
    "extract_layers": [3, 6, 9], "decoder_num_attention_heads": 4, "conditional_layer": 0,
    "vision_config": {"num_attention_heads": 12, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-5},
    "text_config": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}

_FORMAT_HF = "hf-clipseg"
_FORMAT_RELEASED = "partclipseg-released"


@dataclass
class Conversion:
    """Result of mapping a foreign state dict onto our keys.

    state_dict: our key -> tensor, for every key that the source determines.
    config: the ModelConfig these tensors fit.
    source_format: "hf-clipseg" or "partclipseg-released".
    mixing: "linear" | "mlp" | None (no stage-2 mixing layer in the source).
    unused: source keys dropped on purpose, "key: reason".
    unmapped: source keys this converter does not know (nothing was done with them).
    approximate: our keys filled with weights whose function differs from the source's.
    not_in_source: our key groups the source does not provide, "keys: how they are set".
    """

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    source_format: str
    prefix: str
    mixing: str | None = None
    unused: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)
    not_in_source: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """JSON- and weights_only-safe summary (stored in the imported checkpoint)."""
        return {"source_format": self.source_format, "prefix": self.prefix,
                "mixing": self.mixing, "unused": list(self.unused),
                "unmapped": list(self.unmapped), "approximate": list(self.approximate),
                "not_in_source": list(self.not_in_source)}


def detect_layout(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """-> (key prefix, "hf-clipseg" | "partclipseg-released"); WeightsError if neither."""
    anchors = [k[: -len("decoder.film_mul.weight")] for k in state
               if k.endswith("decoder.film_mul.weight")]
    if len(anchors) != 1:
        sample = sorted(state)[:8]
        raise WeightsError(
            "not a CLIPSeg / PartCLIPSeg state dict: expected exactly one "
            f"'*decoder.film_mul.weight' key, found {len(anchors)} (first keys: {sample})")
    prefix = anchors[0]
    released = any(prefix + k in state for k in (
        "decoder.cond_film_mul.weight", "decoder.reduce_cond_embed.weight",
        "decoder.part_obj_with_cond_embed.0.weight", "non_object_embedding"))
    return prefix, _FORMAT_RELEASED if released else _FORMAT_HF


def _layers(state: Mapping[str, torch.Tensor], stem: str) -> int:
    pat = re.compile(re.escape(stem) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pat.match(k))}
    if found != set(range(len(found))):
        raise WeightsError(f"{stem}N layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _sub(cfg: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    base = dict(HF_CLIPSEG_DEFAULTS[key])
    base.update((cfg or {}).get(key) or {})
    return base


def clipseg_model_config(state: Mapping[str, torch.Tensor], prefix: str,
                         hf_config: Mapping[str, Any] | None, *, name: str = "clipseg-import",
                         image_size: int = 352, mode: str = "partclipseg",
                         adapters: bool = True) -> ModelConfig:
    """Our ModelConfig for a CLIPSeg-layout state dict: sizes from tensor shapes, head counts,
    activations and taps from `hf_config` (config.json) or the HF CLIPSeg defaults."""
    p = prefix
    if hf_config is not None and hf_config.get("model_type") not in (None, "clipseg"):
        raise WeightsError(f"config.json describes a {hf_config.get('model_type')!r} model, "
                           "not CLIPSeg")
    top = {k: (hf_config or {}).get(k, HF_CLIPSEG_DEFAULTS[k])
           for k in ("extract_layers", "decoder_num_attention_heads", "conditional_layer")}
    vis, txt = _sub(hf_config, "vision_config"), _sub(hf_config, "text_config")
    if top["conditional_layer"] != 0:
        raise WeightsError(f"conditional_layer = {top['conditional_layer']}: our decoder applies "
                           "FiLM after the first (deepest) reduce, i.e. conditional_layer 0")
    acts = {vis["hidden_act"], txt["hidden_act"]}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise WeightsError(f"CLIP towers use activations {sorted(acts)}; open_clip's CLIP "
                           "supports one of quick_gelu / gelu for both")
    for what, c in (("vision", vis), ("text", txt)):
        if not math.isclose(float(c["layer_norm_eps"]), 1e-5):
            raise WeightsError(f"{what} layer_norm_eps {c['layer_norm_eps']} != 1e-5 "
                               "(open_clip's LayerNorm)")

    patch_w = state[p + "clip.vision_model.embeddings.patch_embedding.weight"]
    width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    n_pos = int(state[p + "clip.vision_model.embeddings.position_embedding.weight"].shape[0])
    g0 = math.isqrt(n_pos - 1)
    if g0 * g0 != n_pos - 1:
        raise WeightsError(f"vision position embedding has {n_pos} rows: not 1 + a square grid")
    v_layers = _layers(state, p + "clip.vision_model.encoder.layers.")
    v_mlp = int(state[p + "clip.vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    tok = state[p + "clip.text_model.embeddings.token_embedding.weight"]
    t_width, vocab = int(tok.shape[1]), int(tok.shape[0])
    ctx = int(state[p + "clip.text_model.embeddings.position_embedding.weight"].shape[0])
    t_layers = _layers(state, p + "clip.text_model.encoder.layers.")
    t_mlp = int(state[p + "clip.text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    embed = int(state[p + "clip.text_projection.weight"].shape[0])
    reduce_dim = int(state[p + "decoder.film_mul.weight"].shape[0])
    dec_mlp = int(state[p + "decoder.layers.0.mlp.fc1.weight"].shape[0])
    n_dec = _layers(state, p + "decoder.layers.")
    taps = list(top["extract_layers"])
    if n_dec != len(taps) or _layers(state, p + "decoder.reduces.") != len(taps):
        raise WeightsError(f"decoder has {n_dec} layers but extract_layers is {taps}")
    for what, w, h in (("vision", width, vis["num_attention_heads"]),
                       ("text", t_width, txt["num_attention_heads"]),
                       ("decoder", reduce_dim, top["decoder_num_attention_heads"])):
        if w % int(h):
            raise WeightsError(f"{what} width {w} is not divisible by its {h} heads")
    if patch != 16:
        # The heads agree at patch 16 only: HF's upsamples by (p/4)^2, ours by p.
        raise WeightsError(f"patch size {patch}: only patch-16 CLIPSeg models (e.g. "
                           "clipseg-rd64-refined) can be imported; for other patch sizes the "
                           "Hugging Face mask head upsamples by (p/4)^2, ours by p")
    return ModelConfig(
        name=name, mode=mode, clip_name=None, pretrained=None, embed_dim=embed,
        vision_cfg={"image_size": g0 * patch, "layers": v_layers, "width": width,
                    "head_width": width // int(vis["num_attention_heads"]),
                    "patch_size": patch, "mlp_ratio": v_mlp / width},
        text_cfg={"context_length": ctx, "vocab_size": vocab, "width": t_width,
                  "heads": int(txt["num_attention_heads"]), "layers": t_layers,
                  "mlp_ratio": t_mlp / t_width},
        quick_gelu=vis["hidden_act"] == "quick_gelu", image_size=image_size,
        extract_layers=tuple(taps), adapters=adapters, adapter_hidden=width // 4,
        reduce_dim=reduce_dim, decoder_heads=int(top["decoder_num_attention_heads"]),
        decoder_mlp_dim=dec_mlp, decoder_act="relu")


class _Mapper:
    """Moves source tensors onto our keys; every source key must be taken or dropped."""

    def __init__(self, state: Mapping[str, torch.Tensor], prefix: str):
        self.src = dict(state)
        self.prefix = prefix
        self.out: dict[str, torch.Tensor] = {}
        self.unused: list[str] = []

    def has(self, key: str) -> bool:
        return self.prefix + key in self.src

    def take(self, key: str) -> torch.Tensor:
        try:
            return self.src.pop(self.prefix + key)
        except KeyError:
            raise WeightsError(f"missing source key {self.prefix + key!r}") from None

    def put(self, ours: str, key: str) -> None:
        self.out[ours] = self.take(key)

    def linear(self, ours: str, key: str, bias: bool = True) -> None:
        self.put(ours + ".weight", key + ".weight")
        if bias:
            self.put(ours + ".bias", key + ".bias")

    def drop(self, pattern: str, reason: str) -> None:
        rx = re.compile(re.escape(self.prefix) + "(?:" + pattern + ")")
        for k in sorted(k for k in self.src if rx.fullmatch(k)):
            del self.src[k]
            self.unused.append(f"{k}: {reason}")

    def clip_block(self, ours: str, key: str) -> None:
        """HF pre-LN encoder layer -> open_clip ResidualAttentionBlock (fused in_proj)."""
        q, k, v = (self.take(f"{key}.self_attn.{n}_proj.weight") for n in "qkv")
        qb, kb, vb = (self.take(f"{key}.self_attn.{n}_proj.bias") for n in "qkv")
        self.out[f"{ours}.attn.in_proj_weight"] = torch.cat([q, k, v])
        self.out[f"{ours}.attn.in_proj_bias"] = torch.cat([qb, kb, vb])
        self.linear(f"{ours}.attn.out_proj", f"{key}.self_attn.out_proj")
        self.linear(f"{ours}.ln_1", f"{key}.layer_norm1")
        self.linear(f"{ours}.ln_2", f"{key}.layer_norm2")
        self.linear(f"{ours}.mlp.c_fc", f"{key}.mlp.fc1")
        self.linear(f"{ours}.mlp.c_proj", f"{key}.mlp.fc2")

    def head(self, ours: str, key: str) -> None:
        if self.has(key + ".weight"):
            raise WeightsError(
                f"{self.prefix + key} is a single ConvTranspose (use_complex_transposed_"
                "convolution = false, e.g. CIDAS/clipseg-rd64 / rd16): our MaskHead is the "
                "'refined' head (Conv3x3, ReLU, ConvT k4 s4, ReLU, ConvT k4 s4); import "
                "clipseg-rd64-refined instead")
        self.linear(f"{ours}.conv", f"{key}.0")
        self.linear(f"{ours}.up1", f"{key}.2")
        self.linear(f"{ours}.up2", f"{key}.4")


def convert_clipseg(state: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any] | None = None,
                    *, image_size: int = 352, mode: str = "partclipseg", adapters: bool = True,
                    allow_partial: bool = False, name: str = "clipseg-import") -> Conversion:
    """Map an HF CLIPSeg or released PartCLIPSeg state dict onto our PartCLIPSeg keys.

    `mode`/`adapters`/`image_size` choose the model to build (a released PartCLIPSeg checkpoint
    forces mode "partclipseg" with adapters, `adapter_out_relu` and the `mix` version found).
    `allow_partial` is accepted for symmetry with the importer (which uses it for unmapped
    source keys); every layer this converter maps is represented exactly.
    """
    prefix, fmt = detect_layout(state)
    released = fmt == _FORMAT_RELEASED
    if released:
        mode, adapters = "partclipseg", True
    cfg = clipseg_model_config(state, prefix, hf_config, name=name, image_size=image_size,
                               mode=mode, adapters=adapters)
    mixing = _released_mixing(state, prefix) if released else None
    if released:
        cfg = cfg.replace(mix=mixing, adapter_out_relu=True)
    m = _Mapper(state, prefix)
    conv = Conversion({}, cfg, fmt, prefix, mixing=mixing)
    taps = cfg.extract_layers

    # -- image tower: runs to the deepest tap only -------------------------------------------
    v = "clip.vision_model."
    m.put("vit.conv1.weight", v + "embeddings.patch_embedding.weight")
    m.put("vit.class_embedding", v + "embeddings.class_embedding")
    m.out["vit.positional_embedding"] = resize_pos_embed(
        m.take(v + "embeddings.position_embedding.weight"), cfg.grid_size)
    m.linear("vit.ln_pre", v + "pre_layrnorm")
    for i in range(taps[-1] + 1):
        m.clip_block(f"vit.blocks.{i}", f"{v}encoder.layers.{i}")
    m.drop(re.escape(v) + r"encoder\.layers\.\d+\..*",
           f"vision layer past the deepest tap {taps[-1]} (never run)")
    m.drop(re.escape(v) + r"post_layernorm\..*|clip\.visual_projection\.weight|clip\.logit_scale",
           "CLIP image embedding / contrastive head (not used for segmentation)")

    # -- text tower -------------------------------------------------------------------------
    t = "clip.text_model."
    m.put("text.token_embedding.weight", t + "embeddings.token_embedding.weight")
    m.put("text.positional_embedding", t + "embeddings.position_embedding.weight")
    for i in range(cfg.text_cfg["layers"]):
        m.clip_block(f"text.transformer.resblocks.{i}", f"{t}encoder.layers.{i}")
    m.linear("text.ln_final", t + "final_layer_norm")
    m.out["text.text_projection"] = m.take("clip.text_projection.weight").T.contiguous()
    m.drop(r".*position_ids", "index buffer")

    # -- stage-1 decoder (both ordered deep to shallow, like ours) ------------------------------
    m.linear("film.mul", "decoder.film_mul")
    m.linear("film.add", "decoder.film_add")
    for i in range(len(taps)):
        m.linear(f"reduces.{i}", f"decoder.reduces.{i}")
        d = f"decoder.layers.{i}"
        for n in ("q", "k", "v", "out"):
            m.linear(f"blocks.{i}.{n}_proj", f"{d}.self_attn.{n}_proj")
        m.linear(f"blocks.{i}.norm1", f"{d}.layer_norm1")
        m.linear(f"blocks.{i}.mlp.0", f"{d}.mlp.fc1")
        m.linear(f"blocks.{i}.mlp.2", f"{d}.mlp.fc2")
        m.linear(f"blocks.{i}.norm2", f"{d}.layer_norm2")
    m.head("head", "decoder.transposed_convolution")

    if released:
        _released_extras(m, cfg)
    else:
        if adapters:
            conv.not_in_source.append("adapters.*: initialized (CLIPSeg has no adapters)")
        conv.not_in_source.append("background: initialized (CLIPSeg has no learned "
                                  "background embedding)")
        if mode == "partclipseg":
            conv.not_in_source.append("film2, head2: copies of film, head (FiLM', H' start "
                                      "as stage 1's)")
            conv.not_in_source.append("mix, embed_mix: initialized to the average of their "
                                      "two inputs")
            for a, b in (("film2", "film"), ("head2", "head")):
                for k in [k for k in m.out if k.startswith(b + ".")]:
                    m.out[a + k[len(b):]] = m.out[k].clone()

    conv.state_dict = m.out
    conv.unused = m.unused
    conv.unmapped = sorted(m.src)
    return conv


def _released_mixing(state: Mapping[str, torch.Tensor], prefix: str) -> str:
    """Which version of the part/object mixing layer a released checkpoint holds."""
    if prefix + "decoder.part_obj_mlp.weight" in state:
        return "linear"
    if prefix + "decoder.part_obj_mlp.0.weight" in state:
        return "mlp"
    raise WeightsError("released PartCLIPSeg layout without a part/object mixing layer "
                       "(decoder.part_obj_mlp.weight or decoder.part_obj_mlp.0.weight)")


def _released_extras(m: _Mapper, cfg: ModelConfig) -> None:
    m.linear("film2.mul", "decoder.cond_film_mul")
    m.linear("film2.add", "decoder.cond_film_add")
    m.linear("embed_mix", "decoder.reduce_cond_embed")
    m.head("head2", "decoder.part_obj_with_cond_embed")
    bg = m.take("non_object_embedding")
    m.out["background"] = bg.reshape(1, -1)
    # One shared adapter in the released code, ending with a ReLU: cfg.adapter_out_relu.
    w1, w2 = m.take("visual_adapter.fc.0.weight"), m.take("visual_adapter.fc.2.weight")
    if w1.shape[0] != cfg.adapter_hidden:
        raise WeightsError(f"visual_adapter hidden size {w1.shape[0]} != {cfg.adapter_hidden}")
    for i in range(len(cfg.extract_layers)):
        m.out[f"adapters.{i}.mlp.0.weight"] = w1.clone()
        m.out[f"adapters.{i}.mlp.2.weight"] = w2.clone()
    m.drop(r"text_adapter\..*", "text adapter: multiplied by 0 in the released forward")
    m.drop(r"tunable_linear\.weight", "unused in the released forward")
    if cfg.mix == "linear":
        m.linear("mix", "decoder.part_obj_mlp")
    else:  # Linear 2D->D, ReLU, Linear D->D
        m.linear("mix.0", "decoder.part_obj_mlp.0")
        m.linear("mix.2", "decoder.part_obj_mlp.2")
