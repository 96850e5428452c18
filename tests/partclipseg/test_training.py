"""Training loop: checkpoints and metrics, resume to the step, DDP equals one process.

Every run here is a few steps of a very small PartCLIPSeg (3-block 64-wide ViT at 64 px) on a
16-image SynthParts set generated once per session.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from partclipseg.checkpoint import load_checkpoint, load_model  # noqa: E402
from partclipseg.config import ConfigError  # noqa: E402
from partclipseg.training.config import (CONFIG_DIR, DataConfig, TrainConfig,  # noqa: E402
                                         load_train_config)
from partclipseg.training.config import LossConfig  # noqa: E402
from partclipseg.training.trainer import epoch_indices, train  # noqa: E402


def micro_config(root: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(model="micro",
                      data=DataConfig(root=str(root), val_limit=4), steps=6, batch_size=4,
                      lr=1e-3, warmup_steps=2, grad_clip=1.0, eval_every=4, log_every=1,
                      num_workers=0, seed=0)
    return cfg.replace(**changes)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_training_writes_checkpoints_and_metrics(synth_root, tmp_path):
    out = tmp_path / "run"
    result = train(micro_config(synth_root), out, progress=False)
    for name in ("best.pt", "last.pt", "metrics.csv", "config.json"):
        assert (out / name).is_file(), name
    rows = _csv_rows(out / "metrics.csv")
    assert rows[0] == ["key", "value", "step"]
    keys = {(r[0], int(r[2])) for r in rows[1:]}
    assert {("loss", s) for s in range(1, 7)} <= keys  # log_every=1
    assert {("sep", 6), ("enh", 6), ("val_h_iou", 4), ("val_miou_seen", 6)} <= keys
    assert [h["step"] for h in result["history"]] == [4, 6]
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 6 and "optimizer" in last and "metrics" in last
    model, vocab, record = load_model(out / "best.pt")
    assert record["train_config"]["steps"] == 6
    assert vocab.unseen_objects  # the full vocabulary (seen + unseen) travels with the weights
    # Training changed the trainable weights and left the frozen ViT alone.
    fresh = load_model(out / "last.pt")[0]
    from partclipseg.model import build_model
    torch.manual_seed(0)
    init = build_model("micro").state_dict()
    trained = fresh.state_dict()
    assert not torch.equal(init["film.mul.weight"], trained["film.mul.weight"])
    assert torch.equal(init["vit.blocks.0.mlp.c_fc.weight"], trained["vit.blocks.0.mlp.c_fc.weight"])


SYNTHPARTS_RECIPE = {"stage2_classes": "present", "stage2_negatives": 2,
                     "loss": LossConfig(kind="softmax", background_weight=1.0, class_balance=0.5)}


@pytest.mark.parametrize("recipe", [{}, SYNTHPARTS_RECIPE], ids=["paper", "synthparts"])
def test_resume_reproduces_an_uninterrupted_run(synth_root, tmp_path, recipe):
    """stop_at + resume: bit-identical weights, optimizer state and metrics to one straight run.

    Data order and augmentation depend on (seed, epoch, index) only, stage-2 negatives on
    (seed, step), and last.pt holds the optimizer, scheduler, step and RNG state, so nothing
    differs: we require exact equality (for the paper's recipe and the SynthParts one).
    """
    cfg = micro_config(synth_root, **recipe)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg, straight, progress=False)
    train(cfg, split, progress=False, stop_at=2)  # mid-epoch (4 batches per epoch)
    assert load_checkpoint(split / "last.pt")["step"] == 2
    assert not (split / "best.pt").exists()  # no evaluation yet at step 2
    train(cfg, split, progress=False, resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["metrics"] == b["metrics"]
    # The resumed run's log has each step once (rows after last.pt would be dropped).
    steps = [int(r[2]) for r in _csv_rows(split / "metrics.csv")[1:] if r[0] == "loss"]
    assert steps == list(range(1, 7))


def test_fresh_run_refuses_an_existing_run_unless_overwrite(synth_root, tmp_path):
    cfg = micro_config(synth_root, steps=1, eval_every=1)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, out, progress=False)
    assert (out / "last.pt").read_bytes() == before
    train(cfg.replace(seed=1), out, progress=False, overwrite=True)
    rows = _csv_rows(out / "metrics.csv")
    assert [r[2] for r in rows[1:] if r[0] == "loss"] == ["1"]  # the old run's rows are gone


def test_resume_without_last_checkpoint_writes_nothing(tmp_path):
    root, out = tmp_path / "data", tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="last.pt"):
        train(TrainConfig(model="tiny", data=DataConfig(root=str(root))), out, resume=True)
    assert not root.exists() and not out.exists()  # no dataset generated, no run folder


def test_ddp_shards_partition_each_global_batch():
    n, world, batch = 22, 2, 4
    single = epoch_indices(n, seed=3, epoch=1)
    shards = [epoch_indices(n, seed=3, epoch=1, rank=r, world=world) for r in range(world)]
    assert len(set(shards[0]) | set(shards[1])) == len(shards[0]) + len(shards[1])
    local = batch // world
    for b in range(len(shards[0]) // local):
        union = sorted(int(i) for s in shards for i in s[b * local:(b + 1) * local])
        assert union == sorted(single[b * batch:(b + 1) * batch].tolist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process(synth_root, tmp_path):
    """torchrun, 2 CPU (gloo) ranks x local batch 2 == 1 process x batch 4, to float tolerance.

    Ranks see different numbers of valid pixels and objects; the trainer normalizes every mean
    by the global count, so the all-reduced gradient is the one-process gradient exactly
    (up to summation order). A control run on one rank's half batch must differ by far more:
    that is what shows the gradients were synchronized.
    """
    cfg = micro_config(synth_root, steps=4, eval_every=4, lr=1e-4, warmup_steps=0)
    cfg_path = tmp_path / "micro.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "partclipseg.cli", "train", "--config", str(cfg_path), "--out", str(ddp_out),
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in ddp_out.iterdir()) == [
        "best.pt", "config.json", "last.pt", "metrics.csv"]  # one writer, no stray files

    torch.set_num_threads(1)
    try:
        train(cfg, tmp_path / "single", progress=False)
        train(cfg.replace(batch_size=2), tmp_path / "half", progress=False)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    d, s, h = (_weights(tmp_path / n / "last.pt") for n in ("ddp", "single", "half"))
    diff = max(float((d[k] - s[k]).abs().max()) for k in d)
    control = max(float((h[k] - s[k]).abs().max()) for k in h)
    assert diff < 2e-5, diff
    assert control > 50 * max(diff, 1e-7), (control, diff)


# -- configs -------------------------------------------------------------------------------------
SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_the_expected_configs_are_shipped():
    assert {"synthparts_tiny.yaml", "synthparts_vitb16.yaml", "pascal_part_116.yaml",
            "ade20k_part_234.yaml", "partimagenet.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_names_a_model(name):
    from partclipseg.config import load_model_config

    cfg = load_train_config(name)
    model_cfg = load_model_config(cfg.model, **dict(cfg.model_overrides))
    assert cfg.batch_size > 0 and cfg.steps > 0
    assert model_cfg.mode == "partclipseg"
    assert load_train_config(CONFIG_DIR / name) == cfg


@pytest.mark.parametrize("name", ["pascal_part_116", "ade20k_part_234", "partimagenet"])
def test_real_dataset_configs_use_the_paper_recipe(name):
    from partclipseg.config import load_model_config

    cfg = load_train_config(name)
    assert (cfg.lr, cfg.weight_decay, cfg.poly_power, cfg.steps, cfg.batch_size,
            cfg.grad_clip) == (1e-4, 1e-4, 0.9, 20_000, 8, 0.01)
    assert cfg.data.kind == name
    assert cfg.loss == LossConfig()  # L_os + L_obj + L_part + 0.1 L_sep + 0.01 L_enh
    m = load_model_config(cfg.model, **dict(cfg.model_overrides))
    assert (m.clip_name, m.pretrained, m.image_size, m.extract_layers) == (
        "ViT-B-16", "openai", 352, (3, 6, 9))


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": "1e-4"}, "write 1.0e-4"),
    ({"eval_setting": "oracle"}, "eval_setting"),
    ({"data": {"val_limit": 0}}, "val_limit"),
    ({"stepz": 5}, "unknown keys"),
    ({"stage2_classes": "some"}, "stage2_classes"),
    ({"stage2_negatives": -1}, "stage2_negatives"),
    ({"loss": {"kind": "focal"}}, "loss.kind"),
])
def test_bad_train_configs_are_refused_clearly(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(bad)


def test_training_starts_from_an_init_checkpoint(tmp_path, torch, vocab):
    """`init:` (e.g. import-weights output) seeds the model with that checkpoint's weights."""
    from partclipseg.checkpoint import save_checkpoint
    from partclipseg.model import build_model
    from partclipseg.training.config import TrainConfig
    from partclipseg.training.trainer import _initial_model

    torch.manual_seed(5)
    src = build_model("tiny")
    init = save_checkpoint(tmp_path / "init.pt", src, vocab)
    model = _initial_model(TrainConfig(model="tiny", init=str(init)))
    for (n, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    model = _initial_model(TrainConfig(model="tiny", init=str(init),
                                       model_overrides={"adapters": False}))
    assert model.adapters is None


@pytest.mark.parametrize("mode", ["partclipseg", "clipseg"])
def test_head_prior_starts_every_mask_head_at_the_class_prior(torch, mode):
    """Model option head_prior p: every mask head's output bias is logit(p); nothing else
    changes."""
    from partclipseg.config import load_model_config
    from partclipseg.model import build_model
    from partclipseg.training.config import TrainConfig
    from partclipseg.training.trainer import _initial_model

    with pytest.raises(ConfigError, match="head_prior"):
        load_model_config("tiny", head_prior=1.0)
    cfg = TrainConfig(model="tiny", model_overrides={"mode": mode, "head_prior": 0.01})
    torch.manual_seed(0)
    model = _initial_model(cfg)
    torch.manual_seed(0)
    plain = build_model("tiny", mode=mode)
    heads = [n for n, _ in model.named_parameters() if n.endswith("up2.bias")]
    assert len(heads) == (2 if mode == "partclipseg" else 1)
    for (n, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        if n in heads:
            assert torch.sigmoid(a).item() == pytest.approx(0.01, rel=1e-5)
        else:
            assert torch.equal(a, b), n


def test_image_tower_trains_at_its_own_learning_rate(torch):
    from partclipseg.model import build_model
    from partclipseg.training.trainer import param_groups

    frozen = param_groups(build_model("micro"), 1e-4, lr=1e-3, vision_lr_scale=0.1)
    assert all("lr" not in g for g in frozen)  # a frozen tower has no parameters to schedule
    model = build_model("micro", train_vision=True)
    groups = param_groups(model, 1e-4, lr=1e-3, vision_lr_scale=0.1)
    vit = {id(p) for p in model.vit.parameters()}
    for g in groups:
        in_vit = {id(p) in vit for p in g["params"]}
        assert len(in_vit) == 1  # no group mixes tower and decoder
        assert g.get("lr", 1e-3) == (1e-4 if in_vit == {True} else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


def test_recipe_sweep_variants_are_valid_configs(tmp_path):
    """Every variant of `benchmarks.experiments.recipe_sweep` resolves to a training and a model
    config."""
    from benchmarks.experiments.recipe_sweep import VARIANTS, _config
    from partclipseg.config import load_model_config

    for name, overrides in VARIANTS.items():
        cfg = _config("synthparts_tiny", tmp_path, overrides, "cpu")
        model = load_model_config(cfg.model, **dict(cfg.model_overrides))
        assert cfg.data.root == str(tmp_path) and cfg.data.val_limit is None, name
        if any("patch_size" in o for o in overrides):
            assert model.grid_size == 20, name
    assert _config("synthparts_tiny", tmp_path, ["steps=3200"], "cpu", steps=8).steps == 8


def test_method_experiment_variants_differ_only_where_named(tmp_path):
    """`benchmarks.experiments.method` builds each variant from the same base by overrides."""
    import argparse

    from benchmarks.experiments.method import VARIANTS, _config

    args = argparse.Namespace(config="synthparts_tiny", data=tmp_path, num_workers=0, steps=40,
                              device="cpu", set=["lr=1.0e-3"])
    cfgs = {v: _config(args, v, seed=3) for v in VARIANTS}
    base = cfgs["partclipseg"]
    assert (base.steps, base.lr, base.seed, base.data.root) == (40, 1e-3, 3, str(tmp_path))
    assert cfgs["clipseg"].model_overrides["mode"] == "clipseg"
    assert cfgs["partclipseg_no_sep"].loss.sep == 0 and cfgs["partclipseg_no_sep"].loss.enh > 0
    assert cfgs["partclipseg_no_enh"].loss.enh == 0 and cfgs["partclipseg_no_enh"].loss.sep > 0
    assert cfgs["clipseg"].replace(model_overrides=base.model_overrides) == base


def test_overrides_reach_every_section_and_are_validated():
    from partclipseg.training.config import apply_overrides, load_train_config

    cfg = load_train_config("synthparts_tiny")
    out = apply_overrides(cfg, ["steps=12", "loss.obj=3", "data.val_limit=null",
                                "model_overrides.conv_branch=16", "scale_range=[0.5, 1.5]",
                                'data.root="a=b"'])
    assert (out.steps, out.loss.obj, out.data.val_limit, out.scale_range) == (12, 3, None,
                                                                             (0.5, 1.5))
    assert out.model_overrides["conv_branch"] == 16 and out.data.root == "a=b"
    assert apply_overrides(cfg, []) == cfg
    for bad, match in [(["steps"], "not KEY=VALUE"), (["=3"], "not KEY=VALUE"),
                       (["loss.nope=1"], "unknown keys in loss"), (["lr=[1"], "not valid YAML"),
                       (["steps.x=1"], "'steps' is not a section"), (["steps=0"], "steps")]:
        with pytest.raises(ConfigError, match=match):
            apply_overrides(cfg, bad)
