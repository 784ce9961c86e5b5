"""Transforms: boxes stay on the pixels they frame, through every branch."""

import numpy as np
import pytest

from ddetr_jax.data import transforms as T

SMALL = T.TransformConfig().scaled(0.1)


def _canvas(hw, boxes_xyxy):
    """(H, W, 3) uint8 black image with each integer box painted white."""
    image = np.zeros(hw + (3,), np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, int):
        image[y0:y1, x0:x1] = 255
    return image


def _denormalize(image):
    return (image * T.IMAGENET_STD + T.IMAGENET_MEAN) * 255.0


def test_resized_hw_follows_the_authors_rule():
    assert T.resized_hw((480, 640), 800, 1333) == (800, 1066)
    assert T.resized_hw((640, 480), 800, 1333) == (1066, 800)
    assert T.resized_hw((100, 1000), 800, 1333) == (133, 1330)
    assert T.resized_hw((800, 1000), 800, 1333) == (800, 1000)
    assert T.resized_hw((300, 400), 600) == (600, 800)


def test_flip_twice_is_identity():
    boxes = np.array([[0, 0, 5, 5], [3, 1, 10, 9]], np.float32)
    np.testing.assert_array_equal(T.flip_boxes(T.flip_boxes(boxes, 10), 10), boxes)
    np.testing.assert_array_equal(T.flip_boxes(boxes, 10)[0], [5, 0, 10, 5])


@pytest.mark.parametrize("seed", range(40))
def test_boxes_frame_their_pixels_after_training_geometry(seed):
    rng = np.random.default_rng(seed)
    hw = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    x0, y0 = int(rng.integers(0, hw[1] - 12)), int(rng.integers(0, hw[0] - 12))
    box = [x0, y0, int(rng.integers(x0 + 10, hw[1] + 1)), int(rng.integers(y0 + 10, hw[0] + 1))]
    geometry = T.sample_train_geometry(rng, hw, SMALL)
    out = T.transform_example(_canvas(hw, [box]), [box], [7], [False], geometry)
    pixels = _denormalize(out["image"]).mean(axis=-1)  # (h, w)
    out_h, out_w = geometry.out_hw
    assert pixels.shape == (out_h, out_w) and out["image"].dtype == np.float32
    assert max(out_h, out_w) <= SMALL.max_size
    bright = np.argwhere(pixels > 127.5)  # (K, 2) rows, cols
    if out["labels"].size == 0:  # the crop cut the box away: at most a fringe is left
        assert bright.shape[0] <= max(out_h, out_w)
        return
    assert out["labels"].tolist() == [7]
    cx, cy, w, h = out["boxes_cxcywh"][0] * [out_w, out_h, out_w, out_h]
    expected = [cy - h / 2, cx - w / 2, cy + h / 2 - 1, cx + w / 2 - 1]  # first/last pixel
    found = [*bright.min(axis=0), *bright.max(axis=0)]
    np.testing.assert_allclose(found, expected, atol=1.5)
    assert (out["boxes_cxcywh"] >= 0).all() and (out["boxes_cxcywh"] <= 1).all()


def test_flip_moves_the_box_with_the_pixels():
    box = [2, 3, 10, 20]
    geometry = T.Geometry((30, 40), True, (30, 40), None, (30, 40))
    out = T.transform_example(_canvas((30, 40), [box]), [box], [1], [False], geometry)
    np.testing.assert_allclose(out["boxes_cxcywh"] * [40, 30, 40, 30], [[34, 11.5, 8, 17]])
    bright = np.argwhere(_denormalize(out["image"]).mean(-1) > 127.5)
    assert bright.min(axis=0).tolist() == [3, 30] and bright.max(axis=0).tolist() == [19, 37]


def test_crop_drops_boxes_outside_and_clips_edge_boxes():
    boxes = [[0, 0, 10, 10], [15, 15, 30, 30], [35, 5, 40, 12]]
    geometry = T.Geometry((40, 40), False, (40, 40), (12, 12, 20, 20), (20, 20))
    out = T.transform_example(_canvas((40, 40), boxes), boxes, [1, 2, 3], [False] * 3, geometry)
    assert out["labels"].tolist() == [2]
    np.testing.assert_allclose(out["boxes_cxcywh"] * 20, [[10.5, 10.5, 15, 15]])


def test_empty_results_keep_their_shapes():
    geometry = T.eval_geometry((30, 40), SMALL)
    out = T.transform_example(np.zeros((30, 40, 3), np.uint8), np.zeros((0, 4)), [], [],
                              geometry)
    assert out["boxes_cxcywh"].shape == (0, 4) and out["labels"].shape == (0,)
    assert out["labels"].dtype == np.int32


def test_crowd_and_degenerate_boxes_are_dropped():
    boxes = [[1, 1, 5, 5], [2, 2, 8, 8], [3, 3, 3, 9], [-10, 2, -1, 9]]
    geometry = T.eval_geometry((20, 20), SMALL)
    out = T.transform_example(np.zeros((20, 20, 3), np.uint8), boxes, [1, 2, 3, 4],
                              [False, True, False, False], geometry)
    assert out["labels"].tolist() == [1]


def test_normalisation_comes_after_resampling():
    mean_colour = np.round(T.IMAGENET_MEAN * 255).astype(np.uint8)
    image = np.broadcast_to(mean_colour, (50, 70, 3)).copy()
    geometry = T.sample_train_geometry(np.random.default_rng(3), (50, 70), SMALL)
    out = T.transform_example(image, np.zeros((0, 4)), [], [], geometry)
    assert np.abs(out["image"]).max() < 0.01


def test_geometry_is_deterministic_and_sizes_follow_config():
    config = T.TransformConfig()
    first = [T.sample_train_geometry(np.random.default_rng([5, i]), (480, 640), config)
             for i in range(200)]
    again = [T.sample_train_geometry(np.random.default_rng([5, i]), (480, 640), config)
             for i in range(200)]
    assert first == again
    assert {g.flip for g in first} == {True, False}
    assert {g.crop is None for g in first} == {True, False}
    for g in first:
        assert min(g.out_hw) in config.scales or max(g.out_hw) <= config.max_size
        assert max(g.out_hw) <= config.max_size
        if g.crop is not None:
            assert min(g.resized_hw) in config.crop_resize_scales
            assert all(384 <= side <= 600 for side in g.crop[2:])
    assert T.eval_geometry((480, 640), config).out_hw == (800, 1066)


def test_scaled_config():
    assert SMALL.scales[0] == 48 and SMALL.max_size == 133 and SMALL.crop_size == (38, 60)
    assert SMALL.val_scale == 80 and SMALL.crop_resize_scales == (40, 50, 60)
