"""Tower pretraining (`partclipseg pretrain`): the zero-shot rules, the targets, the loss, and
loading the written towers into a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from partclipseg.config import ConfigError, load_model_config
from partclipseg.data.synthparts import SYNTHPARTS_VOCABULARY, render_sample
from partclipseg.model import build_model
from partclipseg.training.pretrain import (NameSets, PretrainConfig, pretrain, pretrain_loss,
                                           render_seen_set, token_targets)


def test_no_unseen_object_name_is_ever_tokenized():
    names = NameSets.synthparts()
    v = SYNTHPARTS_VOCABULARY
    assert v.unseen_objects and not v.unseen_objects & set(names.all_names())
    seen_words = {w for o in v.objects if o not in v.unseen_objects for w in o.split()}
    for name in (*names.colours, *names.plans):
        assert name in seen_words
    assert set(names.objects) == set(v.objects) - v.unseen_objects
    assert (names.object_of[[v.objects.index(o) for o in v.unseen_objects]] == -1).all()


def test_seen_set_holds_seen_objects_only():
    names = NameSets.synthparts()
    data = render_seen_set(12, seed=3, size=48, names=names, progress=False)
    assert data["image"].shape == (12, 48, 48, 3) and data["image"].dtype == np.uint8
    present = np.unique(data["obj"][data["obj"] != 255])
    assert len(present) and (names.object_of[present] >= 0).all()
    # every object pixel has a part label of its own object
    v = SYNTHPARTS_VOCABULARY
    on = data["part"] != 255
    assert (np.asarray(v.class_objects)[data["part"][on]] == data["obj"][on]).all()


def test_render_sample_objects_argument():
    _, _, obj = render_sample(0, "pretrain", 5, 48, objects=[4, 4])
    assert set(np.unique(obj)) <= {4, 255} and (obj == 4).any()
    for bad in ([], [16], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match="objects must be"):
            render_sample(0, "pretrain", 5, 48, objects=bad)
    # the default draw is unchanged by the new argument
    a = render_sample(0, "train", 7, 48)
    b = render_sample(0, "train", 7, 48, objects=None)
    assert all((x == y).all() for x, y in zip(a, b))


def test_token_targets_are_pixel_shares():
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2, :2] = 0          # token (0, 0): all class 0 -> name 1
    labels[0, :2, 2:] = 1          # token (0, 1): half class 1 -> name 0, half unnamed (-1)
    labels[0, :2, 3] = 255
    lookup = torch.tensor([1, -1])  # class 1 has no name: counts as background
    t = token_targets(labels, lookup, classes=2, grid=2)
    assert t.shape == (1, 4, 3)
    torch.testing.assert_close(t.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(t[0, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(t[0, 1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(t[0, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_pretrain_loss_is_soft_cross_entropy_and_trains_both_sides():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    text = torch.randn(2 + 1 + 1, 8, generator=g, requires_grad=True)  # sets of 2 and 1, + bg
    targets = [torch.softmax(torch.randn(2, 3, 3, generator=g), -1),
               torch.softmax(torch.randn(2, 3, 2, generator=g), -1)]
    scale = torch.tensor(5.0)
    loss = pretrain_loss(tokens, text, scale, targets, [2, 1])
    tn = torch.nn.functional.normalize(tokens, dim=-1)
    te = torch.nn.functional.normalize(text, dim=-1)
    ref = []
    for tg, rows in zip(targets, ([0, 1, 3], [2, 3])):
        logp = (scale * tn @ te[rows].T).log_softmax(-1)
        ref.append(-(tg * logp).sum(-1).mean())
    torch.testing.assert_close(loss, torch.stack(ref).mean())
    loss.backward()
    assert tokens.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, dict]:
    cfg = load_model_config("tiny", image_size=48)
    out = tmp_path_factory.mktemp("pre") / "towers.pt"
    summary = pretrain(cfg, PretrainConfig(steps=3, batch_size=4, images=8, warmup_steps=1),
                       out, progress=False)
    return out, summary


def test_pretrain_writes_float16_towers_and_a_summary(towers):
    path, summary = towers
    record = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in record["state_dict"].values()
               if v.is_floating_point())
    assert summary["config"]["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert set(summary["held_out_named_token_accuracy"]) == {"objects", "parts", "colours",
                                                             "plans"}


def test_model_built_on_pretrained_towers_carries_them(towers):
    path, _ = towers
    state = torch.load(path, weights_only=True)["state_dict"]
    model = build_model("tiny", image_size=48, pretrained=str(path))
    fresh = build_model("tiny", image_size=48)
    text_w = state["transformer.resblocks.0.attn.in_proj_weight"].float()
    torch.testing.assert_close(
        model.text.transformer.resblocks[0].attn.in_proj_weight.detach(), text_w)
    vis_w = state["visual.transformer.resblocks.2.mlp.c_fc.weight"].float()
    torch.testing.assert_close(model.vit.blocks[2].mlp.c_fc.weight.detach(), vis_w)
    assert not torch.equal(fresh.vit.blocks[2].mlp.c_fc.weight, vis_w)


def test_pretrained_towers_errors(towers, tmp_path):
    path, _ = towers
    with pytest.raises(ConfigError, match="partclipseg pretrain --out"):
        build_model("tiny", pretrained=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a `partclipseg pretrain` file"):
        build_model("tiny", pretrained=str(bad))
    with pytest.raises(ConfigError, match="another shape"):
        build_model("tiny", pretrained=str(path), embed_dim=64)


def test_pretrain_loss_weights_leave_images_out():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 4, 8, generator=g)
    text = torch.randn(3, 8, generator=g)
    target = [torch.softmax(torch.randn(3, 4, 3, generator=g), -1)]
    scale = torch.tensor(3.0)
    weighted = pretrain_loss(tokens, text, scale, target, [2], [torch.tensor([1.0, 0.0, 1.0])])
    kept = pretrain_loss(tokens[[0, 2]], text, scale, [target[0][[0, 2]]], [2])
    torch.testing.assert_close(weighted, kept)


def test_pretrain_config_and_name_sets():
    names = NameSets.synthparts()
    words = names.all_names(("colours", "plans"))
    assert words == [*names.colours, *names.plans, "background"]
    assert not set(names.objects) & set(words)
    for bad in (dict(sets=()), dict(sets=("objects", "shapes")), dict(grey=1.0)):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)


def test_grey_images_train_only_colour_free_sets(tmp_path):
    cfg = load_model_config("tiny", image_size=48)
    summary = pretrain(cfg, PretrainConfig(steps=2, batch_size=4, images=8, warmup_steps=1,
                                           sets=("parts", "colours", "plans"), grey=0.5),
                       tmp_path / "t.pt", progress=False)
    assert summary["names"] == NameSets.synthparts().all_names(("parts", "colours", "plans"))
    assert set(summary["held_out_named_token_accuracy"]) == {"parts", "colours", "plans"}


def test_the_shipped_towers_follow_the_rules_and_load_into_the_demo_model():
    """partclipseg/weights/synthparts_tiny_grey.pt, which the demo config names: written by the
    documented command (seen-only names, half the images grey), <= 20 MB, loadable by name."""
    from partclipseg.model.backbone import WEIGHTS_DIR
    from partclipseg.training.config import load_train_config

    cfg = load_train_config("synthparts_tiny")
    name = cfg.model_overrides["pretrained"]
    path = WEIGHTS_DIR / name
    assert path.is_file() and path.stat().st_size <= 20 * 2 ** 20
    record = torch.load(path, weights_only=True)
    run = record["pretrain"]
    assert tuple(run["config"]["sets"]) == ("parts", "colours", "plans")
    assert run["config"]["grey"] == 0.5
    assert record["model_config"]["name"] == cfg.model == "tiny"
    v = SYNTHPARTS_VOCABULARY
    assert not v.unseen_objects & set(run["names"])
    model = build_model(cfg.model, **cfg.model_overrides)  # resolves the name in WEIGHTS_DIR
    w = record["state_dict"]["visual.transformer.resblocks.0.mlp.c_fc.weight"].float()
    torch.testing.assert_close(model.vit.blocks[0].mlp.c_fc.weight.detach(), w)
