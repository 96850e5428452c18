"""Training configuration: a YAML file read into frozen dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import CONFIG_DIR, ConfigError, resolve_config_path

__all__ = ["TrainConfig", "DataConfig", "LossConfig", "load_train_config", "apply_overrides"]


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and options (`partclipseg.training.losses.PartCLIPSegLoss`)."""

    os: float = 1.0
    obj: float = 1.0
    part: float = 1.0
    sep: float = 0.1
    enh: float = 0.01
    background_weight: float = 0.05
    gamma: float = 0.3
    sep_temperature: float = 0.05
    # "bce": one-vs-all BCE per channel (the paper). "softmax": cross-entropy, each object-
    # specific class competing only with its own object's classes and background (what
    # Oracle-Obj and Pred-All rank), objects with objects, parts with parts: a documented
    # deviation of the random-init SynthParts recipe (docs/synthparts_recipe.md).
    kind: str = "bce"
    # softmax only: class-balance exponent (see `softmax_ce`) of the class and part terms.
    class_balance: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("bce", "softmax"):
            raise ConfigError(f"loss.kind must be 'bce' or 'softmax', got {self.kind!r}")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "synthparts"  # synthparts | pascal_part_116 | ade20k_part_234 | partimagenet
    root: str = "data/synthparts"
    train_split: str = "train"
    val_split: str = "val"
    # SynthParts only: generate the dataset at `root` when it is missing.
    synth_seed: int = 0
    synth_train: int = 800
    synth_val: int = 200
    val_limit: int | None = None  # evaluate on the first N val samples (None = all)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; defaults are the paper's (AdamW 1e-4, poly 0.9, 20k steps, batch 8)."""

    model: str = "vit_b16"  # model config name or JSON path
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Start from a checkpoint's weights (e.g. `partclipseg import-weights` output); the model
    # is then built from that checkpoint's own config, with `model_overrides` applied.
    init: str | None = None
    # Stage 2 (and its loss) per step: "all" classes (the paper), or "present": the classes of
    # the objects in the batch plus `stage2_negatives` random others (losses.stage2_classes).
    # The clipseg baseline has no stage 2: it always runs every class.
    stage2_classes: str = "all"
    stage2_negatives: int = 8
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    steps: int = 20_000
    batch_size: int = 8
    lr: float = 1e-4
    vision_lr_scale: float = 1.0  # image-tower lr = lr * this (only with model train_vision)
    weight_decay: float = 1e-4  # 0 on norms, biases and embeddings
    poly_power: float = 0.9
    warmup_steps: int = 0
    grad_clip: float = 0.01
    eval_every: int = 2000
    eval_setting: str = "oracle-obj"  # the setting whose h-IoU picks best.pt
    log_every: int = 20
    num_workers: int = 2
    seed: int = 0
    amp: bool = True  # bfloat16/float16 autocast on CUDA; ignored on CPU
    hflip: bool = True
    scale_range: tuple[float, float] = (0.75, 1.25)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "vision_lr_scale", "weight_decay", "poly_power", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or \
                    (name == "lr" and v == 0):
                hint = (" (YAML reads 1e-4 as a string: write 1.0e-4)"
                        if isinstance(v, str) else "")
                raise ConfigError(f"{name} must be a {'positive' if name == 'lr' else 'non-negative'}"
                                  f" number, got {v!r}{hint}")
        if self.stage2_classes not in ("all", "present"):
            raise ConfigError(f"stage2_classes must be 'all' or 'present', "
                              f"got {self.stage2_classes!r}")
        if not isinstance(self.stage2_negatives, int) or self.stage2_negatives < 0:
            raise ConfigError(f"stage2_negatives must be an integer >= 0, "
                              f"got {self.stage2_negatives!r}")
        if self.eval_setting not in ("oracle-obj", "pred-all"):
            raise ConfigError(f"eval_setting must be 'oracle-obj' or 'pred-all', "
                              f"got {self.eval_setting!r}")
        lim = self.data.val_limit
        if lim is not None and (not isinstance(lim, int) or lim <= 0):
            raise ConfigError(f"data.val_limit must be a positive integer or null, got {lim!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_overrides"] = dict(self.model_overrides)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        d = dict(d)
        sub = {"data": DataConfig, "loss": LossConfig}
        for key, typ in sub.items():
            if key in d:
                d[key] = _build(typ, d[key], key)
        if "scale_range" in d:
            d["scale_range"] = tuple(d["scale_range"])
        return _build(cls, d, "train config")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _build(typ: type, d: Any, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {sorted(unknown)}; known: {sorted(known)}")
    try:
        return typ(**d)
    except TypeError as e:
        raise ConfigError(f"bad {where}: {e}") from e


def load_train_config(name_or_path: str | Path) -> TrainConfig:
    """A training YAML by path or shipped name ("synthparts_tiny", "configs/synthparts_tiny.yaml")."""
    path = resolve_config_path(name_or_path, CONFIG_DIR, (".yaml", ".yml"))
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read training config {path}: {e}") from e
    if not isinstance(d, Mapping):
        raise ConfigError(f"training config {path} must be a mapping of keys (steps: ..., "
                          f"data: ...), got a YAML {type(d).__name__}")
    return TrainConfig.from_dict(d)


def apply_overrides(cfg: TrainConfig, items: Sequence[str]) -> TrainConfig:
    """`cfg` with `KEY=VALUE` overrides applied in order: the one override mechanism of
    `partclipseg train --set` and the experiment scripts.

    Values are YAML ("1.0e-3", "true", "[0.5, 1.5]", "null"); a dotted key reaches into a
    section: "steps=400", "loss.sep=0", "data.root=data/x", "model_overrides.mode=clipseg".
    The result is validated like a YAML file (unknown keys and bad values raise ConfigError).
    """
    d = cfg.to_dict()
    for item in items:
        key, eq, raw = str(item).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. loss.sep=0)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e
        *sections, leaf = key.strip().split(".")
        node = d
        for name in sections:
            if not isinstance(node.get(name), dict):
                known = sorted(k for k, v in d.items() if isinstance(v, dict))
                raise ConfigError(f"override {item!r}: {name!r} is not a section (sections: "
                                  f"{known})")
            node = node[name]
        node[leaf] = value
    return TrainConfig.from_dict(d)
