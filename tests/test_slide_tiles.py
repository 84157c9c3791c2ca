"""CAMELYON16-style tiles from synthetic annotated slides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.draw import polygon as sk_polygon

from medwsol.config import SlideTilesConfig, SyntheticSlidesConfig
from medwsol.data.geometry import rasterize_geometry
from medwsol.data.manifest import load_manifest
from medwsol.data.slide_tiles import make_synthetic_slide_cohort, prepare_slide_tiles, qupath_geometry
from medwsol.data.synthetic_slide import make_synthetic_slide
from medwsol.errors import DataError, SlideError

pytest.importorskip("openslide")

CLASSES = ["benign", "malignant"]
CFG = SlideTilesConfig(tile_size=128, mpp=2.0, min_tissue=0.1, min_tumour=0.2)
SCALE = 2.0  # level-0 px per tile px (slides at 1 µm/px)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    (root / "annotations").mkdir()
    info = {}
    for stem, tumour, seed in (("tum", True, 11), ("norm", False, 12)):
        res = make_synthetic_slide(root / "slides" / f"{stem}.tif", width=2048, height=2048, mpp=1.0, seed=seed,
                                   tumour=tumour)
        shutil.move(res["geojson"], root / "annotations" / f"{stem}.geojson")
        info[stem] = res
    pd.DataFrame({"slide": ["slides/tum.tif", "slides/norm.tif"], "label": ["malignant", "benign"],
                  "group": ["p1", "p2"], "split": ["train", "train"]}).to_csv(root / "slides.csv", index=False)
    manifest = prepare_slide_tiles(root / "slides.csv", root / "annotations", root / "tiles", CFG, CLASSES, seed=0)
    return root, info, manifest


def _true_mask(geojson_path, x, y, size=128, scale=SCALE):
    """Independent rasterisation (skimage) of the QuPath polygons onto a tile's grid."""
    m = np.zeros((size, size), bool)
    for f in json.loads(geojson_path.read_text())["features"]:
        for k, ring in enumerate(f["geometry"]["coordinates"]):
            xy = (np.asarray(ring, float) - [x, y]) / scale - 0.5
            rr, cc = sk_polygon(xy[:, 1], xy[:, 0], m.shape)
            m[rr, cc] = k == 0
    return m


def test_manifest_columns_and_loads(two_slides):
    root, _, manifest = two_slides
    df = pd.read_csv(manifest)
    assert {"image", "mask", "label", "split", "group", "valpx", "slide", "x", "y"} <= set(df.columns)
    loaded = load_manifest(manifest, CLASSES)  # the project's own manifest validator
    assert len(loaded) == len(df) > 10
    img = np.asarray(Image.open(loaded["image_path"].iloc[0]))
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8


def test_tissue_and_tumour_rules(two_slides):
    root, info, manifest = two_slides
    df = pd.read_csv(manifest)
    assert (df["tissue"] >= CFG.min_tissue).all()
    for r in df.itertuples():
        stem = "tum" if r.slide.endswith("tum.tif") else "norm"
        true_tissue = rasterize_geometry(info[stem]["tissue"], r.x, r.y, 128, 128, SCALE).mean()
        assert true_tissue >= CFG.min_tissue - 0.05, (r.image, true_tissue)
    tum, norm = df[df["label"] == "malignant"], df[df["label"] == "benign"]
    assert len(tum) and len(norm)
    assert tum["slide"].str.endswith("tum.tif").all() and norm["slide"].str.endswith("norm.tif").all()
    for r in tum.itertuples():
        m = np.asarray(Image.open(root / "tiles" / r.mask)) > 0
        assert m.mean() >= CFG.min_tumour and r.tumour >= CFG.min_tumour
    for r in norm.itertuples():
        assert not (np.asarray(Image.open(root / "tiles" / r.mask)) > 0).any()


def test_masks_match_polygons(two_slides):
    root, _, manifest = two_slides
    df = pd.read_csv(manifest)
    for r in df[df["label"] == "malignant"].itertuples():
        got = np.asarray(Image.open(root / "tiles" / r.mask)) > 0
        want = _true_mask(root / "annotations" / "tum.geojson", r.x, r.y)
        assert (got != want).mean() < 0.002, r.mask  # identical up to 2-decimal GeoJSON rounding on edges


