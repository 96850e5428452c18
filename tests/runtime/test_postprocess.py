"""Numpy pre/post-processing: resize parity with torch, Oracle-Obj and Pred-All rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from runtime.postprocess import BACKGROUND, oracle_obj, pred_all, resize_bilinear
from runtime.preprocess import InputError, check_image, preprocess


@given(h=st.integers(2, 12), w=st.integers(2, 12), H=st.integers(1, 30), W=st.integers(1, 30))
@settings(max_examples=30, deadline=None)
def test_resize_matches_torch(h, w, H, W):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(h * 100 + w).standard_normal((3, h, w)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(H, W), mode="bilinear",
                                          align_corners=False)[0].numpy()
    np.testing.assert_allclose(resize_bilinear(x, (H, W)), ref, rtol=1e-5, atol=1e-5)


CLASS_OBJECTS = np.array([0, 0, 1, 1, 1])  # classes 0-1 belong to object 0, 2-4 to object 1


@given(seed=st.integers(0, 10_000), obj=st.integers(0, 1))
@settings(max_examples=40, deadline=None)
def test_oracle_obj_never_labels_another_objects_class(seed, obj):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((6, 8, 8)).astype(np.float32) * 5
    mask = rng.random((20, 24)) > 0.4
    labels = oracle_obj(logits, CLASS_OBJECTS, mask, obj)
    assert labels.shape == (20, 24) and labels.dtype == np.int32
    inside = labels[mask]
    fg = inside[inside != BACKGROUND]
    assert np.all(CLASS_OBJECTS[fg] == obj)
    assert np.all(labels[~mask] == BACKGROUND)


def test_oracle_obj_picks_best_own_class():
    logits = np.full((6, 2, 2), -5.0, np.float32)
    logits[2] = 9  # object 1's class, highest everywhere
    logits[1] = 3  # object 0's best class
    labels = oracle_obj(logits, CLASS_OBJECTS, np.ones((2, 2), bool), 0)
    assert np.all(labels == 1)


def test_pred_all_gates_by_object_head():
    logits = np.zeros((6, 2, 2), np.float32)
    logits[0] = 5  # object 0's class wins the plain argmax everywhere
    logits[3] = 4
    logits[5] = 1  # background
    objects = np.zeros((3, 2, 2), np.float32)
    objects[1, :, 0] = 3  # left column: object 1
    objects[2, :, 1] = 3  # right column: background
    labels = pred_all(logits, CLASS_OBJECTS, (2, 2), objects)
    assert labels[:, 0].tolist() == [3, 3]
    assert labels[:, 1].tolist() == [BACKGROUND, BACKGROUND]
    assert np.all(pred_all(logits, CLASS_OBJECTS, (2, 2)) == 0)  # CLIPSeg: no gating


def test_bad_inputs_have_clear_errors():
    with pytest.raises(InputError, match="uint8"):
        check_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="alpha"):
        check_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="empty"):
        check_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match="K \\+ 1"):
        oracle_obj(np.zeros((3, 2, 2)), CLASS_OBJECTS, np.ones((2, 2), bool), 0)


def test_preprocess_normalizes_and_handles_bgr():
    img = np.zeros((5, 7, 3), np.uint8)
    img[..., 0] = 255
    x = preprocess(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert x[0].mean() > 1.5 and x[2].mean() < -1.0
    np.testing.assert_allclose(preprocess(img[..., ::-1].copy(), 16, bgr=True), x)
