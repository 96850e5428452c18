"""Tests of partclipseg.evaluation.metrics against independent, deliberately naive computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partclipseg.evaluation.metrics import (
    PartSegEvaluator,
    boundary_dilation,
    erode,
    format_table,
    harmonic_mean,
    mask_to_boundary,
)

IGN = 255


# ---------------------------------------------------------------------------------------------
# independent reference implementations (sets of pixel coordinates, python loops)
# ---------------------------------------------------------------------------------------------
def ref_iou(preds, gts, k, ignore=IGN):
    """Per-class IoU from sets of (image, row, col) coordinates; None when the union is empty."""
    out = []
    for c in range(k):
        g_set, p_set = set(), set()
        for n, (p, g) in enumerate(zip(preds, gts)):
            for (i, j), gv in np.ndenumerate(g):
                if gv == ignore:
                    continue
                if gv == c:
                    g_set.add((n, i, j))
                if p[i, j] == c:
                    p_set.add((n, i, j))
        union = g_set | p_set
        out.append(len(g_set & p_set) / len(union) if union else None)
    return out


def ref_erode(mask, d):
    """Brute force: a pixel survives iff its whole (2d+1)^2 window lies in the image and the mask."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for i in range(h):
        for j in range(w):
            ok = True
            for di in range(-d, d + 1):
                for dj in range(-d, d + 1):
                    y, x = i + di, j + dj
                    if not (0 <= y < h and 0 <= x < w) or not mask[y, x]:
                        ok = False
            out[i, j] = ok
    return out


def cv2_like_erode(mask, iterations):
    """detectron2's recipe: pad by one zero pixel, erode with a 3x3 kernel n times, crop."""
    m = np.pad(mask.astype(bool), 1)
    for _ in range(iterations):
        p = np.pad(m, 1, constant_values=True)  # cv2's default border never erodes
        acc = np.ones_like(m)
        for di in range(3):
            for dj in range(3):
                acc &= p[di:di + m.shape[0], dj:dj + m.shape[1]]
        m = acc
    return m[1:-1, 1:-1]


def ref_biou(preds, gts, k, ignore=IGN, ratio=0.02):
    inter = [0] * k
    union = [0] * k
    for p, g in zip(preds, gts):
        h, w = g.shape
        d = max(1, int(round(ratio * math.hypot(h, w))))
        valid = g != ignore
        for c in range(k):
            gm = g == c
            pm = (p == c) & valid
            if not gm.any() and not pm.any():
                continue
            bg = gm & ~ref_erode(gm, d)
            bp = pm & ~ref_erode(pm, d)
            bg_set = {tuple(x) for x in np.argwhere(bg)}
            bp_set = {tuple(x) for x in np.argwhere(bp)}
            inter[c] += len(bg_set & bp_set)
            union[c] += len(bg_set | bp_set)
    return [inter[c] / union[c] if union[c] else None for c in range(k)]


def ref_mean(values, select):
    v = [x for x, s in zip(values, select) if s and x is not None]
    return 100.0 * sum(v) / len(v) if v else float("nan")