def test_classes_balanced_and_deterministic(two_slides, tmp_path):
    root, _, manifest = two_slides
    df = pd.read_csv(manifest)
    counts = df.groupby("label").size()
    assert counts["malignant"] == counts["benign"]
    again = prepare_slide_tiles(root / "slides.csv", root / "annotations", tmp_path / "again", CFG, CLASSES, seed=0)
    cols = ["label", "split", "x", "y", "group"]
    assert pd.read_csv(again)[cols].equals(df[cols])


def test_labels_aliases_and_tile_cap(two_slides, tmp_path):
    root, _, _ = two_slides
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide": [str(root / "slides/tum.tif"), str(root / "slides/norm.tif")],
                  "label": ["Tumour", "normal"], "split": ["train", "train"]}).to_csv(csv, index=False)
    cfg = CFG.model_copy(update={"max_tiles_per_slide": 3})
    df = pd.read_csv(prepare_slide_tiles(csv, root / "annotations", tmp_path / "t", cfg, CLASSES, seed=1))
    assert set(df["label"]) == {"malignant", "benign"} and len(df) <= 6
    assert set(df["group"]) == {"tum", "norm"}  # default group = slide stem


def test_cohort_layout_and_slide_disjoint_splits(tmp_path):
    syn = SyntheticSlidesConfig(n_train=4, n_test=1, width=1536, height=1536, mpp=1.0, seed=2)
    csv = make_synthetic_slide_cohort(tmp_path / "cohort", syn)
    slides = pd.read_csv(csv)
    test = pd.read_csv(tmp_path / "cohort" / "test_slides.csv")
    assert len(slides) == 4 and sorted(slides["label"]) == ["normal"] * 2 + ["tumour"] * 2
    assert len(test) == 1 and (test["label"] == "tumour").all()
    for s in list(slides["slide"]) + list(test["slide"]):
        assert (tmp_path / "cohort" / s).is_file()
        assert (tmp_path / "cohort" / "annotations" / f"{s.split('/')[-1][:-4]}.geojson").is_file()
    mtime = csv.stat().st_mtime_ns
    assert make_synthetic_slide_cohort(tmp_path / "cohort", syn) == csv and csv.stat().st_mtime_ns == mtime  # reused
    with pytest.warns(UserWarning, match="one class only"):
        manifest = prepare_slide_tiles(csv, tmp_path / "cohort" / "annotations", tmp_path / "tiles", CFG, CLASSES, seed=0)
    df = pd.read_csv(manifest)
    per_slide = df.groupby("slide")["split"].nunique()
    assert (per_slide == 1).all()  # every slide's tiles sit in one split
    assert set(df["split"]) == {"train", "valid", "test"}
    train = df[df["split"] == "train"]
    assert set(train["label"]) == set(CLASSES)
    assert (train["label"] == "malignant").sum() == (train["label"] == "benign").sum()
    assert df["valpx"].sum() >= 1 and (df.loc[df["valpx"] == 1, "split"] == "valid").all()


