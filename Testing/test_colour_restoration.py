"""Colour restoration of the fused luma (:func:`LightFusionLib.colour.restore_colour`): 'yuv' (the
paper's, the reference) and 'saturated' (chroma scaled with the luma). The option never changes the
fused luma: 'saturated' keeps it exactly (up to uint8 rounding), and keeps the source's saturation."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.colour import (COLOUR_MODES, DEFAULT_COLOUR_MODE, check_colour_mode, luma, replace_luma,
                                   restore_colour)


def _random(seed=0, shape=(16, 64)):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, shape + (3,)).astype(np.uint8)
    fused_y = rng.uniform(0, 255, shape).astype(np.float32)
    return rgb, fused_y


def test_modes_and_default():
    assert COLOUR_MODES == ("yuv", "saturated") and DEFAULT_COLOUR_MODE == "yuv"
    assert check_colour_mode(None) == DEFAULT_COLOUR_MODE and check_colour_mode(" Saturated ") == "saturated"
    with pytest.raises(ValueError, match="unknown colour mode"):
        check_colour_mode("hsv")


def test_yuv_is_replace_luma():
    rgb, y = _random()
    np.testing.assert_array_equal(restore_colour(rgb, y, mode="yuv"), replace_luma(rgb, y))
    np.testing.assert_array_equal(restore_colour(rgb, y), replace_luma(rgb, y))  # the default


@pytest.mark.parametrize("seed", range(3))
def test_saturated_keeps_the_fused_luma_exactly(seed):
    rgb, y = _random(seed)
    out = restore_colour(rgb, y, mode="saturated")
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.abs(luma(out) - y).max() <= 0.5 + 1e-4  # only the uint8 rounding of R, G, B
    # the plain YUV clips R, G, B, which moves the luma by many grey levels on random colours
    assert np.abs(luma(restore_colour(rgb, y, mode="yuv")) - y).max() > 10


def test_saturated_keeps_saturation_where_the_luma_rises():
    # a mid-saturated orange brightened 1.5x: 'saturated' scales R, G, B alike (hue and saturation kept),
    # the plain YUV adds the same amount to each channel (towards pastel)
    rgb = np.array([[[120, 60, 20]]], np.uint8)
    y0 = luma(rgb)
    sat = restore_colour(rgb, y0 * 1.5, mode="saturated").astype(float)
    np.testing.assert_allclose(sat[0, 0], [180, 90, 30], atol=0.5)
    yuv = restore_colour(rgb, y0 * 1.5, mode="yuv").astype(float)

    def saturation(c):  # chroma over luma, in RGB terms
        return (c.max() - c.min()) / luma(c[None, None])[0, 0]

    assert saturation(sat[0, 0]) == pytest.approx(saturation(rgb[0, 0].astype(float)), rel=0.02)
    assert saturation(yuv[0, 0]) < 0.75 * saturation(rgb[0, 0].astype(float))


def test_saturated_never_has_less_chroma_than_the_source_inside_the_gamut():
    rgb, y = _random(4)
    src_y = luma(rgb)
    out = restore_colour(rgb, y, mode="saturated")
    src_chroma = rgb.astype(float) - src_y[..., None]
    out_chroma = out.astype(float) - luma(out)[..., None]
    fits = (y[..., None] + src_chroma >= 0).all(-1) & (y[..., None] + src_chroma <= 255).all(-1)
    ratio = np.linalg.norm(out_chroma, axis=-1)[fits] / np.maximum(np.linalg.norm(src_chroma, axis=-1)[fits], 1e-6)
    assert (ratio >= 1 - 0.02)[np.linalg.norm(src_chroma, axis=-1)[fits] > 20].all()


def test_grey_source_stays_grey():
    rgb = np.full((4, 4, 3), 0, np.uint8)
    rgb[1] = 80
    y = np.full((4, 4), 200.0, np.float32)
    out = restore_colour(rgb, y, mode="saturated")
    assert (out == 200).all()


# ------------------------------------------------------------------------------------------------
# wired through the fusion: the fused luma does not depend on the option
# ------------------------------------------------------------------------------------------------
class _Stub:
    """A backend: the fused luma is the mean of the two inputs (deterministic, no model needed)."""

    task = "pet-mri"
    preferred_batch = 4

    def __call__(self, mri, other):
        return (mri + other) / 2

    def describe(self):
        return "stub"


def _volumes():
    rng = np.random.default_rng(1)
    z, yy, xx = np.mgrid[0:6, 0:40, 0:40]
    mri = (100 + 80 * np.sin(xx / 5.0) + rng.normal(0, 5, z.shape)).astype(np.float32)
    pet = np.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / 60.0) * 1000 + rng.uniform(0, 50, z.shape)
    images = []
    for arr in (mri, pet.astype(np.float32)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        images.append(img)
    return images


def test_fuse_volumes_colour_mode_keeps_the_fused_luma():
    from LightFusionLib.fusion import fuse_volumes

    mri, pet = _volumes()
    kw = dict(task="pet-mri", backend=_Stub(), plane_size=None)
    yuv = sitk.GetArrayFromImage(fuse_volumes(mri, pet, colour_mode="yuv", **kw))
    sat = sitk.GetArrayFromImage(fuse_volumes(mri, pet, colour_mode="saturated", **kw))
    default = sitk.GetArrayFromImage(fuse_volumes(mri, pet, **kw))
    np.testing.assert_array_equal(default, yuv if DEFAULT_COLOUR_MODE == "yuv" else sat)
    assert not np.array_equal(sat, yuv)
    # Where the plain YUV did not clip, its luma is the fused luma up to rounding (0.5): so is the
    # saturated one's, everywhere it is compared.
    unclipped = ((yuv > 0) & (yuv < 255)).all(-1)
    assert unclipped.mean() > 0.5
    assert np.abs(luma(sat) - luma(yuv))[unclipped].max() <= 1.0 + 1e-3


def test_fuse_volumes_rejects_an_unknown_colour_mode():
    from LightFusionLib.fusion import fuse_volumes

    mri, pet = _volumes()
    with pytest.raises(ValueError, match="unknown colour mode"):
        fuse_volumes(mri, pet, backend=_Stub(), colour_mode="vivid", plane_size=None)


def test_evaluate_colour_option(tmp_path):
    from LightFusionLib.cli import main
    from tiny_pairs import make_pairs

    data = make_pairs(tmp_path / "d", modality="PET")
    reports = {}
    for mode in ("yuv", "saturated"):
        for score in ("luma", "rgb"):
            out = tmp_path / f"{mode}-{score}.json"
            assert main(["evaluate", "--data", str(data), "--task", "pet-mri", "--methods", "average,max",
                         "--quiet", "--colour", mode, "--score-on", score, "--json", str(out),
                         "--save-images", str(tmp_path / f"img-{mode}-{score}")]) == 0
            reports[mode, score] = json.loads(out.read_text())
    def strip(report):
        return {m: {k: v for k, v in row.items() if k != "seconds"} for m, row in report["methods"].items()}

    # the field's scores are on the fused luma: the colour option cannot change them
    assert strip(reports["yuv", "luma"]) == strip(reports["saturated", "luma"])
    assert reports["saturated", "rgb"]["colour"] == "saturated"
    assert main(["evaluate", "--data", str(data), "--task", "pet-mri", "--colour", "hsv"]) == 2


@pytest.mark.parametrize("mode", COLOUR_MODES)
def test_colour_map_lookup_path_matches_colouring_every_voxel(mode):
    """The fusion colours a scalar PET by looking its luma and luma-free colour up per colour-map
    position; that must be what colouring each voxel and restoring from it gives (ties of the
    rounding aside: at most 1 level, on very few voxels)."""
    from LightFusionLib.colormaps import apply_colormap, lookup_table
    from LightFusionLib.fusion import ColourSource

    rng = np.random.default_rng(0)
    values = rng.random((3, 64, 64), dtype=np.float32)
    fused = rng.random((3, 64, 64), dtype=np.float32) * 255
    lut = lookup_table("harvard-pet")
    from LightFusionLib.colormaps import colormap_index

    source = ColourSource(index=colormap_index(values), lut=lut)
    rgb = apply_colormap(values, lut)
    np.testing.assert_allclose(source.luma, luma(rgb), atol=1e-3)
    expected = restore_colour(rgb, fused, luma(rgb), mode).astype(int)
    got = source.restore(fused, mode).astype(int)
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 1e-3
