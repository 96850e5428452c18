"""The training loop: one process, or many under `torchrun` (DistributedDataParallel).

Resumable to the step: the data order and augmentation depend only on (seed, epoch, index), and
`last.pt` stores weights, optimizer, scheduler, step and RNG states, so `--resume` continues the
same run. Rank 0 alone evaluates and writes checkpoints (atomically).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime.io import atomic_write, atomic_write_text

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.datasets import load_dataset
from ..evaluation.evaluate import eval_dataset, evaluate
from ..model import build_model
from .config import TrainConfig
from .data import TrainSamples
from .losses import PartCLIPSegLoss, build_targets, stage2_classes

__all__ = ["train", "param_groups", "poly_lr", "epoch_indices"]


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 vision_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and embeddings (paper); the image tower
    (when trained, `train_vision`) at `vision_lr_scale` times the learning rate."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or name.endswith("background")
        groups.setdefault((name.startswith("vit."), skip), []).append(p)
    out = []
    for (vision, skip), params in sorted(groups.items()):
        g: dict[str, Any] = {"params": params, "weight_decay": 0.0 if skip else weight_decay}
        if vision and lr is not None:
            g["lr"] = lr * vision_lr_scale
        out.append(g)
    return out


def poly_lr(step: int, total: int, power: float, warmup: int = 0) -> float:
    """LR multiplier: linear warm-up, then (1 - step/total)^power."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - step / max(1, total)) ** power


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's shard of the epoch's permutation (equal-size shards, tail dropped)."""
    perm = np.random.default_rng((seed, epoch, 7)).permutation(n)
    per_rank = n // world
    return perm[: per_rank * world][rank::world]


def _batches(samples: TrainSamples, cfg: TrainConfig, rank: int, world: int, epoch: int,
             offset: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Endless (epoch, batch index, batch) stream starting at `epoch`, batch `offset`."""
    local = cfg.batch_size // world
    while True:
        samples.epoch = epoch
        idx = epoch_indices(len(samples), cfg.seed, epoch, rank, world)
        n_batches = len(idx) // local
        if n_batches == 0:
            raise ValueError(f"dataset of {len(samples)} samples is smaller than one batch")
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(samples, idx[offset * local: n_batches * local].tolist()),
            batch_size=local, num_workers=cfg.num_workers, shuffle=False, drop_last=True,
            persistent_workers=False)
        for b, batch in enumerate(loader, start=offset):
            yield epoch, b, batch
        epoch, offset = epoch + 1, 0


