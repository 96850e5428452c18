"""Model configuration: JSON files (open_clip style) read into a frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from runtime.errors import UserError

__all__ = ["ModelConfig", "ConfigError", "load_model_config", "MODEL_CONFIG_DIR",
           "CONFIG_DIR", "resolve_config_path"]


CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


class ConfigError(UserError, ValueError):
    """A configuration file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a PartCLIPSeg (or CLIPSeg baseline) model.

    `vision_cfg`/`text_cfg`/`embed_dim` are open_clip's own CLIP config fields, so a pretrained
    open_clip tower (`clip_name` + `pretrained`) loads into exactly this shape.
    """

    name: str
    mode: str = "partclipseg"  # "partclipseg" | "clipseg" (baseline: object-specific names)
    clip_name: str | None = "ViT-B-16"  # open_clip model name, used with `pretrained`
    pretrained: str | None = None  # open_clip pretrained tag or a local weight file
    embed_dim: int = 512
    vision_cfg: Mapping[str, Any] = field(default_factory=dict)
    text_cfg: Mapping[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False
    image_size: int = 352  # model input side; position embeddings are resized to it once
    extract_layers: tuple[int, ...] = (3, 6, 9)  # 0-based ViT blocks tapped, shallow to deep
    adapters: bool = True
    # Train the image tower too. The paper freezes its pretrained CLIP; a random-init tower
    # (offline demos) has nothing to preserve and learns parts far faster when trained.
    train_vision: bool = False
    # Train the whole text tower too (the paper trains only its token and position embeddings).
    # A random-init tower maps every name to nearly the same vector; trained, it can learn to
    # compose the words it has seen ("yellow", "bird") into a name it has not ("yellow bird").
    train_text: bool = False
    adapter_hidden: int = 192
    adapter_ratio: float = 0.2  # a <- (1 - r) a + r MLP(a)
    # a <- (1 - r) a + r ReLU(MLP(a)): the released PartCLIPSeg code's adapter (kaist-cvml/
    # part-clipseg) ends with a ReLU on the MLP output, before the residual mix.
    adapter_out_relu: bool = False
    reduce_dim: int = 64
    decoder_heads: int = 4
    decoder_mlp_dim: int = 2048
    decoder_act: str = "relu"  # "relu" (paper) | "quick_gelu" (Hugging Face CLIPSeg)
    # Stage-2 part/object mixing layer Mix([F_p ; F_o]): "linear" (the paper's per-pixel Linear
    # 2D -> D) | "mlp" (Linear 2D -> D, ReLU, Linear D -> D: the authors' released code).
    mix: str = "linear"
    # Width of a small convolutional encoder beside the ViT (`decoder.ConvBranch`): its stride-4
    # features enter both mask heads, its grid features the decoder's input tokens. 0 = off (the
    # paper, on pretrained CLIP); on for random-init SynthParts models, whose frozen random ViT
    # tokens carry little part information.
    conv_branch: int = 0
    # Start the mask heads' output bias at logit(head_prior) (RetinaNet's prior init) instead
    # of PyTorch's default. Each class channel is positive on a few percent of pixels at most;
    # from p = 0.5 a random-init model with BCE spends its first few hundred steps only pushing
    # every channel down. Only a fresh model's init: loaded weights replace it. None = off.
    head_prior: float | None = None
    # SynthParts' recipe for naming unseen objects (docs/synthparts_recipe.md, "The colour-blind
    # pathway"): object names are "<colour> <body plan>"; the parts and body-plan words are
    # decoded from the features of the grey image, the colour words from the colour image's, and
    # an object's logit is the sum of its two words' logits. A body-plan route that cannot see
    # colour cannot learn that a colour rules out a plan (every colour misses one plan in
    # SynthParts' seen pairs), so it names pairs it never saw. partclipseg mode only.
    colour_blind: bool = False
    # The text head export traces (`partclipseg.model.deploy.TEXT_HEADS`) when it is not the
    # model kind's own (None): a model variant with another text recipe registers one.
    text_head: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "extract_layers", tuple(int(i) for i in self.extract_layers))
        object.__setattr__(self, "vision_cfg", dict(self.vision_cfg))
        object.__setattr__(self, "text_cfg", dict(self.text_cfg))
        if self.mode not in ("partclipseg", "clipseg"):
            raise ConfigError(f"mode must be 'partclipseg' or 'clipseg', got {self.mode!r}")
        if self.decoder_act not in ("relu", "quick_gelu"):
            raise ConfigError(f"decoder_act must be 'relu' or 'quick_gelu', got {self.decoder_act!r}")
        if self.mix not in ("linear", "mlp"):
            raise ConfigError(f"mix must be 'linear' or 'mlp', got {self.mix!r}")
        layers = self.vision_cfg.get("layers", 12)
        if sorted(self.extract_layers) != list(self.extract_layers) or not self.extract_layers \
                or self.extract_layers[-1] >= layers or self.extract_layers[0] < 0:
            raise ConfigError(f"extract_layers {self.extract_layers} must be increasing block "
                              f"indices below the ViT depth {layers}")
        patch = self.patch_size
        if patch % 4 or patch < 4:
            # The mask head upsamples by the patch size: stride p/4, then stride 4.
            raise ConfigError(f"patch_size must be a multiple of 4 (the mask head upsamples "
                              f"by p/4, then 4), got {patch}")
        if self.image_size % patch:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of {patch}")
        p = self.head_prior
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0 < p < 1):
            raise ConfigError(f"head_prior must be a probability in (0, 1) or null, got {p!r}")
        if not isinstance(self.conv_branch, int) or self.conv_branch < 0:
            raise ConfigError(f"conv_branch must be an integer >= 0, got {self.conv_branch!r}")
        if self.colour_blind and self.mode != "partclipseg":
            raise ConfigError("colour_blind needs mode 'partclipseg' (it changes the object "
                              "head, which the clipseg baseline does not have)")
        if self.reduce_dim % self.decoder_heads:
            raise ConfigError("reduce_dim must be divisible by decoder_heads")

    @property
    def patch_size(self) -> int:
        """ViT patch size in pixels (open_clip's default 16 when the config leaves it out)."""
        return int(self.vision_cfg.get("patch_size", 16))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def vision_width(self) -> int:
        return int(self.vision_cfg["width"])

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extract_layers"] = list(self.extract_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in d:
            raise ConfigError("model config needs a 'name'")
        return cls(**d)


def resolve_config_path(name_or_path: str | Path, directory: Path, suffixes: tuple[str, ...]) -> Path:
    """A config file path, or the name of a config shipped in `directory` ("tiny", "tiny.json")."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in [directory / p.name] + [directory / (p.name + s) for s in suffixes]:
        if cand.is_file():
            return cand
    shipped = sorted(f.stem for f in directory.iterdir() if f.suffix in suffixes)
    raise ConfigError(f"config {str(name_or_path)!r} not found: not a file, and not one of the "
                      f"shipped configs {shipped}")


def load_model_config(name_or_path: str | Path, **overrides: Any) -> ModelConfig:
    """Read a model config (JSON or YAML) by path or by shipped name ("vit_b16", "tiny")."""
    path = resolve_config_path(name_or_path, MODEL_CONFIG_DIR, (".json", ".yaml", ".yml"))
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"model config {path} must be a mapping")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(d)
