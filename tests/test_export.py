"""Exporters: pyramidal heatmap TIFF, QuPath GeoJSON (+ validator), NIfTI/MHA, export_slide."""

from __future__ import annotations

import copy
import gzip
import json
import os
import uuid

import numpy as np
import pandas as pd
import pytest
import tifffile
from shapely.geometry import shape

from medwsol.config import ExportConfig
from medwsol.data.geometry import rasterize_geometry
from medwsol.data.synthetic_slide import make_synthetic_slide
from medwsol.errors import DataError, SlideError
from medwsol.export import EXPORT_FILES, export_slide
from medwsol.export.qupath import (
    heatmap_geojson,
    heatmap_regions,
    polygons_iou,
    read_geojson,
    validate_qupath_geojson,
    write_geojson,
)
from medwsol.export.tiff import write_heatmap_tiff
from medwsol.export.volume import read_volume, write_volume

openslide = pytest.importorskip("openslide")

W, H, MPP, K = 2048, 1536, 1.0, 8.0  # slide size, slide µm/px, level-0 px per heatmap px


# ------------------------------------------------------------------------------ a fake infer output


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_synthetic_slide(tmp_path_factory.mktemp("exs") / "case.tif", width=W, height=H, mpp=MPP, seed=7)


def _infer_folder(root, slide, fmt="npy", tile0=256):
    """What medwsol.engine.infer writes, built from the ground truth (no model): heat ~ 0.9 on tumour."""
    name = slide["tif"].stem
    folder = root / name
    folder.mkdir(parents=True)
    hh, ww = -(-H // int(K)), -(-W // int(K))
    truth = rasterize_geometry(slide["tumour"], 0, 0, ww, hh, scale=K)
    tissue = rasterize_geometry(slide["tissue"], 0, 0, ww, hh, scale=K)
    rng = np.random.default_rng(0)
    heat = np.where(truth, 0.9, 0.1).astype(np.float32) + rng.uniform(-0.05, 0.05, truth.shape).astype(np.float32)
    heat = np.where(tissue, heat, 0.0).astype(np.float32)
    cov = tissue.copy()
    if fmt == "zarr":
        import zarr

        zarr.create_array(store=str(folder / "heatmap.zarr"), data=heat, chunks=(64, 64))
        zarr.create_array(store=str(folder / "coverage.zarr"), data=cov, chunks=(64, 64))
    else:
        np.save(folder / "heatmap.npy", heat)
        np.save(folder / "coverage.npy", cov)
    rows = []
    for y in range(0, H, tile0):
        for x in range(0, W, tile0):
            t = rasterize_geometry(slide["tissue"], x, y, tile0 // 8, tile0 // 8, scale=8).mean()
            if t >= 0.1:
                tu = rasterize_geometry(slide["tumour"], x, y, tile0 // 8, tile0 // 8, scale=8).mean()
                p = 0.05 + 0.9 * tu
                rows.append({"x": x, "y": y, "w": tile0, "h": tile0, "tissue": round(t, 4), "mean_weight": p,
                             "prob_benign": 1 - p, "prob_malignant": p, "pred": "malignant" if p > 0.5 else "benign"})
    pd.DataFrame(rows).to_csv(folder / "tiles.csv", index=False)
    meta = {"format": "medwsol-slide-heatmap", "version": 1, "status": "ok", "slide": str(slide["tif"]), "name": name,
            "width": W, "height": H, "slide_mpp": MPP, "heatmap": f"heatmap.{fmt}", "coverage": f"coverage.{fmt}",
            "heatmap_format": fmt, "heatmap_shape": [hh, ww], "heatmap_mpp": MPP * K, "level0_per_heatmap_px": K,
            "tile_size": 256, "target_mpp": 1.0, "threshold": 0.5, "classes": ["benign", "malignant"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _truth_geojson(slide):
    return json.loads(slide["geojson"].read_text())


# ------------------------------------------------------------------------------------------ TIFF


def test_heatmap_tiff_opens_in_openslide_with_slide_extent(tmp_path):
    heat = np.random.default_rng(1).random((H // 8, W // 8)).astype(np.float32)
    heat[0, 0], heat[0, 1] = 0.0, 1.0
    p = write_heatmap_tiff(heat, tmp_path / "h.tif", mpp_x=MPP * K)
    s = openslide.OpenSlide(str(p))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    heat_mpp = float(s.properties["openslide.mpp-x"])
    assert heat_mpp == pytest.approx(MPP * K)
    w0, h0 = s.dimensions
    assert abs(w0 * heat_mpp - W * MPP) <= heat_mpp and abs(h0 * heat_mpp - H * MPP) <= heat_mpp
    assert max(s.level_dimensions[-1]) <= 256  # levels until one tile (here level 0 already is)
    got = np.asarray(s.read_region((0, 0), 0, (w0, h0)))[..., 0]
    assert np.array_equal(got, np.rint(heat * 255).astype(np.uint8))  # lossless round(p * 255)
    with tifffile.TiffFile(p) as t:
        assert all(pg.is_tiled and not pg.subifds for pg in t.pages)
        assert t.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER


def test_heatmap_tiff_odd_size_zarr_source_and_colormap(tmp_path):
    import zarr

    heat = np.random.default_rng(2).random((301, 517)).astype(np.float32)
    z = zarr.create_array(store=str(tmp_path / "h.zarr"), data=heat, chunks=(100, 100))
    a = write_heatmap_tiff(heat, tmp_path / "a.tif", mpp_x=4.0, tile=64)
    b = write_heatmap_tiff(z, tmp_path / "b.tif", mpp_x=4.0, tile=64)
    assert np.array_equal(tifffile.imread(a), tifffile.imread(b))
    s = openslide.OpenSlide(str(a))
    assert s.dimensions == (517, 301) and s.level_dimensions[1] == (259, 151)
    lvl1 = np.asarray(s.read_region((0, 0), 1, (258, 150)))[..., 0].astype(float)
    assert np.abs(lvl1 - heat[:300, :516].reshape(150, 2, 258, 2).mean((1, 3)) * 255).max() <= 1
    c = openslide.OpenSlide(str(write_heatmap_tiff(heat, tmp_path / "c.tif", mpp_x=4.0, colormap="inferno")))
    rgb = np.asarray(c.read_region((0, 0), 0, (517, 301)))[..., :3]
    assert rgb.std(axis=2).mean() > 5  # colour, not grey
    with pytest.raises(DataError, match="2-D"):
        write_heatmap_tiff(np.zeros((2, 3, 4)), tmp_path / "bad.tif", mpp_x=1.0)


# --------------------------------------------------------------------------------------- GeoJSON


def test_regions_scale_holes_and_filters():
    heat = np.zeros((10, 10), np.float32)
    heat[2:6, 2:6] = 0.9
    (poly, stats), = heatmap_regions(heat, 0.5, 8.0, 80, 80, simplify=0)
    assert poly.bounds == pytest.approx((16, 16, 48, 48))  # marching squares through pixel centres, scaled by k
    assert poly.area == pytest.approx(32 * 32, rel=0.05) and stats["mean_weight"] == pytest.approx(0.9)
    ring = np.zeros((12, 12), np.float32)
    ring[2:10, 2:10] = 1.0
    ring[5:7, 5:7] = 0.0
    (donut, _), = heatmap_regions(ring, 0.5, 1.0, 12, 12, simplify=0)
    assert len(donut.interiors) == 1 and not donut.contains(shape({"type": "Point", "coordinates": (6.5, 6.5)}))
    assert heatmap_regions(heat, 0.5, 8.0, 80, 80, min_area_px0=2000) == []
    cov = np.zeros_like(heat, bool)
    assert heatmap_regions(heat, 0.5, 8.0, 80, 80, coverage=cov) == []
    # clipped to the slide
    (clipped, _), = heatmap_regions(heat, 0.5, 8.0, 30, 30, simplify=0)
    assert clipped.bounds[2] <= 30 and clipped.bounds[3] <= 30


def test_geojson_tiles_and_regions_valid_and_close_to_truth(tmp_path, slide):
    folder = _infer_folder(tmp_path, slide)
    meta = json.loads((folder / "meta.json").read_text())
    tiles = pd.read_csv(folder / "tiles.csv")
    heat, cov = np.load(folder / "heatmap.npy"), np.load(folder / "coverage.npy")
    gj = heatmap_geojson(tiles, meta, heat, 0.5, "Tumor", (200, 0, 0), simplify=1.0, min_region_area=500.0,
                         coverage=cov)
    assert validate_qupath_geojson(gj, W, H) == []
    kinds = [f["properties"]["objectType"] for f in gj["features"]]
    assert kinds.count("tile") == len(tiles) and kinds.count("annotation") >= 1
    t0 = next(f for f in gj["features"] if f["properties"]["objectType"] == "tile")
    assert set(t0["properties"]["measurements"]) == {"tissue", "mean_weight", "prob_benign", "prob_malignant"}
    pos = [f for f in gj["features"] if f["properties"]["objectType"] == "tile"
           and f["properties"]["classification"]["name"] == "Tumor"]
    assert pos and all(f["properties"]["classification"]["color"] == [200, 0, 0] for f in pos)
    assert polygons_iou(gj, _truth_geojson(slide)) > 0.85
    again = heatmap_geojson(tiles, meta, heat, 0.5, coverage=cov, min_region_area=500.0)
    assert [f["id"] for f in again["features"]] == [f["id"] for f in gj["features"]]  # deterministic ids
    assert len({f["id"] for f in gj["features"]}) == len(gj["features"])
    p = write_geojson(gj, tmp_path / "x.geojson", gzip=True)
    assert p.name == "x.geojson.gz" and json.loads(gzip.decompress(p.read_bytes())) == gj
    assert read_geojson(p) == gj and read_geojson(write_geojson(gj, tmp_path / "y.geojson")) == gj


def _good_feature():
    return {
        "type": "Feature", "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [9, 1], [9, 9], [1, 9], [1, 1]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                       "measurements": {"a": 1.5}, "isLocked": False},
    }


def _set(path, value):
    def mutate(f):
        node = f
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


_DELETE = object()
_BROKEN = {
    "id missing": (_set(["id"], _DELETE), "id missing"),
    "id not uuid": (_set(["id"], "tile-1"), "not a UUID"),
    "id a number": (_set(["id"], 12), "not a UUID"),
    "objectType outside properties": (lambda f: (f.__setitem__("objectType", "tile"),
                                                 f["properties"].pop("objectType")), "outside properties"),
    "objectType unknown": (_set(["properties", "objectType"], "cell"), "objectType"),
    "classification without colour": (_set(["properties", "classification", "color"], _DELETE), "color"),
    "colour floats": (_set(["properties", "classification", "color"], [0.5, 0.0, 0.0]), "color"),
    "colour two values": (_set(["properties", "classification", "color"], [1, 2]), "color"),
    "colour out of range": (_set(["properties", "classification", "color"], [300, 0, 0]), "color"),
    "classification no name": (_set(["properties", "classification", "name"], _DELETE), "name"),
    "classification a string": (_set(["properties", "classification"], "Tumor"), "classification"),
    "measurements a list": (_set(["properties", "measurements"], [{"name": "a", "value": 1}]), "measurements"),
    "measurement a string": (_set(["properties", "measurements", "a"], "high"), "measurements"),
    "measurement NaN": (_set(["properties", "measurements", "a"], float("nan")), "measurements"),
    "isLocked a string": (_set(["properties", "isLocked"], "yes"), "isLocked"),
    "ring not closed": (_set(["geometry", "coordinates"], [[[1, 1], [9, 1], [9, 9], [1, 9]]]), "closed"),
    "ring too short": (_set(["geometry", "coordinates"], [[[1, 1], [9, 1], [1, 1]]]), ">= 4"),
    "self-intersecting": (_set(["geometry", "coordinates"], [[[1, 1], [9, 9], [9, 1], [1, 9], [1, 1]]]), "invalid"),
    "outside the slide": (_set(["geometry", "coordinates"], [[[1, 1], [19, 1], [19, 9], [1, 9], [1, 1]]]), "outside"),
    "negative coordinate": (_set(["geometry", "coordinates"], [[[-1, 1], [9, 1], [9, 9], [-1, 1]]]), "outside"),
    "geometry missing": (_set(["geometry"], _DELETE), "geometry"),
    "geometry type unknown": (_set(["geometry", "type"], "Circle"), "geometry type"),
    "properties missing": (_set(["properties"], _DELETE), "properties"),
}


def test_validator_accepts_good_features():
    f = _good_feature()
    mp = copy.deepcopy(f)
    mp["geometry"] = {"type": "MultiPolygon", "coordinates": [f["geometry"]["coordinates"]]}
    assert validate_qupath_geojson({"type": "FeatureCollection", "features": [f, mp]}, 10, 10) == []


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_validator_catches_each_broken_case(case):
    mutate, needle = _BROKEN[case]
    f = _good_feature()
    mutate(f)
    problems = validate_qupath_geojson({"type": "FeatureCollection", "features": [f]}, 10, 10)
    assert problems and any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_validator_top_level():
    assert validate_qupath_geojson({"type": "Feature"}, 10, 10)
    assert validate_qupath_geojson({"type": "FeatureCollection", "features": {}}, 10, 10)
    assert validate_qupath_geojson([], 10, 10)


def test_polygons_iou():
    def fc(*boxes):
        return {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"objectType": "annotation"}, "geometry": {"type": "Polygon",
             "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}} for a, b, c, d in boxes]}

    assert polygons_iou(fc((0, 0, 2, 2)), fc((0, 0, 2, 2))) == 1.0
    assert polygons_iou(fc((0, 0, 2, 2)), fc((5, 5, 6, 6))) == 0.0
    assert polygons_iou(fc((0, 0, 2, 2)), fc((1, 0, 3, 2))) == pytest.approx(1 / 3)
    assert polygons_iou(fc((0, 0, 2, 2), (1, 0, 3, 2)), fc((0, 0, 3, 2))) == pytest.approx(1.0)  # union first
    assert polygons_iou(fc(), fc()) == 1.0 and polygons_iou(fc(), fc((0, 0, 1, 1))) == 0.0


# ---------------------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_volume_round_trip_spacing_and_values(tmp_path, suffix):
    heat = np.random.default_rng(3).random((30, 50)).astype(np.float32)
    p = write_volume(heat, tmp_path / f"h{suffix}", spacing_mm=(0.004, 0.008))
    a, sp = read_volume(p)
    assert a.shape == (30, 50) and np.array_equal(a, heat)
    assert sp == pytest.approx((0.004, 0.008))
    if suffix.startswith(".nii"):
        import nibabel as nib

        img = nib.load(str(p))
        assert img.shape == (50, 30)  # first axis = x (columns)
        assert tuple(float(z) for z in img.header.get_zooms()) == pytest.approx((0.004, 0.008))
        assert np.array_equal(np.asarray(img.dataobj).T, heat)
    else:
        import SimpleITK as sitk

        img = sitk.ReadImage(str(p))
        assert img.GetSize() == (50, 30) and img.GetSpacing() == pytest.approx((0.004, 0.008))
    assert not list(tmp_path.glob(".*tmp*"))


def test_volume_bad_suffix_and_spacing(tmp_path):
    with pytest.raises(DataError, match="unknown volume format"):
        write_volume(np.zeros((2, 2)), tmp_path / "h.png", 0.01)
    with pytest.raises(DataError, match="spacing"):
        write_volume(np.zeros((2, 2)), tmp_path / "h.mha", -1)


# ---------------------------------------------------------------------------------- export_slide


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_export_slide_writes_every_format(tmp_path, slide, fmt):
    folder = _infer_folder(tmp_path, slide, fmt=fmt)
    cfg = ExportConfig(formats=["tiff", "geojson", "png", "nifti", "mha"], min_region_area=500.0)
    paths = export_slide(folder, cfg)
    name = slide["tif"].stem
    assert set(paths) == {"tiff", "geojson", "png", "nifti", "mha"}
    for fmt_name, p in paths.items():
        assert p.is_file() and p.name == EXPORT_FILES[fmt_name].format(name=name)
    s = openslide.OpenSlide(str(paths["tiff"]))
    mpp = float(s.properties["openslide.mpp-x"])
    assert mpp == pytest.approx(MPP * K) and abs(s.dimensions[0] * mpp - W * MPP) <= mpp
    gj = read_geojson(paths["geojson"])
    assert validate_qupath_geojson(gj, W, H) == []
    assert polygons_iou(gj, _truth_geojson(slide)) > 0.85
    a, sp = read_volume(paths["nifti"])
    assert sp == pytest.approx((MPP * K / 1000,) * 2) and a.shape == (H // 8, W // 8)
    from PIL import Image

    assert Image.open(paths["png"]).size[0] > 100
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_export_slide_gzip_threshold_and_other_folder(tmp_path, slide):
    folder = _infer_folder(tmp_path, slide)
    out = tmp_path / "exports"
    paths = export_slide(folder, ExportConfig(formats=["geojson"], geojson_gzip=True), threshold=0.95, out_dir=out)
    assert paths["geojson"].parent == out and paths["geojson"].name.endswith(".geojson.gz")
    gj = read_geojson(paths["geojson"])
    assert not [f for f in gj["features"] if f["properties"]["objectType"] == "annotation"]  # nothing >= 0.95


def test_export_slide_errors_are_one_line_and_leave_nothing(tmp_path, slide):
    with pytest.raises(SlideError, match="no meta.json"):
        export_slide(tmp_path / "nowhere", ExportConfig())
    folder = _infer_folder(tmp_path, slide)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DataError) as err:
        export_slide(folder, ExportConfig(), out_dir=blocker / "sub")
    assert "\n" not in str(err.value) and "fix:" in str(err.value)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(DataError, match="not writable"):
                export_slide(folder, ExportConfig(), out_dir=ro)
            assert not list(ro.iterdir())
        finally:
            ro.chmod(0o755)


def test_export_empty_slide(tmp_path):
    """A slide without tissue (infer status 'empty'): zero heatmap, header-only tiles.csv."""
    folder = tmp_path / "blank"
    folder.mkdir()
    np.save(folder / "heatmap.npy", np.zeros((32, 48), np.float32))
    np.save(folder / "coverage.npy", np.zeros((32, 48), bool))
    (folder / "tiles.csv").write_text("x,y,w,h,tissue,mean_weight,prob_benign,prob_malignant,pred\n")
    (folder / "meta.json").write_text(json.dumps({
        "status": "empty", "slide": str(tmp_path / "gone.tif"), "name": "blank", "width": 384, "height": 256,
        "slide_mpp": 0.5, "heatmap": "heatmap.npy", "coverage": "coverage.npy", "heatmap_format": "npy",
        "level0_per_heatmap_px": 8.0, "threshold": 0.5, "classes": ["benign", "malignant"]}))
    with pytest.warns(UserWarning, match="slide not found"):
        paths = export_slide(folder, ExportConfig(formats=["tiff", "geojson", "png"]))
    assert read_geojson(paths["geojson"]) == {"type": "FeatureCollection", "features": []}
    s = openslide.OpenSlide(str(paths["tiff"]))
    assert s.dimensions == (48, 32) and float(s.properties["openslide.mpp-x"]) == pytest.approx(4.0)
    assert paths["png"].is_file()
