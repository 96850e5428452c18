"""Loader tests on tiny fixtures written in the real on-disk formats."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.io import IGNORE_LABEL
from partclipseg.data.datasets import (
    DatasetError,
    OVPartsDataset,
    decode_rle,
    load_dataset,
    rasterize_polygons,
    segmentation_to_mask,
)
from partclipseg.data.vocabularies import (
    ADE20K_PART_234,
    ADE20K_PART_234_OBJ_CLASS_NAMES,
    PARTIMAGENET,
    PASCAL_PART_116,
    PASCAL_PART_116_OBJ_CLASS_NAMES,
)
from runtime.vocabulary import Vocabulary

H, W = 6, 8


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def write_rgb(path, h=H, w=W, ext_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    Image.fromarray(arr).save(path, format=ext_format)


def write_u8(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def write_u16(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, dtype=np.uint16))
    im.save(path)
    with Image.open(path) as check:  # really a 16-bit PNG
        assert check.mode.startswith("I")


def rle_encode(mask):
    """Compressed COCO RLE (pycocotools rleToString), written independently for the tests."""
    flat = np.asarray(mask, dtype=np.uint8).T.reshape(-1)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [mask.shape[0], mask.shape[1]], "counts": "".join(out)}


# ---------------------------------------------------------------------------------------------
# Pascal-Part-116
# ---------------------------------------------------------------------------------------------
AERO = PASCAL_PART_116_OBJ_CLASS_NAMES.index("aeroplane")     # 0
BOAT = PASCAL_PART_116_OBJ_CLASS_NAMES.index("boat")          # 3, no part classes
PERSON = PASCAL_PART_116_OBJ_CLASS_NAMES.index("person")      # 14
AERO_BODY = PASCAL_PART_116.index("aeroplane's body")
AERO_WING = PASCAL_PART_116.index("aeroplane's wing")
PERSON_HEAD = PASCAL_PART_116.index("person's head")


def pascal_arrays():
    obj = np.full((H, W), 255, np.uint8)
    obj[:, :3] = AERO
    obj[:, 3:5] = PERSON
    obj[:2, 5:] = BOAT
    part = np.full((H, W), 255, np.uint8)
    part[:3, :3] = AERO_BODY
    part[3:, :2] = AERO_WING          # column 2 of rows 3.. stays unlabeled
    part[:, 3:5] = PERSON_HEAD
    return part, obj


@pytest.fixture()
def pascal_root(tmp_path):
    root = tmp_path / "PascalPart116"
    part, obj = pascal_arrays()
    for split in ("train", "val"):
        for stem in ("2008_000001", "2008_000002"):
            write_rgb(root / "images" / split / f"{stem}.jpg")
            write_u8(root / "annotations_detectron2_part" / split / f"{stem}.png", part)
            write_u8(root / "annotations_detectron2_obj" / split / f"{stem}.png", obj)
    return root


def test_pascal_per_image(pascal_root):
    ds = load_dataset("pascal_part_116", pascal_root, "train")
    assert ds.vocabulary is PASCAL_PART_116 and len(ds) == 2 and not ds.per_object
    s = ds[0]
    part, obj = pascal_arrays()
    assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
    assert s["part"].dtype == np.int64 and s["object"].dtype == np.int64
    assert np.array_equal(s["part"], part.astype(np.int64))
    v = PASCAL_PART_116
    assert (s["object"][:, :3] == v.object_index("aeroplane")).all()
    assert (s["object"][:, 3:5] == v.object_index("person")).all()
    assert (s["object"][:2, 5:] == IGNORE_LABEL).all()  # boat has no parts: not in the vocabulary
    assert s["name"] == "2008_000001"
    assert ds[-1]["name"] == "2008_000002"
    with pytest.raises(IndexError):
        ds[2]


def test_pascal_per_object_eval_samples(pascal_root, tmp_path):
    ds = load_dataset("Pascal-Part-116", tmp_path, "val")  # parent folder, loose kind spelling
    assert ds.per_object and ds.root == pascal_root
    names = [r.name for r in ds.samples]
    assert names == ["2008_000001#aeroplane", "2008_000001#person",
                     "2008_000002#aeroplane", "2008_000002#person"]
    s = ds[1]  # person only
    assert set(np.unique(s["part"])) == {PERSON_HEAD, IGNORE_LABEL}
    assert (s["part"][:, 3:5] == PERSON_HEAD).all()
    assert set(np.unique(s["object"])) == {PASCAL_PART_116.object_index("person"), IGNORE_LABEL}
    # the OV-PARTS label-count file gives the same samples
    counts = {"2008_000001.png": [AERO, BOAT, PERSON], "2008_000002.png": [AERO, BOAT, PERSON]}
    (pascal_root / "annotations_detectron2_part" / "val_obj_label_count.json").write_text(json.dumps(counts))
    ds2 = load_dataset("pascal_part_116", pascal_root, "val")
    assert [r.name for r in ds2.samples] == names
    assert np.array_equal(ds2[0]["part"], ds[0]["part"])


def test_pascal_errors(pascal_root):
    bad = np.full((H, W), 255, np.uint8)
    bad[0, 0] = 200
    p = pascal_root / "annotations_detectron2_part" / "train" / "2008_000002.png"
    write_u8(p, bad)
    ds = load_dataset("pascal_part_116", pascal_root, "train")
    with pytest.raises(DatasetError, match=r"2008_000002\.png.*200.*116"):
        ds[1]
    write_u8(p, np.full((H + 1, W), 255))
    with pytest.raises(DatasetError, match="size mismatch"):
        ds[1]
    bad_obj = np.full((H, W), 255, np.uint8)
    bad_obj[1, 1] = 42
    write_u8(pascal_root / "annotations_detectron2_obj" / "train" / "2008_000001.png", bad_obj)
    with pytest.raises(DatasetError, match=r"42.*20 object"):
        ds[0]


def test_missing_folder_errors(pascal_root, tmp_path):
    import shutil
    shutil.rmtree(pascal_root / "annotations_detectron2_obj" / "val")
    with pytest.raises(DatasetError, match="annotations_detectron2_obj"):
        load_dataset("pascal_part_116", pascal_root, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("pascal_part_116", tmp_path / "nowhere", "val")
    with pytest.raises(DatasetError, match="images"):
        load_dataset("pascal_part_116", tmp_path / "PascalPart116", "test")
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        load_dataset("cityscapes", pascal_root, "val")


# ---------------------------------------------------------------------------------------------
# ADE20K-Part-234
# ---------------------------------------------------------------------------------------------
CHAIR = ADE20K_PART_234_OBJ_CLASS_NAMES.index("chair")
BUS = ADE20K_PART_234_OBJ_CLASS_NAMES.index("bus")          # unseen
CHAIR_LEG = ADE20K_PART_234.index("chair's leg")
BUS_WHEEL = ADE20K_PART_234.index("bus's wheel")
LIGHT_SHADE = ADE20K_PART_234.index("light's shade")        # 233, the last class


def ade_part():
    part = np.full((H, W), 65535, np.uint16)
    part[:4, :4] = CHAIR_LEG
    part[:, 4:] = BUS_WHEEL
    part[5, 0] = LIGHT_SHADE
    return part


def write_ade_split(root, split, sub, images):
    coco = {"images": [], "annotations": [], "categories": []}
    ann_id = 1
    for img_id, (stem, anns) in enumerate(images, start=1):
        write_rgb(root / "images" / sub / f"{stem}.jpg")
        write_u16(root / "annotations_detectron2_part" / sub / f"{stem}.png", ade_part())
        coco["images"].append({"id": img_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
        for cat, segm in anns:
            coco["annotations"].append({"id": ann_id, "image_id": img_id, "category_id": cat,
                                        "segmentation": segm, "iscrowd": 0})
            ann_id += 1
    (root / f"ade20k_instance_{split}.json").write_text(json.dumps(coco))


@pytest.fixture()
def ade_root(tmp_path):
    root = tmp_path / "ADE20KPart234"
    chair_poly = [[0, 0, 4, 0, 4, 4, 0, 4]]                 # pixels rows 0..3, cols 0..3
    bus_mask = np.zeros((H, W), bool)
    bus_mask[:, 4:] = True
    write_ade_split(root, "val", "validation", [
        ("ADE_val_00000001", [(CHAIR, chair_poly), (BUS, rle_encode(bus_mask))]),
    ])
    uncompressed = {"size": [H, W], "counts": [4 * H, H * 4]}  # column-major: cols 4.. set
    write_ade_split(root, "train", "training", [
        ("ADE_train_00000001", [(CHAIR, chair_poly), (BUS, uncompressed)]),
    ])
    return root


def test_ade_per_image_16bit(ade_root):
    ds = load_dataset("ade20k_part_234", ade_root, "train")
    assert len(ds) == 1 and ds.vocabulary is ADE20K_PART_234
    s = ds[0]
    want = ade_part().astype(np.int64)
    want[want == 65535] = IGNORE_LABEL
    assert np.array_equal(s["part"], want)
    assert s["part"].max() == IGNORE_LABEL and (s["part"] == LIGHT_SHADE).sum() == 1
    obj = s["object"]
    assert (obj[:4, :4] == ADE20K_PART_234.object_index("chair")).all()
    assert (obj[:, 4:] == ADE20K_PART_234.object_index("bus")).all()
    assert (obj[4:, :4] == IGNORE_LABEL).all()


def test_ade_val_per_instance_includes_train_unseen(ade_root):
    ds = load_dataset("ade20k_part_234", ade_root, "val")
    names = [r.name for r in ds.samples]
    assert names == ["ADE_val_00000001#chair#1", "ADE_val_00000001#bus#2",
                     "ADE_train_00000001#bus#2"]
    chair = ds[0]
    assert set(np.unique(chair["part"])) == {CHAIR_LEG, IGNORE_LABEL}
    assert (chair["part"][:4, :4] == CHAIR_LEG).all()
    bus = ds[2]
    assert (bus["part"][:, 4:] == BUS_WHEEL).all() and (bus["part"][:, :4] == IGNORE_LABEL).all()
    only_val = load_dataset("ade20k_part_234", ade_root, "val", ade_val_with_train_unseen=False)
    assert len(only_val) == 2


def test_ade_out_of_range_16bit_label(ade_root):
    bad = ade_part()
    bad[0, 0] = 300
    write_u16(ade_root / "annotations_detectron2_part" / "training" / "ADE_train_00000001.png", bad)
    ds = load_dataset("ade20k_part_234", ade_root, "train")
    with pytest.raises(DatasetError, match=r"ADE_train_00000001\.png.*300.*234"):
        ds[0]


def test_ade_missing_json(ade_root):
    (ade_root / "ade20k_instance_train.json").unlink()
    with pytest.raises(DatasetError, match="ade20k_instance_train.json"):
        load_dataset("ade20k_part_234", ade_root, "train")
    with pytest.raises(DatasetError, match="ade_val_with_train_unseen"):
        load_dataset("ade20k_part_234", ade_root, "val")


# ---------------------------------------------------------------------------------------------
# PartImageNet
# ---------------------------------------------------------------------------------------------
def write_partimagenet(root, categories, split="val"):
    write_rgb(root / "images" / split / "n01440764_10029.JPEG", ext_format="JPEG")
    coco = {
        "images": [{"id": 7, "file_name": "n01440764_10029.JPEG", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 10, "iscrowd": 0,   # Fish Body
             "segmentation": [[1, 1, 7, 1, 7, 5, 1, 5]]},
            {"id": 2, "image_id": 7, "category_id": 9, "iscrowd": 0,    # Fish Head, drawn on top
             "segmentation": [[5, 1, 7, 1, 7, 5, 5, 5]]},
        ],
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))


def test_partimagenet_from_coco_json(tmp_path):
    cats = [{"id": 9, "name": "Fish Head", "supercategory": "Fish"},
            {"id": 10, "name": "Fish Body", "supercategory": "Fish"},
            {"id": 26, "name": "Car Side Mirror", "supercategory": "Car"}]
    root = tmp_path / "PartImageNet"
    write_partimagenet(root, cats)
    ds = load_dataset("partimagenet", root, "val")
    assert ds.vocabulary.class_names == ("fish's head", "fish's body", "car's side mirror")
    s = ds[0]
    head, body = ds.vocabulary.index("fish's head"), ds.vocabulary.index("fish's body")
    want = np.full((H, W), IGNORE_LABEL)
    want[1:5, 1:7] = body
    want[1:5, 5:7] = head
    assert np.array_equal(s["part"], want)
    fish = ds.vocabulary.object_index("fish")
    assert np.array_equal(s["object"], np.where(want != IGNORE_LABEL, fish, IGNORE_LABEL))
    assert s["name"] == "n01440764_10029"


def test_partimagenet_partclipseg_json_falls_back_to_official_categories(tmp_path):
    # PartCLIPSeg's preprocessing overwrites `categories` with its object-specific class map
    cats = [{"id": 0, "name": "impala's head", "superclass": "Quadruped"}]
    write_partimagenet(tmp_path, cats)
    ds = load_dataset("partimagenet", tmp_path, "val")
    assert ds.vocabulary == PARTIMAGENET and ds.vocabulary.num_classes == 40
    s = ds[0]
    assert (s["part"] == PARTIMAGENET.index("fish's head")).sum() == 8


# ---------------------------------------------------------------------------------------------
# SynthParts
# ---------------------------------------------------------------------------------------------
def test_synthparts_roundtrip_and_pickle(tmp_path):
    vocab = Vocabulary.from_names([("red quadruped", "head"), ("red quadruped", "leg"),
                                   ("blue bird", "head"), ("blue bird", "wing")],
                                  unseen_objects=["blue bird"])
    root = tmp_path / "synth"
    meta = {"dataset": "SynthParts", "format_version": 1, "seed": 0, "vocabulary": vocab.to_dict()}
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(meta))
    part = np.full((H, W), 255, np.uint8)
    obj = np.full((H, W), 255, np.uint8)
    part[:3, :3], part[3:, :3], obj[:, :3] = 0, 1, 0
    part[:, 5:], obj[:, 5:] = 3, 1
    for split in ("train", "val"):
        write_rgb(root / "images" / split / "000000.png", ext_format="PNG")
        write_u8(root / "annotations_detectron2_part" / split / "000000.png", part)
        write_u8(root / "annotations_detectron2_obj" / split / "000000.png", obj)
    ds = load_dataset("synthparts", root, "train")
    assert ds.vocabulary == vocab and len(ds) == 1
    s = ds[0]
    assert np.array_equal(s["part"], part.astype(np.int64))
    assert np.array_equal(s["object"], obj.astype(np.int64))
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[0]["part"], s["part"]) and clone.split == "train"
    val = load_dataset("synthparts", root, "val")
    assert [r.name for r in val.samples] == ["000000#red quadruped", "000000#blue bird"]
    assert set(np.unique(val[1]["part"])) == {3, IGNORE_LABEL}
    # errors: out-of-range part label, bad classes.json
    part[0, 0] = 4
    write_u8(root / "annotations_detectron2_part" / "train" / "000000.png", part)
    with pytest.raises(DatasetError, match=r"000000\.png.*\b4\b.*4 part classes"):
        ds[0]
    (root / "classes.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(DatasetError, match="format_version"):
        OVPartsDataset("synthparts", root, "train")
    (root / "classes.json").unlink()
    with pytest.raises(DatasetError, match="classes.json"):
        OVPartsDataset("synthparts", root, "train")


# ---------------------------------------------------------------------------------------------
# COCO segmentation decoding
# ---------------------------------------------------------------------------------------------
def test_polygon_square_area_matches_coco_convention():
    m = rasterize_polygons([[2, 2, 12, 2, 12, 12, 2, 12]], 16, 16)
    assert m.sum() == 100 and m[2:12, 2:12].all()
    assert segmentation_to_mask([2, 2, 12, 2, 12, 12], 16, 16).sum() > 0  # flat polygon accepted


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.tuples(st.floats(-2, 12), st.floats(-2, 10)), min_size=3, max_size=6))
def test_polygon_matches_pixel_center_test(points):
    h, w = 8, 10
    flat = [c for p in points for c in p]
    got = rasterize_polygons([flat], h, w)
    # independent even-odd point-in-polygon test at every pixel centre
    want = np.zeros((h, w), bool)
    n = len(points)
    for i in range(h):
        for j in range(w):
            x, y = j + 0.5, i + 0.5
            inside = False
            for k in range(n):
                (xa, ya), (xb, yb) = points[k], points[(k + 1) % n]
                if (ya <= y < yb) or (yb <= y < ya):
                    xc = xa + (y - ya) * (xb - xa) / (yb - ya)
                    if x >= xc:
                        inside = not inside
            want[i, j] = inside
    assert np.array_equal(got, want)


@settings(max_examples=30, deadline=None, database=None)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_rle_roundtrip(h, w, data):
    bits = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    mask = np.array(bits, bool).reshape(h, w)
    assert np.array_equal(decode_rle(rle_encode(mask)), mask)


def test_rle_bad_counts():
    with pytest.raises(DatasetError, match="h\\*w"):
        decode_rle({"size": [2, 2], "counts": [1, 1]})