def close(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol


# ---------------------------------------------------------------------------------------------
# hypothesis cross-check
# ---------------------------------------------------------------------------------------------
@st.composite
def cases(draw):
    k = draw(st.integers(1, 5))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    n = draw(st.integers(1, 3))
    gt_vals = st.sampled_from(list(range(k)) + [IGN])
    pred_vals = st.sampled_from(list(range(k)) + [-1, k, IGN])
    gts, preds = [], []
    for _ in range(n):
        gts.append(np.array(draw(st.lists(gt_vals, min_size=h * w, max_size=h * w))).reshape(h, w))
        preds.append(np.array(draw(st.lists(pred_vals, min_size=h * w, max_size=h * w))).reshape(h, w))
    seen = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return k, preds, gts, seen


@settings(max_examples=60, deadline=None, database=None)
@given(cases())
def test_matches_independent_computation(case):
    k, preds, gts, seen = case
    ev = PartSegEvaluator(k, seen)
    for p, g in zip(preds, gts):
        ev.update(p, g)
    res = ev.compute()
    iou = ref_iou(preds, gts, k)
    biou = ref_biou(preds, gts, k)
    unseen = [not s for s in seen]
    for c in range(k):
        got = res["per_class"][c]["iou"]
        assert close(got, float("nan") if iou[c] is None else 100 * iou[c])
        got_b = res["per_class"][c]["biou"]
        assert close(got_b, float("nan") if biou[c] is None else 100 * biou[c])
    s, u = ref_mean(iou, seen), ref_mean(iou, unseen)
    assert close(res["miou_seen"], s) and close(res["miou_unseen"], u)
    assert close(res["miou_all"], ref_mean(iou, [True] * k))
    if math.isnan(s) or math.isnan(u):
        assert math.isnan(res["h_iou"])
    else:
        assert close(res["h_iou"], 0.0 if s + u == 0 else 2 * s * u / (s + u))
    bs, bu = ref_mean(biou, seen), ref_mean(biou, unseen)
    assert close(res["biou_seen"], bs) and close(res["biou_unseen"], bu)
    assert close(res["biou_h"], harmonic_mean(bs, bu))


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(1, 10), st.integers(1, 10), st.integers(1, 4), st.data())
def test_erode_matches_brute_force_and_cv2_recipe(h, w, d, data):
    bits = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    m = np.array(bits, dtype=bool).reshape(h, w)
    got = erode(m, d)
    assert np.array_equal(got, ref_erode(m, d))
    assert np.array_equal(got, cv2_like_erode(m, d))


def test_batch_update_equals_single_updates():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(3, 7, 5))
    gt[gt == 3] = IGN
    pred = rng.integers(-1, 4, size=(3, 7, 5))
    a, b = PartSegEvaluator(3, [True, False, True]), PartSegEvaluator(3, [True, False, True])
    a.update(pred, gt)
    for p, g in zip(pred, gt):
        b.update(p, g)
    assert np.array_equal(a.confusion, b.confusion)
    assert np.array_equal(a.boundary_union, b.boundary_union)
    c = PartSegEvaluator(3, [True, False, True])
    c.merge(a)
    assert np.array_equal(c.confusion, a.confusion) and c.num_images == 3


# ---------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------
def test_hand_computed_iou_with_other_predictions():
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1]])
    pred = np.array([[0, 255, 1, 1],   # 255 predicted on a labeled pixel: a miss for class 0
                     [0, 0, 0, 1]])
    ev = PartSegEvaluator(2, [True, False], boundary=False)
    ev.update(pred, gt)
    r = ev.compute()
    # class 0: TP 3, GT 4, pred 4 -> union 5; class 1: TP 3, GT 4, pred 3 -> union 4
    assert r["per_class"][0]["iou"] == pytest.approx(60.0)
    assert r["per_class"][1]["iou"] == pytest.approx(75.0)
    assert r["miou_seen"] == pytest.approx(60.0) and r["miou_unseen"] == pytest.approx(75.0)
    assert r["h_iou"] == pytest.approx(2 * 60 * 75 / 135)
    # OV-PARTS' released evaluator leaves the 255 pixel out of class 0's GT count
    ev2 = PartSegEvaluator(2, [True, False], boundary=False, count_other_as_miss=False)
    ev2.update(pred, gt)
    assert ev2.compute()["per_class"][0]["iou"] == pytest.approx(75.0)  # 3 / (3 + 4 - 3)


def test_ignore_pixels_do_not_count():
    gt = np.array([[0, 1, IGN, IGN]])
    a = PartSegEvaluator(3, [True, True, False])
    a.update(np.array([[0, 1, 2, 2]]), gt)
    b = PartSegEvaluator(3, [True, True, False])
    b.update(np.array([[0, 1, 0, 255]]), gt)
    ra, rb = a.compute(), b.compute()
    assert ra["per_class"][:2] == rb["per_class"][:2]
    assert ra["miou_all"] == rb["miou_all"] == 100.0
    # class 2 appears only on ignored pixels: undefined, excluded from the means
    assert math.isnan(ra["per_class"][2]["iou"]) and math.isnan(ra["miou_unseen"])
    assert math.isnan(ra["h_iou"])