def _ensure_synthparts(cfg: TrainConfig, rank: int) -> None:
    root = Path(cfg.data.root)
    if cfg.data.kind == "synthparts" and not (root / "classes.json").is_file():
        if rank == 0:
            from ..data.synthparts import generate
            generate(root, seed=cfg.data.synth_seed, n_train=cfg.data.synth_train,
                     n_val=cfg.data.synth_val)
        if dist.is_initialized():
            dist.barrier()


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True, stop_at: int | None = None, overwrite: bool = False
          ) -> dict[str, Any]:
    """Train with `cfg`, writing `out/{last,best}.pt` and `out/metrics.csv`.

    `stop_at` ends the run early after that step (writing last.pt), as a time-boxed job or an
    interruption would; `resume=True` then continues it to `cfg.steps`. A fresh run refuses an
    `out` that already holds a run (last.pt or best.pt) unless `overwrite=True`, which deletes
    that run's checkpoints and metrics first.
    Returns {"best_score", "history", "out"} on rank 0, {} on other ranks.
    """
    out = Path(out)
    last_path, best_path, csv_path = out / "last.pt", out / "best.pt", out / "metrics.csv"
    # Argument errors first: before any process group, dataset generation or write.
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: {last_path} does not exist; start without "
                                "--resume or point --out at the run to continue")
    if stop_at is not None and stop_at <= 0:
        raise ValueError(f"stop_at must be a positive step, got {stop_at}")
    if not resume and (last_path.exists() or best_path.exists()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a training run (last.pt/best.pt): pass "
                                  "--resume to continue it, --overwrite to replace it, or "
                                  "choose a new --out")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda": this process's GPU
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if distributed
                           else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    _ensure_synthparts(cfg, rank)
    train_set = load_dataset(cfg.data.kind, cfg.data.root, cfg.data.train_split, per_object=False)
    full_vocab = train_set.vocabulary
    vocab = full_vocab.seen_subset()  # unseen objects: never named, their pixels ignored
    model = _initial_model(cfg).to(dev)
    samples = TrainSamples(train_set, vocab, model.cfg.image_size, cfg.seed, cfg.hflip,
                           cfg.scale_range)
    # Fused: one kernel over all parameters; the foreach version spent ~60 ms of a ~600 ms CPU
    # step on the 6.3M-entry token embedding alone.
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, cfg.vision_lr_scale),
                              lr=cfg.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: poly_lr(s, cfg.steps, cfg.poly_power, cfg.warmup_steps))
    step, epoch, offset, best, history = 0, 0, 0, -math.inf, []
    if resume:
        rec = load_checkpoint(last_path, map_location=dev)
        model.load_state_dict(rec["state_dict"])
        optim.load_state_dict(rec["optimizer"])
        sched.load_state_dict(rec["scheduler"])
        step, epoch, offset = rec["step"], rec["epoch"], rec["batch_in_epoch"]
        best = rec.get("best_score", -math.inf)
        torch.set_rng_state(rec["rng"]["torch"].cpu())
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None) if distributed else model
    # Under DDP every mean divides by the global count / world, so the averaged gradient is
    # the gradient of the mean over the whole global batch (ranks see unequal valid pixels).
    loss_fn = PartCLIPSegLoss(cfg.loss, count=_global_count(world) if distributed else None)
    need_attention = model.cfg.mode == "partclipseg" and bool(cfg.loss.sep or cfg.loss.enh)
    amp = cfg.amp and dev.type == "cuda"
    val_cache: dict[str, Any] = {}

    def save(path: Path, metrics: dict[str, Any] | None = None) -> None:
        save_checkpoint(path, model, full_vocab, cfg.to_dict(), extra={
            "optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "step": step,
            "epoch": epoch, "batch_in_epoch": offset, "best_score": best,
            "rng": {"torch": torch.get_rng_state()}, "metrics": _plain(metrics or {})})

    def run_eval() -> dict[str, Any]:
        if cfg.eval_setting not in val_cache:
            val_cache[cfg.eval_setting] = eval_dataset(cfg.data.kind, cfg.data.root,
                                                       cfg.data.val_split, cfg.eval_setting)
        return evaluate(model, val_cache[cfg.eval_setting], cfg.eval_setting, full_vocab,
                        limit=cfg.data.val_limit, progress=progress)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(out)  # what a killed writer left (one run per folder: not live)
        if not resume:  # a fresh run (overwrite checked above): no rows of an old one
            for p in (last_path, best_path, csv_path):
                p.unlink(missing_ok=True)
        elif csv_path.is_file():  # rows logged after last.pt was written happen again
            _truncate_csv(csv_path, step)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress or rank != 0,
               dynamic_ncols=True)
    stream = _batches(samples, cfg, rank, world, epoch, offset)
    model.train()
    t0, seen_images = time.perf_counter(), 0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        epoch, b, (images, part, obj) = next(stream)
        images, part, obj = images.to(dev), part.to(dev), obj.to(dev)
        class_t, obj_t = build_targets(part, obj, vocab.num_classes, len(vocab.objects))
        classes = None
        if cfg.stage2_classes == "present" and model.cfg.mode == "partclipseg":
            # Negatives drawn from (seed, step): a resumed run draws the same ones.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            classes = stage2_classes(class_t, vocab, cfg.stage2_negatives, gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            output = ddp(images, vocab, need_attention=need_attention, classes=classes)
        loss, terms = loss_fn(_float(output), vocab, class_t, obj_t, classes)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        sched.step()
        step, offset = step + 1, b + 1
        seen_images += images.shape[0] * world
        loss = loss.detach()
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}: lower lr or check data")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            rate = seen_images / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{rate:.1f}")
            _append_csv(csv_path, {"step": step, "lr": sched.get_last_lr()[0],
                                   "loss": float(loss), **terms, "images_per_s": rate})
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if rank == 0:
                metrics = run_eval()
                score = metrics["h_iou"] if math.isfinite(metrics["h_iou"]) else metrics["miou_seen"]
                _append_csv(csv_path, {"step": step, **{f"val_{k}": v for k, v in metrics.items()
                                                        if isinstance(v, float)}})
                history.append({"step": step, **_headline(metrics)})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                      _headline(metrics).items()))
                if score > best:
                    best = score
                    save(best_path, metrics)
                save(last_path, metrics)
            if distributed:
                dist.barrier()
    if step < cfg.steps and step % cfg.eval_every and rank == 0:
        save(last_path)  # stopped early between evaluations
    bar.close()
    if rank != 0:
        return {}
    return {"best_score": best, "history": history, "out": str(out)}


def _remove_stale_temp(out: Path) -> None:
    """Delete the temp files of writes a killed process never finished (atomic_write's
    `.last.pt.XXXX.tmp`, ...): the files they were replacing are intact."""
    for name in ("last.pt", "best.pt", "config.json", "metrics.csv"):
        for p in out.glob(f".{name}.*tmp*"):
            p.unlink(missing_ok=True)


def _global_count(world: int) -> Any:
    """Local count -> all-reduced count / world (a collective: every rank calls it alike)."""
    def count(n: torch.Tensor) -> torch.Tensor:
        n = n.detach().to(torch.float64).clone()
        dist.all_reduce(n)
        return (n / world).to(torch.float32)
    return count


def _initial_model(cfg: TrainConfig) -> torch.nn.Module:
    """`cfg.model` at random init (or its pretrained towers), or the weights of `cfg.init`."""
    if not cfg.init:
        return build_model(cfg.model, **dict(cfg.model_overrides))
    from ..config import ModelConfig

    record = load_checkpoint(cfg.init)
    # The weights are in the checkpoint: never fetch a pretrained tower again.
    model_cfg = ModelConfig.from_dict(record["model_config"]).replace(
        pretrained=None, **dict(cfg.model_overrides))
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(record["state_dict"], strict=False)
    # Modules that the overrides may add or drop (adapters on/off, clipseg <-> partclipseg)
    # start fresh or are left out; anything else must match.
    optional = ("adapters.", "mix.", "embed_mix.", "film2.", "head2.")
    wrong = [k for k in list(missing) + list(unexpected) if not k.startswith(optional)]
    if wrong:
        raise ValueError(f"init checkpoint {cfg.init} does not fit the model: {wrong[:5]}")
    return model


def _float(out: Any) -> Any:
    """Losses in float32 whatever the autocast dtype."""
    for f in ("logits", "object_logits", "part_logits", "attention"):
        t = getattr(out, f)
        if t is not None:
            setattr(out, f, t.float())
    return out


def _headline(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("miou_seen", "miou_unseen", "h_iou") if k in m}


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-class list, as a weights_only-safe dict."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str))}


def _truncate_csv(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (logged by a run after its last checkpoint)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if len(r) == 3 and r[2].isdigit() and int(r[2]) <= step]
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
    atomic_write(path, write)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["key", "value", "step"])
        for k, v in row.items():
            if k != "step":
                w.writerow([k, v, row["step"]])