def test_cohort_of_six_or_more_has_both_classes_in_valid_and_test(tmp_path):
    syn = SyntheticSlidesConfig(n_train=6, n_test=1, width=1024, height=1024, mpp=1.0, seed=3)
    csv = make_synthetic_slide_cohort(tmp_path / "cohort", syn)
    slides = pd.read_csv(csv)
    assert slides.groupby("split")["label"].apply(sorted).to_dict() == {
        "test": ["normal", "tumour"], "train": ["normal", "tumour"], "valid": ["normal", "tumour"]}
    df = pd.read_csv(prepare_slide_tiles(csv, tmp_path / "cohort" / "annotations", tmp_path / "tiles", CFG, CLASSES))
    for split in ("train", "valid", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == set(CLASSES), split


def test_qupath_geometry_filters_classes():
    def feat(name, box, ot="annotation"):
        a, b, c, d = box
        props = {"objectType": ot}
        if name:
            props["classification"] = {"name": name, "color": [1, 2, 3]}
        return {"type": "Feature", "properties": props, "geometry": {"type": "Polygon",
                "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}}

    gj = {"type": "FeatureCollection", "features": [
        feat("Tumor", (0, 0, 10, 10)), feat("Exclusion", (20, 20, 30, 30)), feat(None, (40, 40, 50, 50)),
        feat("Tumor", (60, 60, 70, 70), ot="detection")]}
    assert qupath_geometry(gj, ["tumor"]).area == 200  # Tumor + unclassified; not Exclusion, not detections
    assert qupath_geometry(gj, ["tumor"], include_unclassified=False).area == 100
    assert qupath_geometry(gj, None, object_types=None).area == 400


def test_input_errors_are_reported_together(two_slides, tmp_path):
    root, _, _ = two_slides
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide": [str(root / "slides/tum.tif"), "missing.tif", str(root / "slides/norm.tif")],
                  "label": ["malignant", "benign", "cancer"]}).to_csv(csv, index=False)
    with pytest.raises(DataError) as err:
        prepare_slide_tiles(csv, tmp_path / "no_annotations", tmp_path / "t", CFG, CLASSES)
    msg = str(err.value)
    assert "no annotation file" in msg and "missing.tif" in msg and "'cancer'" in msg and "\n" not in msg
    # a normal slide with tumour polygons is inconsistent
    pd.DataFrame({"slide": [str(root / "slides/tum.tif")], "label": ["benign"], "split": ["train"],
                  "annotations": [str(root / "annotations/tum.geojson")]}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match="normal slide"):
        prepare_slide_tiles(csv, None, tmp_path / "t", CFG, CLASSES)
    status = pd.read_csv(tmp_path / "t" / "manifest_slides.csv")  # the failure is recorded, nothing else written
    assert status.status.tolist() == ["failed"] and "tumour polygons" in status.error[0]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["manifest_slides.csv"]
    shutil.rmtree(tmp_path / "t")
    # too few groups to split by slide
    pd.DataFrame({"slide": [str(root / "slides/tum.tif"), str(root / "slides/norm.tif")],
                  "label": ["malignant", "benign"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="split column"):
        prepare_slide_tiles(csv, root / "annotations", tmp_path / "t", CFG, CLASSES)
    assert not (tmp_path / "t").exists()


def test_one_failing_slide_does_not_stop_the_cohort(two_slides, tmp_path):
    """A corrupt slide is recorded as failed; the others are tiled; the error names it at the end."""
    root, _, good = two_slides
    shutil.copy(root / "slides/tum.tif", tmp_path / "broken.tif")
    data = (tmp_path / "broken.tif").read_bytes()
    (tmp_path / "broken.tif").write_bytes(data[: len(data) // 3])
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide": [str(root / "slides/tum.tif"), str(tmp_path / "broken.tif"), str(root / "slides/norm.tif")],
                  "label": ["malignant", "benign", "benign"], "split": ["train"] * 3}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match="1 of 3 slide") as err:
        prepare_slide_tiles(csv, root / "annotations", tmp_path / "t", CFG, CLASSES, seed=0)
    assert "broken.tif" in str(err.value) and "\n" not in str(err.value)
    status = pd.read_csv(tmp_path / "t" / "manifest_slides.csv", keep_default_na=False)
    assert status.status.tolist() == ["ok", "failed", "ok"] and "broken.tif" in status.error[1]
    assert status.tiles[0] > 0 and status.tiles[2] > 0
    made = pd.read_csv(tmp_path / "t" / "manifest.csv")
    assert set(made.slide) == {str(root / "slides/tum.tif"), str(root / "slides/norm.tif")}
    assert len(made) == len(pd.read_csv(good))  # the same tiles as without the broken slide
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_slide_too_large_for_its_pyramid_fails_alone(two_slides, tmp_path):
    """max_tissue_read_mpx: a slide whose tissue mask would decode too many pixels fails with the reason."""
    root, _, _ = two_slides
    cfg = SlideTilesConfig(tile_size=128, mpp=2.0, min_tissue=0.1, min_tumour=0.2, max_tissue_read_mpx=1e-4)
    with pytest.raises(SlideError, match="2 of 2") as err:
        prepare_slide_tiles(root / "slides.csv", root / "annotations", tmp_path / "t", cfg, CLASSES, seed=0)
    assert "Mpx" in str(err.value) and "pyramidal TIFF" in str(err.value)
    assert not (tmp_path / "t" / "manifest.csv").exists()
