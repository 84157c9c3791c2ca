"""Synthetic pyramidal TIFF slides: OpenSlide reads them, pyramid consistent, ground truth consistent."""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest
import tifffile
from PIL import Image
from shapely.geometry import box, shape
from skimage.draw import polygon as sk_polygon

from medwsol.data.geometry import rasterize_geometry
from medwsol.data.synthetic_slide import (
    BACKGROUND,
    _TileSource,
    make_synthetic_slide,
    pyramid_dims,
)
from medwsol.errors import DataError
from medwsol.export.qupath import validate_qupath_geojson

openslide = pytest.importorskip("openslide")

W, H, MPP = 2304, 1792, 1.0


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_synthetic_slide(tmp_path_factory.mktemp("ss") / "tum.tif", width=W, height=H, mpp=MPP, seed=3)


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    return make_synthetic_slide(tmp_path_factory.mktemp("sn") / "norm.tif", width=W, height=H, mpp=MPP, seed=3,
                                tumour=False)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_openslide_reads_pyramid_and_mpp(slide):
    s = openslide.OpenSlide(str(slide["tif"]))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(MPP)
    assert s.level_count >= 3
    assert list(s.level_dimensions) == pyramid_dims(W, H) == slide["levels"]
    for k, ds in enumerate(s.level_downsamples):
        assert ds == pytest.approx(4**k, rel=0.01)


def test_tiff_layout_top_level_tiled_jpeg_cm(slide):
    with tifffile.TiffFile(slide["tif"]) as t:
        assert len(t.pages) == len(slide["levels"])
        for page, (w, h) in zip(t.pages, slide["levels"]):
            assert (page.imagewidth, page.imagelength) == (w, h)
            assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert not page.subifds
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        x_res = t.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / MPP)


def test_colours_round_trip_and_look_like_he(slide):
    s = openslide.OpenSlide(str(slide["tif"]))
    src = _TileSource(W, H, MPP, 3, slide["tissue"], slide["tumour"], 256)
    # a tile that holds tissue and tumour: decoded pixels == generated pixels up to JPEG error
    c = slide["tumour"].representative_point()
    x0, y0 = int(c.x) // 256 * 256, int(c.y) // 256 * 256
    want = src.tile_at(x0, y0).astype(float)
    got = np.asarray(s.read_region((x0, y0), 0, (256, 256)).convert("RGB")).astype(float)
    assert np.abs(got - want).mean() < 6
    assert np.abs(got.mean((0, 1)) - want.mean((0, 1))).max() < 2  # no colour-space swap (YCbCr decoded as RGB)
    # glass is light grey; stained tissue is pink/purple (R and B above G)
    corner = np.asarray(s.read_region((0, 0), 0, (32, 32)).convert("RGB")).reshape(-1, 3).mean(0)
    assert np.abs(corner - BACKGROUND).max() < 4
    lvl1 = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    ds = 4
    tis = rasterize_geometry(slide["tissue"].difference(slide["tumour"]).buffer(-16), 0, 0, *s.level_dimensions[1], ds)
    tum = rasterize_geometry(slide["tumour"].buffer(-16), 0, 0, *s.level_dimensions[1], ds)
    benign_rgb, tumour_rgb = lvl1[tis].mean(0), lvl1[tum].mean(0)
    for rgb in (benign_rgb, tumour_rgb):
        assert rgb[0] > rgb[1] and rgb[2] > rgb[1]
    assert tumour_rgb.sum() < benign_rgb.sum() - 60  # tumour is markedly darker (crowded nuclei)


def test_levels_are_downsamples_of_level0(slide):
    s = openslide.OpenSlide(str(slide["tif"]))
    c = slide["tumour"].representative_point()
    x0, y0 = int(c.x) // 64 * 64 - 256, int(c.y) // 64 * 64 - 256
    l0 = np.asarray(s.read_region((x0, y0), 0, (512, 512)).convert("RGB")).astype(float)
    # JPEG (q85, 4:2:0) loses more on the busier lower levels: compare per pixel loosely, per colour tightly
    for level, f in ((1, 4), (2, 16)):
        n = 512 // f
        lk = np.asarray(s.read_region((x0, y0), level, (n, n)).convert("RGB")).astype(float)
        box_mean = l0.reshape(n, f, n, f, 3).mean((1, 3))
        assert np.abs(box_mean - lk).mean() < 8
        assert np.abs(box_mean.mean((0, 1)) - lk.mean((0, 1))).max() < 2


