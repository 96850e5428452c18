"""SynthParts generator: determinism, vocabulary, label consistency, on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from partclipseg.data.synthparts import (
    BODY_PLANS, COLOURS, SYNTHPARTS_VOCABULARY as V, generate, render_sample,
)
from runtime.vocabulary import Vocabulary

SMALL = 64  # image size for on-disk tests: keeps them fast, the geometry is resolution-free


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_arrays_different_seed_different():
    a = render_sample(3, "val", 7)
    b = render_sample(3, "val", 7)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], render_sample(4, "val", 7)[0])
    assert not np.array_equal(a[0], render_sample(3, "train", 7)[0])
    assert not np.array_equal(a[0], render_sample(3, "val", 8)[0])


def test_generate_is_byte_identical_per_seed(tmp_path):
    generate(tmp_path / "a", seed=5, n_train=3, n_val=2, image_size=SMALL, progress=False)
    generate(tmp_path / "b", seed=5, n_train=3, n_val=2, image_size=SMALL, progress=False)
    generate(tmp_path / "c", seed=6, n_train=3, n_val=2, image_size=SMALL, progress=False)
    fa, fb, fc = (_files(tmp_path / d) for d in "abc")
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["images/val/val_000000.jpg"] != fc["images/val/val_000000.jpg"]


# -- vocabulary ----------------------------------------------------------------------------------

def test_vocabulary_facts():
    assert len(V.objects) >= 12
    assert len(V.unseen_objects) >= 4
    assert len(V.parts) >= 10
    seen = [o for o in V.objects if o not in V.unseen_objects]
    seen_colours = {o.split(" ", 1)[0] for o in seen}
    seen_plans = {o.split(" ", 1)[1] for o in seen}
    for o in V.unseen_objects:
        colour, plan = o.split(" ", 1)
        # Compositional: both words of an unseen category were seen in training, never together.
        assert colour in COLOURS and plan in BODY_PLANS
        assert colour in seen_colours and plan in seen_plans
    # Canonical class order: object-major, parts of each object contiguous.
    objs = V.class_objects
    assert list(objs) == sorted(objs)
    assert V.num_classes <= 255  # uint8 PNGs with 255 = ignore
    assert len({len(BODY_PLANS[o.split(" ", 1)[1]].parts) for o in V.objects}) > 1


# -- labels --------------------------------------------------------------------------------------

@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10_000),
       split=st.sampled_from(["train", "val"]), size=st.sampled_from([48, 96, 160]))
def test_labels_consistent(seed, index, split, size):
    img, part, obj = render_sample(seed, split, index, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert part.shape == obj.shape == (size, size)
    assert part.dtype == obj.dtype == np.uint8
    assert np.array_equal(part == 255, obj == 255)
    fg = part != 255
    assert fg.any()
    class_obj = np.asarray(V.class_objects + (255,) * (256 - V.num_classes), np.uint8)
    assert part[fg].max() < V.num_classes
    assert np.array_equal(class_obj[part[fg]], obj[fg])
    # The guaranteed category of this index is visible.
    assert (obj == index % len(V.objects)).any()


def test_small_parts_present_and_every_category_in_val():
    eye_areas, beak_areas, objects_seen = [], [], set()
    eye = {k for k, (_, p) in enumerate(V.classes) if V.parts[p] == "eye"}
    beak = {k for k, (_, p) in enumerate(V.classes) if V.parts[p] == "beak"}
    for i in range(len(V.objects)):
        _, part, obj = render_sample(0, "val", i)
        vals, counts = np.unique(part, return_counts=True)
        eye_areas += [c for v, c in zip(vals, counts) if v in eye]
        beak_areas += [c for v, c in zip(vals, counts) if v in beak]
        objects_seen |= set(np.unique(obj).tolist()) - {255}
    assert objects_seen == set(range(len(V.objects)))
    assert eye_areas and beak_areas
    n_pix = 160 * 160
    assert np.median(eye_areas) < 0.01 * n_pix and np.median(beak_areas) < 0.01 * n_pix


def test_objects_overlap_sometimes():
    # Occlusion must actually happen: objects whose labels touch (one drawn over the other).
    # That the labels then show the visible object is covered by test_labels_consistent.
    touching = 0
    for i in range(40):
        _, _, obj = render_sample(1, "train", i, 96)
        a, b = obj[:, :-1], obj[:, 1:]
        touching += bool(((a != b) & (a != 255) & (b != 255)).any())
    assert touching >= 3


def test_bad_arguments():
    with pytest.raises(ValueError):
        render_sample(-1, "val", 0)
    with pytest.raises(ValueError):
        render_sample(0, "val", -1)
    with pytest.raises(ValueError):
        render_sample(0, "val", 0, image_size=8)


# -- on-disk layout ------------------------------------------------------------------------------

def test_generate_layout_and_classes_json(tmp_path):
    out = generate(tmp_path / "sp", seed=2, n_train=3, n_val=2, image_size=SMALL, progress=False)
    assert out == tmp_path / "sp"
    meta = json.loads((out / "classes.json").read_text())
    assert meta["dataset"] == "SynthParts" and meta["format_version"] == 1
    assert meta["seed"] == 2 and meta["image_size"] == SMALL
    assert meta["splits"] == {"train": 3, "val": 2}
    assert Vocabulary.from_dict(meta["vocabulary"]) == V
    for split, n in meta["splits"].items():
        ids = sorted(p.stem for p in (out / "images" / split).glob("*.jpg"))
        assert len(ids) == n
        for sid in ids:
            img = Image.open(out / "images" / split / f"{sid}.jpg")
            part = Image.open(out / "annotations_detectron2_part" / split / f"{sid}.png")
            obj = Image.open(out / "annotations_detectron2_obj" / split / f"{sid}.png")
            assert img.mode == "RGB" and part.mode == "L" and obj.mode == "L"
            assert img.size == part.size == obj.size == (SMALL, SMALL)
            # PNG labels are lossless copies of what render_sample returns.
            index = int(sid.rsplit("_", 1)[1])
            _, p_ref, o_ref = render_sample(2, split, index, SMALL)
            assert np.array_equal(np.asarray(part), p_ref)
            assert np.array_equal(np.asarray(obj), o_ref)
    assert not [p for p in out.rglob("*.tmp")]


def test_generate_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous SynthParts output"):
        generate(foreign, n_train=1, n_val=1, image_size=SMALL, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_generate_over_previous_output(tmp_path):
    out = tmp_path / "sp"
    generate(out, seed=0, n_train=4, n_val=2, image_size=SMALL, progress=False)
    # Regenerating with fewer images removes the surplus of the old run.
    generate(out, seed=0, n_train=2, n_val=1, image_size=SMALL, progress=False)
    assert len(list((out / "images" / "train").iterdir())) == 2
    assert len(list((out / "annotations_detectron2_part" / "val").iterdir())) == 1
    # An interrupted run (no classes.json yet) is still recognised as ours.
    (out / "classes.json").unlink()
    generate(out, seed=0, n_train=1, n_val=1, image_size=SMALL, progress=False)
    assert (out / "classes.json").is_file()
