"""medwsol.data.slides: opening, pixel size, levels, regions, tissue mask, tile grid.

Slides are small pyramidal TIFFs written here with tifffile (top-level pages, tiles, resolution
tags in centimetres), which OpenSlide opens as generic-tiff (or as Aperio when described so).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from medwsol.data.slides import (
    best_level_for_mpp,
    open_slide,
    read_region_at_mpp,
    slide_mpp,
    tile_grid,
    tissue_mask,
)
from medwsol.errors import SlideError


def write_slide(path, img, mpp=0.5, levels=3, tile=256, compression="deflate", description=None):
    """A pyramidal tiled TIFF: one top-level page per level (downsample 2**l), cm resolution tags."""
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            im = np.ascontiguousarray(img[:: 2**lvl, :: 2**lvl])
            if lvl and min(im.shape[:2]) < 16:
                break
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * 2**lvl),) * 2, "resolutionunit": "CENTIMETER"}
            if description is not None:
                kw.update(description=description if lvl == 0 else "Aperio Image Library v12.0.0\nlevel", metadata=None)
            tw.write(im, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=0 if lvl == 0 else 1, **kw)
    return path


def islands(h, w, discs, seed=0):
    """White glass with pink tissue discs ``(cx, cy, r)`` in level-0 px, plus mild noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 238, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx, cy, r in discs:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (205, 110, 170)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def gradient(h, w):
    """R encodes x, G encodes y (55..255), B = 20: saturated (tissue) everywhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([55 + 200 * xx / w, 55 + 200 * yy / h, np.full(xx.shape, 20.0)], -1).astype(np.uint8)


DISCS = [(500, 500, 250), (1900, 600, 300), (1200, 1500, 280)]


@pytest.fixture(scope="module")
def island_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("s") / "islands.tif", islands(2000, 2600, DISCS), mpp=0.5)


# ------------------------------------------------------------------------------------ open / mpp


def test_open_slide_reads_levels(island_slide):
    s = open_slide(island_slide)
    assert s.dimensions == (2600, 2000)
    assert s.level_count == 3
    assert slide_mpp(s) == (0.5, "openslide.mpp-x")


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "folder"])
def test_open_slide_errors_are_one_line_with_fix(tmp_path, kind):
    if kind == "missing":
        p = tmp_path / "nope.tif"
    elif kind == "text":
        p = tmp_path / "notes.tif"
        p.write_text("this is not a slide\n" * 50)
    elif kind == "folder":
        p = tmp_path / "dir.tif"
        p.mkdir()
    else:
        p = write_slide(tmp_path / "cut.tif", islands(1024, 1024, [(500, 500, 300)]), compression="jpeg")
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError) as info:
        open_slide(p)
    msg = str(info.value)
    assert str(p) in msg and "fix:" in msg and "\n" not in msg


def test_slide_without_mpp_uses_fallback_with_warning_or_fails(tmp_path):
    p = write_slide(tmp_path / "nompp.tif", islands(512, 512, [(256, 256, 100)]), mpp=None, levels=1)
    s = open_slide(p)
    with pytest.warns(UserWarning, match="fallback_mpp"):
        assert slide_mpp(s, fallback_mpp=0.25) == (0.25, "fallback")
    with pytest.raises(SlideError) as info:
        slide_mpp(s)
    msg = str(info.value)
    assert msg.startswith(str(p)) and "fix: set slides.fallback_mpp" in msg and "\n" not in msg


def test_slide_mpp_from_objective_power_warns(tmp_path):
    desc = "Aperio Image Library v12.0.0\n1024x768 [0,0 1024x768] (256x256) JPEG/RGB Q=70|AppMag = 20|Filename = x"
    p = write_slide(tmp_path / "aperio.svs", islands(768, 1024, [(500, 400, 200)]), mpp=None, levels=2,
                    compression="jpeg", description=desc)
    s = open_slide(p)
    assert s.properties["openslide.vendor"] == "aperio"
    with pytest.warns(UserWarning, match="objective power"):
        assert slide_mpp(s, fallback_mpp=0.25) == (0.5, "objective-power")


# ---------------------------------------------------------------------------------- levels / read


@pytest.mark.parametrize(
    "mpp, expected",
    [(0.5, (0, 1.0)), (1.0, (1, 1.0)), (0.75, (0, 1.5)), (3.0, (2, 1.5)), (0.25, (0, 0.5)), (2.0, (2, 1.0))],
)
def test_best_level_for_mpp(island_slide, mpp, expected):
    level, within = best_level_for_mpp(open_slide(island_slide), mpp)
    assert level == expected[0]
    assert within == pytest.approx(expected[1], rel=0.01)


@pytest.fixture(scope="module")
def gradient_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("g") / "grad.tif", gradient(1200, 1600), mpp=0.5)


@pytest.mark.parametrize("mpp", [0.5, 1.0, 1.5])
def test_read_region_at_mpp_geometry(gradient_slide, mpp):
    """(x, y) is the level-0 top-left; (w, h) are pixels at mpp; R follows x and G follows y."""
    s = open_slide(gradient_slide)
    x, y, w, h = 400, 300, 64, 48
    rgb = read_region_at_mpp(s, x, y, w, h, mpp)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    step = mpp / 0.5  # level-0 px per output px
    ex = 55 + 200 * (x + (np.arange(w) + 0.5) * step - 0.5) / 1600
    ey = 55 + 200 * (y + (np.arange(h) + 0.5) * step - 0.5) / 1200
    assert np.abs(rgb[..., 0].astype(float) - ex[None, :]).max() <= 2.5
    assert np.abs(rgb[..., 1].astype(float) - ey[:, None]).max() <= 2.5


def test_read_region_pads_outside_with_white_and_blocks_match(gradient_slide):
    s = open_slide(gradient_slide)
    rgb = read_region_at_mpp(s, 1500, 1100, 64, 64, 1.0)  # 128 level-0 px, half outside
    assert (rgb[:, 60:] == 255).all() and (rgb[60:, :] == 255).all()
    assert (rgb[:40, :40, 2] == 20).all()
    direct = read_region_at_mpp(s, 0, 0, 200, 150, 4.0)
    blocks = read_region_at_mpp(s, 0, 0, 200, 150, 4.0, max_read_px=64 * 64, workers=3)
    assert np.abs(direct.astype(int) - blocks.astype(int)).max() <= 2
    # the blocks read side by side in threads are the blocks read one after the other
    np.testing.assert_array_equal(blocks, read_region_at_mpp(s, 0, 0, 200, 150, 4.0, max_read_px=64 * 64, workers=1))


# -------------------------------------------------------------------------------------- tissue


def test_tissue_mask_finds_the_islands(island_slide):
    from skimage.measure import label, regionprops

    mask, mask_mpp = tissue_mask(open_slide(island_slide), mpp=8.0)
    assert mask.dtype == bool and mask_mpp == pytest.approx(8.0, rel=0.01)
    assert mask.shape == (round(2000 * 0.5 / 8), round(2600 * 0.5 / 8))
    regions = regionprops(label(mask))
    assert len(regions) == len(DISCS)
    scale = 0.5 / mask_mpp
    for cx, cy, r in DISCS:
        hit = [rg for rg in regions if abs(rg.centroid[1] - cx * scale) < 2 and abs(rg.centroid[0] - cy * scale) < 2]
        assert len(hit) == 1
        assert hit[0].area == pytest.approx(np.pi * (r * scale) ** 2, rel=0.15)


def test_tissue_mask_of_blank_slide_is_empty(tmp_path):
    blank = np.full((1024, 1024, 3), 240, np.uint8)
    blank += np.random.default_rng(0).integers(0, 4, blank.shape, dtype=np.uint8)
    p = write_slide(tmp_path / "blank.tif", blank, compression="jpeg")
    mask, _ = tissue_mask(open_slide(p), mpp=16.0)
    assert mask.shape == (32, 32) and not mask.any()


def test_tissue_mask_refuses_a_slide_without_a_pyramid_beyond_the_limit(tmp_path):
    """One level only: the mask would decode all of level 0; over max_read_mpx it fails at once with the reason."""
    p = write_slide(tmp_path / "flat.tif", islands(1024, 1536, [(500, 500, 200)]), levels=1)
    slide = open_slide(p)
    with pytest.raises(SlideError) as err:
        tissue_mask(slide, mpp=16.0, max_read_mpx=1.0)  # level 0 is 1.57 Mpx
    msg = str(err.value)
    assert "flat.tif" in msg and "1.57 Mpx from pyramid level 0" in msg and "pyramidal TIFF" in msg and "\n" not in msg
    mask, _ = tissue_mask(slide, mpp=16.0, max_read_mpx=2.0)  # within the limit it is read as before
    assert mask.any()
    mask, _ = tissue_mask(open_slide(write_slide(tmp_path / "pyr.tif", islands(1024, 1536, [(500, 500, 200)]),
                                                 levels=4)), mpp=16.0, max_read_mpx=1.0)
    assert mask.any()  # a pyramid keeps the read small


def test_tissue_mask_of_all_tissue_slide_is_full(gradient_slide):
    mask, _ = tissue_mask(open_slide(gradient_slide), mpp=16.0)
    assert mask.all()


# ----------------------------------------------------------------------------------------- grid


def _brute_fraction(mask, x, y, tile0, s):
    c0, r0 = min(round(x * s), mask.shape[1] - 1), min(round(y * s), mask.shape[0] - 1)
    c1, r1 = max(c0 + 1, round((x + tile0) * s)), max(r0 + 1, round((y + tile0) * s))
    window = mask[r0:r1, c0:c1]  # clipped to the slide: padding is not judged
    return window.sum() / window.size


@pytest.mark.parametrize("overlap", [0, 16, 48])
def test_tile_grid_fraction_and_min_tissue(overlap):
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) < 0.4
    mask[:20, :30] = True
    dims, mpp, target, tile, mask_mpp = (2560, 1920), 0.5, 1.0, 64, 16.0
    all_xy, all_f = tile_grid(dims, mpp, target, tile, overlap, mask, mask_mpp, 0.0, return_fraction=True)
    stride0 = (tile - overlap) * target / mpp
    assert all_xy[0].tolist() == [0, 0] and all_xy[1].tolist() == [round(stride0), 0]
    # row-major, covers the slide, brute-force fractions
    assert np.array_equal(np.lexsort((all_xy[:, 0], all_xy[:, 1])), np.arange(len(all_xy)))
    assert all_xy[:, 0].max() + tile * target / mpp >= dims[0] and all_xy[:, 1].max() + tile * target / mpp >= dims[1]
    s = mpp / mask_mpp
    brute = np.array([_brute_fraction(mask, x, y, tile * target / mpp, s) for x, y in all_xy])
    np.testing.assert_allclose(all_f, brute, atol=1e-6)
    for t in (0.1, 0.5, 0.9, 1.0):
        xy, f = tile_grid(dims, mpp, target, tile, overlap, mask, mask_mpp, t, return_fraction=True, rows_per_chunk=3)
        assert (f >= t).all()
        assert len(xy) == int((brute >= t).sum())
        assert np.array_equal(xy, all_xy[brute >= t])


def test_tile_grid_small_slide_gets_one_padded_tile():
    mask = np.zeros((3, 4), bool)  # 60 x 45 level-0 px at 0.5 µm/px = 4 x 3 mask px at 7.5 µm/px
    mask[:, 1:] = True
    xy, f = tile_grid((60, 45), 0.5, 1.0, 256, 0, mask, 7.5, 0.1, return_fraction=True)
    assert xy.tolist() == [[0, 0]]
    assert f[0] == pytest.approx(0.75)  # judged on the part inside the slide
    assert tile_grid((60, 45), 0.5, 1.0, 256, 0, None, None, 0.1).tolist() == [[0, 0]]


def test_tile_grid_empty_mask_gives_no_tiles():
    xy = tile_grid((4000, 3000), 0.5, 1.0, 128, 0, np.zeros((100, 125), bool), 16.0, 0.1)
    assert xy.shape == (0, 2)


def test_tile_grid_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((100, 100), 0.5, 1.0, 64, 64, None, None, 0.1)


def test_tissue_mask_matches_synthetic_slide_tissue(tmp_path):
    """On the project's H&E-like synthetic slide the mask agrees with the true tissue polygons."""
    from skimage.measure import label

    from medwsol.data.geometry import rasterize_geometry
    from medwsol.data.synthetic_slide import make_synthetic_slide

    out = make_synthetic_slide(tmp_path / "syn.tif", width=2048, height=1536, mpp=0.5, seed=3)
    slide = open_slide(out["tif"])
    mask, mask_mpp = tissue_mask(slide, mpp=8.0)
    truth = rasterize_geometry(out["tissue"], 0, 0, mask.shape[1], mask.shape[0], scale=mask_mpp / 0.5)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85
    n_true = len(getattr(out["tissue"], "geoms", [out["tissue"]]))
    assert label(mask).max() == n_true
    xy, frac = tile_grid(slide.dimensions, 0.5, 1.0, 128, 0, mask, mask_mpp, 0.5, return_fraction=True)
    assert len(xy) > 0 and (frac >= 0.5).all()
    from shapely.geometry import box

    inside = [out["tissue"].intersection(box(x, y, x + 256, y + 256)).area / 256**2 for x, y in xy]
    assert np.mean(np.array(inside) >= 0.3) > 0.95  # kept tiles (level-0 x, y) really lie on tissue


def test_saturation_equals_skimage_hsv():
    from skimage.color import rgb2hsv

    from medwsol.data.slides import saturation

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[0, :5] = 0
    np.testing.assert_allclose(saturation(rgb, rows_per_chunk=8), rgb2hsv(rgb)[..., 1], atol=1e-6)