def test_class_predicted_but_absent_counts_as_zero():
    ev = PartSegEvaluator(2, [True, True], boundary=False)
    ev.update(np.array([[0, 1]]), np.array([[0, 0]]))
    r = ev.compute()
    assert r["per_class"][1]["iou"] == 0.0
    assert r["miou_seen"] == pytest.approx((50.0 + 0.0) / 2)


def test_h_iou_formula():
    assert harmonic_mean(50.0, 31.7) == pytest.approx(2 * 50.0 * 31.7 / 81.7)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(40.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 10.0))


def test_boundary_iou_perfect_prediction_is_100():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 3, size=(20, 30))
    gt[:4] = IGN
    pred = gt.copy()
    pred[:4] = 2  # predictions on ignored pixels do not matter
    ev = PartSegEvaluator(3, [True, True, False])
    ev.update(pred, gt)
    r = ev.compute()
    assert r["biou_seen"] == 100.0 and r["biou_unseen"] == 100.0 and r["biou_h"] == 100.0


def test_boundary_iou_of_shifted_square_by_hand():
    # 10x10 image: diagonal 14.1 -> 0.02 * 14.1 = 0.28 -> boundary width max(1, 0) = 1 pixel.
    gt = np.ones((10, 10), dtype=np.int64)
    gt[2:6, 2:6] = 0             # 4x4 square of class 0 on class 1
    pred = np.ones((10, 10), dtype=np.int64)
    pred[2:6, 3:7] = 0           # the same square shifted right by one column
    assert boundary_dilation(10, 10) == 1
    ev = PartSegEvaluator(2, [True, True])
    ev.update(pred, gt)
    r = ev.compute()
    # class 0: each boundary is the 12-pixel ring of its square; they share rows 2 and 5 at
    # columns 3..5 -> intersection 6, union 12 + 12 - 6 = 18.
    assert r["per_class"][0]["biou"] == pytest.approx(100 * 6 / 18)
    # class 1: the 36-pixel image border plus the 20-pixel ring around the square; the two outer
    # rings share rows 1 and 6 at columns 2..6 (10 pixels) -> intersection 46, union 66.
    assert r["per_class"][1]["biou"] == pytest.approx(100 * 46 / 66)
    assert r["biou_seen"] == pytest.approx(100 * (6 / 18 + 46 / 66) / 2)
    assert r["biou_seen"] < 100
    # mIoU of the same case: class 0 TP 12, union 20; class 1 TP 80, union 88
    assert r["per_class"][0]["iou"] == pytest.approx(60.0)
    assert r["per_class"][1]["iou"] == pytest.approx(100 * 80 / 88)


def test_mask_to_boundary_ring():
    m = np.zeros((8, 8), dtype=bool)
    m[1:7, 1:7] = True
    b = mask_to_boundary(m, 1)
    assert b.sum() == 36 - 16 and not b[2:6, 2:6].any()
    assert mask_to_boundary(m, 3).sum() == 36  # a 6x6 square erodes away at width 3


def test_bad_inputs():
    ev = PartSegEvaluator(2, [True, False])
    with pytest.raises(ValueError, match="outside"):
        ev.update(np.zeros((2, 2), int), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        ev.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(TypeError):
        ev.update(np.zeros((2, 2), float), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        PartSegEvaluator(3, [True, False])


def test_format_table_lists_classes():
    ev = PartSegEvaluator(2, [True, False], class_names=["dog's head", "cat's tail"])
    ev.update(np.array([[0, 1]]), np.array([[0, IGN]]))
    text = ev.format_table()
    assert "dog's head" in text and "cat's tail" in text and "h-IoU" in text
    assert "unseen" in text
    assert format_table(ev.compute()) == text
