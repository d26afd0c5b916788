"""BT.601 YUV round trip and luma replacement."""
import numpy as np

from LightFusionLib.colour import luma, replace_luma, rgb_to_yuv, yuv_to_rgb


def all_rgb_samples():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.integers(0, 256, (5000, 3)), [[0, 0, 0], [255, 255, 255], [255, 0, 0]]]).astype(np.uint8)


def test_round_trip_is_lossless():
    rgb = all_rgb_samples()
    back = yuv_to_rgb(rgb_to_yuv(rgb))
    assert np.abs(back - rgb).max() < 1e-3
    assert np.array_equal(replace_luma(rgb, rgb_to_yuv(rgb)[:, 0]), rgb)


def test_luma_weights_and_gray_has_no_chroma():
    yuv = rgb_to_yuv(np.array([[100, 100, 100], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8))
    assert np.allclose(yuv[0], [100, 0, 0], atol=1e-3)
    assert np.allclose(yuv[1:, 0], [0.299 * 255, 0.587 * 255, 0.114 * 255], atol=1e-3)
    assert np.allclose(luma(np.full((2, 2), 7, np.uint8)), 7)


def test_replacing_luma_equals_the_yuv_round_trip():
    # Y enters R, G, B with weight 1 in the inverse transform: adding the luma change to each
    # channel is the same as going through YUV with Y swapped.
    rgb = all_rgb_samples()
    new_y = np.random.default_rng(1).uniform(0, 255, len(rgb)).astype(np.float32)
    yuv = rgb_to_yuv(rgb)
    via_yuv = np.clip(np.rint(yuv_to_rgb(np.column_stack([new_y, yuv[:, 1:]]))), 0, 255)
    out = replace_luma(rgb, new_y)
    assert np.abs(out.astype(int) - via_yuv).max() <= 1  # only rounding ties may differ
    assert np.mean(out != via_yuv) < 1e-3
    assert np.array_equal(replace_luma(rgb, new_y, rgb_to_yuv(rgb)[:, 0]), out)


def test_replacing_luma_keeps_chroma_and_clips():
    rgb = all_rgb_samples()
    yuv = rgb_to_yuv(rgb)
    new_y = np.full(len(rgb), 128.0, np.float32)
    out = replace_luma(rgb, new_y)
    assert out.dtype == np.uint8
    # Where no clipping happened, chroma is carried over (to uint8 rounding).
    out_yuv = rgb_to_yuv(out)
    unclipped = (yuv_to_rgb(np.column_stack([new_y, yuv[:, 1:]])) >= 0).all(1) & \
                (yuv_to_rgb(np.column_stack([new_y, yuv[:, 1:]])) <= 255).all(1)
    assert unclipped.sum() > 100
    assert np.abs(out_yuv[unclipped, 1:] - yuv[unclipped, 1:]).max() < 1.0
    assert np.abs(out_yuv[unclipped, 0] - 128).max() < 1.0