def test_geojson_is_valid_qupath_and_inside_slide(slide):
    gj = json.loads(slide["geojson"].read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) >= 1
    assert validate_qupath_geojson(gj, W, H) == []
    for f in gj["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        uuid.UUID(f["id"])
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0 and box(0, 0, W, H).contains(g)
        assert slide["tissue"].buffer(1).contains(g)  # tumour lies in tissue
    total = sum(shape(f["geometry"]).area for f in gj["features"])
    assert total == pytest.approx(slide["tumour"].area, rel=1e-3)


def test_mask_png_matches_polygons(slide):
    meta = json.loads(slide["mask_json"].read_text())
    ds = meta["downsample"]
    assert meta["mask_mpp"] == pytest.approx(MPP * ds) and slide["mask_png"].name.endswith(f"_ds{ds}.png")
    mask = np.asarray(Image.open(slide["mask_png"])) > 0
    assert mask.shape == (-(-H // ds), -(-W // ds))
    # independent rasterisation (skimage) of the GeoJSON polygons at the mask's downsample
    ref = np.zeros_like(mask)
    for f in json.loads(slide["geojson"].read_text())["features"]:
        for k, ring in enumerate(f["geometry"]["coordinates"]):
            xy = np.asarray(ring, float) / ds - 0.5
            rr, cc = sk_polygon(xy[:, 1], xy[:, 0], mask.shape)
            ref[rr, cc] = k == 0
    iou = (mask & ref).sum() / (mask | ref).sum()
    assert iou > 0.98
    assert mask.mean() * W * H == pytest.approx(slide["tumour"].area, rel=0.05)


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(width=1024, height=768, mpp=1.0)
    a = make_synthetic_slide(tmp_path / "a" / "s.tif", seed=5, **kw)
    b = make_synthetic_slide(tmp_path / "b" / "s.tif", seed=5, **kw)
    c = make_synthetic_slide(tmp_path / "c" / "s.tif", seed=6, **kw)
    for key in ("tif", "geojson", "mask_png"):
        assert _sha(a[key]) == _sha(b[key])
    assert _sha(a["tif"]) != _sha(c["tif"])
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_normal_slide_has_no_tumour_and_same_tissue(slide, normal):
    gj = json.loads(normal["geojson"].read_text())
    assert gj == {"type": "FeatureCollection", "features": []}
    assert not (np.asarray(Image.open(normal["mask_png"])) > 0).any()
    assert normal["tissue"].equals(slide["tissue"])
    s = openslide.OpenSlide(str(normal["tif"]))
    assert s.level_count >= 3


def test_rasterize_geometry_pixel_centres_and_holes():
    from shapely.geometry import Point

    g = Point(100, 80).buffer(60).difference(Point(110, 80).buffer(20))
    m = rasterize_geometry(g, 0, 0, 256, 200)
    ref = np.zeros((200, 256), bool)
    for k, ring in enumerate([g.exterior, *g.interiors]):
        xy = np.asarray(ring.coords) - 0.5
        rr, cc = sk_polygon(xy[:, 1], xy[:, 0], ref.shape)
        ref[rr, cc] = k == 0
    assert (m != ref).sum() == 0
    assert not m[80, 110] and m[80, 60]
    assert rasterize_geometry(box(2, 2, 6, 4), 0, 0, 8, 6).sum() == 8
    assert rasterize_geometry(box(0, 0, 64, 64), 0, 0, 8, 8, scale=16).sum() == 16
    assert not rasterize_geometry(None, 0, 0, 4, 4).any()


def test_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="too small"):
        make_synthetic_slide(tmp_path / "x.tif", width=100, height=100)
    with pytest.raises(DataError, match="multiple of 16"):
        make_synthetic_slide(tmp_path / "x.tif", width=1024, height=1024, tile=100)
    assert not list(tmp_path.iterdir())
