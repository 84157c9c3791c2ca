"""The built-in synthetic H&E gland dataset: images, masks, manifest, splits, atomic output."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi

from medwsol.data.synthetic import (
    MANIFEST_COLUMNS,
    REFERENCE_STAIN,
    make_synthetic_dataset,
    sample_patient_stain,
    synth_gland_image,
)
from medwsol.errors import DataError

# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [0, 1])
def test_same_seed_same_image_other_seed_other_image(label):
    a_rgb, a_mask = synth_gland_image(np.random.default_rng(3), label, 96)
    b_rgb, b_mask = synth_gland_image(np.random.default_rng(3), label, 96)
    c_rgb, c_mask = synth_gland_image(np.random.default_rng(4), label, 96)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_rgb, c_rgb)
    assert not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("size", [64, 128, 200])
@pytest.mark.parametrize("label", [0, 1])
def test_shapes_dtypes_binary_mask(label, size):
    rgb, mask = synth_gland_image(np.random.default_rng(size), label, size)
    assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    # not a flat image: tissue texture and dark nuclei
    assert rgb.std() > 10 and rgb.min() < 120 and rgb.max() > 200


def _batch(label: int, n: int, size: int, base: int = 11):
    return [synth_gland_image(np.random.default_rng([base, i]), label, size) for i in range(n)]


@pytest.fixture(scope="module")
def pairs():
    """12 benign / malignant pairs drawn from the same rng seeds (same stain and stroma draws)."""
    return _batch(0, 12, 128), _batch(1, 12, 128)


def test_foreground_fraction_sane_and_similar_in_both_classes(pairs):
    fg = {lab: np.array([m.mean() for _, m in batch]) for lab, batch in enumerate(pairs)}
    for lab in (0, 1):
        assert fg[lab].min() > 0.2 and fg[lab].max() < 0.6, (lab, fg[lab])
    # gland area is not what tells the classes apart
    assert abs(fg[0].mean() - fg[1].mean()) < 0.06


def test_stroma_is_class_independent_while_glands_differ(pairs):
    stroma, glands = {0: [], 1: []}, {0: [], 1: []}
    for lab, batch in enumerate(pairs):
        for rgb, mask in batch:
            m = mask.astype(bool)
            bg = ~ndi.binary_dilation(m, iterations=4)  # stroma away from gland borders
            stroma[lab].append(rgb[bg].astype(np.float64))
            glands[lab].append(rgb[ndi.binary_erosion(m, iterations=1)].astype(np.float64))
    s0, s1 = np.concatenate(stroma[0]), np.concatenate(stroma[1])
    # same stroma statistics: mean and spread of RGB within a few levels
    assert np.all(np.abs(s0.mean(0) - s1.mean(0)) < 4.0), (s0.mean(0), s1.mean(0))
    assert np.all(np.abs(s0.std(0) - s1.std(0)) < 3.0), (s0.std(0), s1.std(0))
    # and the class evidence is inside the glands: malignant glands are much darker (crowded nuclei)
    g0, g1 = np.concatenate(glands[0]), np.concatenate(glands[1])
    assert np.all(g0.mean(0) - g1.mean(0) > 15.0), (g0.mean(0), g1.mean(0))


def _nuclear_fraction(rgb: np.ndarray, region: np.ndarray) -> float:
    """Fraction of pixels of a region that are haematoxylin-dark (nuclei)."""
    dark = rgb.astype(np.int32).sum(-1) < 360
    return float(dark[region].mean())


def test_morphology_benign_regular_malignant_crowded(pairs):
    benign, malignant = pairs
    nf_b = np.mean([_nuclear_fraction(rgb, m.astype(bool)) for rgb, m in benign])
    nf_m = np.mean([_nuclear_fraction(rgb, m.astype(bool)) for rgb, m in malignant])
    assert nf_m > 2 * nf_b  # crowded, enlarged nuclei fill malignant epithelium
    # benign glands are round (high solidity); malignant outlines are irregular
    from skimage.measure import label as cc, regionprops

    def mean_solidity(batch):
        vals = []
        for _, m in batch:
            lab = cc(m)
            for rp in regionprops(lab):
                minr, minc, maxr, maxc = rp.bbox
                inside = minr > 0 and minc > 0 and maxr < m.shape[0] and maxc < m.shape[1]
                if inside and rp.area > 150:
                    vals.append(rp.solidity)
        return np.mean(vals)

    assert mean_solidity(benign) > 0.95
    assert mean_solidity(malignant) < mean_solidity(benign) - 0.04
    # benign glands have a clear lumen: many near-white pixels inside the glands
    lum_b = np.mean([(rgb[m.astype(bool)].min(-1) > 215).mean() for rgb, m in benign])
    assert lum_b > 0.25


def test_stain_changes_colour_not_layout():
    s1 = sample_patient_stain(np.random.default_rng(1))
    s2 = sample_patient_stain(np.random.default_rng(2))
    assert s1.shape == (2, 3) and np.all(s1 > 0) and not np.allclose(s1, s2)
    a_rgb, a_mask = synth_gland_image(np.random.default_rng(5), 1, 96, stain=s1)
    b_rgb, b_mask = synth_gland_image(np.random.default_rng(5), 1, 96, stain=s2)
    assert np.array_equal(a_mask, b_mask)
    assert np.abs(a_rgb.astype(int) - b_rgb.astype(int)).mean() > 2


def test_bad_arguments_are_data_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="label"):
        synth_gland_image(rng, 2, 64)
    with pytest.raises(DataError, match="size"):
        synth_gland_image(rng, 0, 16)
    with pytest.raises(DataError, match="stain"):
        synth_gland_image(rng, 0, 64, stain=REFERENCE_STAIN[:1])


# -- dataset -----------------------------------------------------------------------------------


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    manifest = make_synthetic_dataset(out, n_images=40, size=64, seed=3, n_valpx=4, progress=False)
    return out, manifest


def test_manifest_columns_paths_and_files(dataset):
    out, manifest = dataset
    assert manifest == out / "manifest.csv"
    df = pd.read_csv(manifest)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert len(df) == 40 and df["image"].is_unique
    for col in ("image", "mask"):
        assert not any(Path(p).is_absolute() for p in df[col])
        assert all((out / p).is_file() for p in df[col])
    # every file in the folder is listed (nothing stray)
    listed = set(df["image"]) | set(df["mask"]) | {"manifest.csv"}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == listed
    rgb = np.asarray(Image.open(out / df["image"][0]))
    mask = np.asarray(Image.open(out / df["mask"][0]))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) <= {0, 255} and mask.max() == 255


def test_labels_balanced_in_every_split(dataset):
    df = pd.read_csv(dataset[1])
    assert set(df["label"]) == {"benign", "malignant"}
    assert set(df["split"]) == {"train", "valid", "test"}
    counts = pd.crosstab(df["split"], df["label"])
    assert (counts["benign"] == counts["malignant"]).all(), counts
    assert counts.loc["test"].sum() == 12 and counts.loc["valid"].sum() == 6  # round(0.3*20), round(0.15*20)


def test_groups_are_patients_in_one_split_with_one_label(dataset):
    df = pd.read_csv(dataset[1])
    per_group = df.groupby("group").agg(
        splits=("split", "nunique"), labels=("label", "nunique"), n=("image", "size")
    )
    assert (per_group["splits"] == 1).all() and (per_group["labels"] == 1).all()
    assert per_group["n"].max() <= 4 and (per_group["n"] >= 2).mean() > 0.5  # patients have several images
    splits = {s: set(g["group"]) for s, g in df.groupby("split")}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not splits[a] & splits[b], (a, b)


def test_images_of_a_patient_share_a_stain(dataset):
    out, manifest = dataset
    df = pd.read_csv(manifest)

    def stroma_colour(row):
        rgb = np.asarray(Image.open(out / row["image"])).astype(np.float64)
        bg = ~ndi.binary_dilation(np.asarray(Image.open(out / row["mask"])) > 0, iterations=3)
        return rgb[bg].mean(0)

    colours = np.array([stroma_colour(r) for _, r in df.iterrows()])
    within = np.mean([colours[idx].std(0).mean() for idx in df.groupby("group").indices.values() if len(idx) > 1])
    between = colours.std(0).mean()
    assert within < between


def test_valpx_only_in_valid_and_balanced(dataset):
    df = pd.read_csv(dataset[1])
    vp = df[df["valpx"] == 1]
    assert set(df["valpx"]) <= {0, 1}
    assert len(vp) == 4 and set(vp["split"]) == {"valid"}
    assert vp["label"].value_counts().to_dict() == {"benign": 2, "malignant": 2}
    assert vp["group"].nunique() >= 2  # spread over patients


def test_same_seed_byte_identical_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    again = make_synthetic_dataset(tmp_path / "again", n_images=40, size=64, seed=3, n_valpx=4, progress=False)
    assert _tree_digest(again.parent) == _tree_digest(out)
    other = make_synthetic_dataset(tmp_path / "other", n_images=12, size=64, seed=4, n_valpx=2, progress=False)
    d_other, d_out = _tree_digest(other.parent), _tree_digest(out)
    assert all(d_other[k] != d_out[k] for k in d_other if k.startswith(("images/", "masks/")))


def test_custom_class_names_and_odd_count(tmp_path):
    m = make_synthetic_dataset(tmp_path / "d", n_images=21, size=48, seed=1, classes=("normal", "tumour"),
                               n_valpx=2, progress=False)
    df = pd.read_csv(m)
    assert len(df) == 21
    assert df["label"].value_counts().to_dict() == {"normal": 11, "tumour": 10}


def test_loads_with_the_project_manifest_loader(dataset):
    manifest_mod = pytest.importorskip("medwsol.data.manifest")
    df = manifest_mod.load_manifest(dataset[1], ["benign", "malignant"])
    assert len(df) == 40 and int(df["valpx"].sum()) == 4


# -- atomic output -----------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_images": 8, "n_valpx": 6}, "n_images"),  # valid would swallow the training set
        ({"classes": ("benign",)}, "classes"),
        ({"classes": ("a", "a")}, "classes"),
        ({"valid_fraction": 0.6, "test_fraction": 0.5}, "valid_fraction"),
        ({"size": 8}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, match):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        make_synthetic_dataset(out, progress=False, **{"n_images": 8, "size": 48, "n_valpx": 2, **kwargs})
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="precious.txt"):
        make_synthetic_dataset(out, n_images=8, size=48, n_valpx=2, progress=False)
    assert (out / "precious.txt").read_text() == "keep me" and not _leftovers(tmp_path, "data")


def test_rerun_replaces_an_existing_synthetic_dataset(tmp_path):
    out = tmp_path / "data"
    make_synthetic_dataset(out, n_images=8, size=48, seed=0, n_valpx=2, progress=False)
    (out / ".medwsol-synthetic.json").write_text("{}")  # the pipeline's stamp may sit there
    make_synthetic_dataset(out, n_images=10, size=48, seed=1, n_valpx=2, progress=False)
    assert len(pd.read_csv(out / "manifest.csv")) == 10
    assert len(list((out / "images").iterdir())) == 10 and not _leftovers(tmp_path, "data")


def test_output_under_a_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="blocker"):
        make_synthetic_dataset(blocker / "data", n_images=8, size=48, n_valpx=2, progress=False)
    assert blocker.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


def test_interrupted_mid_way_leaves_nothing(tmp_path):
    """Ctrl-C while images are being written: no out_dir, no temporary folder left."""
    out = tmp_path / "data"
    code = (
        # Ctrl-C as in a terminal, even when this test runs in a background job (which inherits SIGINT ignored)
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from medwsol.data.synthetic import make_synthetic_dataset; "
        "make_synthetic_dataset(sys.argv[1], n_images=20000, size=64, n_valpx=2, progress=False)"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        written = 0
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = _leftovers(tmp_path, "data")
            written = len(list((tmps[0] / "images").glob("*.png"))) if tmps and (tmps[0] / "images").is_dir() else 0
            if written >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None and written >= 3, "generation did not start in time"
        assert not out.exists()  # nothing at the final path while it is being built
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert not out.exists()
    assert not _leftovers(tmp_path, "data")
