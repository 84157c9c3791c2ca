"""Manifests: validation (all problems at once), splits, writing and records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medwsol.data.manifest import assign_splits, image_size, load_manifest, split_records, write_manifest
from medwsol.errors import DataError

CLASSES = ["benign", "malignant"]


def _png(path: Path, w: int, h: int, rgb: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3) if rgb else (h, w)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _mask(path: Path, w: int, h: int) -> None:
    arr = np.zeros((h, w), np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def _good(tmp_path: Path) -> Path:
    _png(tmp_path / "images/a.png", 40, 30)
    _mask(tmp_path / "masks/a.png", 40, 30)
    _png(tmp_path / "images/b.png", 32, 32, seed=1)
    rows = [
        {"image": "images/a.png", "mask": "masks/a.png", "label": "benign", "split": "valid", "group": "p1",
         "valpx": 1},
        {"image": "images/b.png", "mask": "", "label": "malignant", "split": "train", "group": "", "valpx": ""},
    ]
    return _csv(tmp_path / "m.csv", rows)


def test_load_valid_manifest_adds_paths_and_indices(tmp_path):
    df = load_manifest(_good(tmp_path), CLASSES)
    assert list(df["label_idx"]) == [0, 1]
    assert df["image_path"][0] == str((tmp_path / "images/a.png").resolve())
    assert Path(df["image_path"][0]).is_absolute() and Path(df["image_path"][0]).is_file()
    assert df["mask_path"][0] == str((tmp_path / "masks/a.png").resolve())
    assert df["mask_path"][1] is None
    assert list(df["valpx"]) == [1, 0]
    assert df["group"][1] == "b"  # empty group -> the image's own stem


def test_all_problems_reported_in_one_line(tmp_path):
    _png(tmp_path / "a.png", 40, 30)
    _mask(tmp_path / "a_mask.png", 30, 40)  # transposed size
    _png(tmp_path / "b.png", 20, 20)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"image": "a.png", "mask": "a_mask.png", "label": "benign", "split": "train", "group": "1"},
        {"image": "missing.png", "mask": "", "label": "benign", "split": "train", "group": "2"},
        {"image": "b.png", "mask": "", "label": "bening", "split": "train", "group": "3"},
        {"image": "b.png", "mask": "", "label": "benign", "split": "tset", "group": "3"},
        {"image": "broken.png", "mask": "", "label": "benign", "split": "valid", "group": "4"},
    ]
    path = _csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as e:
        load_manifest(path, CLASSES)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: 6 problems: ")
    assert "line 2 mask 'a_mask.png' is 30x40 but its image is 40x30" in msg
    assert "line 3 image 'missing.png' not found" in msg
    assert "line 4 label 'bening' not in data.classes [benign, malignant]" in msg
    assert "line 5 image 'b.png' already listed on line 4" in msg
    assert "line 5 split 'tset' is not one of train, valid, test" in msg
    assert "line 6 image 'broken.png': cannot read the image header" in msg
    assert "; fix: " in msg


def test_problem_listing_is_capped(tmp_path):
    rows = [{"image": f"x{i}.png", "mask": "", "label": "benign", "split": "train", "group": ""} for i in range(15)]
    with pytest.raises(DataError) as e:
        load_manifest(_csv(tmp_path / "m.csv", rows), CLASSES)
    msg = str(e.value)
    assert "15 problems" in msg and "; and 5 more; fix:" in msg
    assert "x9.png" in msg and "x10.png" not in msg


def test_missing_columns_and_file(tmp_path):
    _png(tmp_path / "a.png", 20, 20)
    path = _csv(tmp_path / "m.csv", [{"image": "a.png", "label": "benign"}])
    with pytest.raises(DataError, match=r"m\.csv: 1 problem: missing columns mask, split, group; fix: add"):
        load_manifest(path, CLASSES)
    with pytest.raises(DataError, match=r"nope\.csv: manifest not found; fix: "):
        load_manifest(tmp_path / "nope.csv", CLASSES)
    (tmp_path / "empty.csv").write_text("image,mask,label,split,group\n")
    with pytest.raises(DataError, match=r"empty\.csv: 1 problem: no image is listed; fix: "):
        load_manifest(tmp_path / "empty.csv", CLASSES)


def test_valpx_rules(tmp_path):
    _png(tmp_path / "a.png", 20, 20)
    _png(tmp_path / "b.png", 20, 20)
    rows = [
        {"image": "a.png", "mask": "", "label": "benign", "split": "valid", "group": "1", "valpx": "1"},
        {"image": "b.png", "mask": "", "label": "benign", "split": "train", "group": "2", "valpx": "maybe"},
    ]
    with pytest.raises(DataError) as e:
        load_manifest(_csv(tmp_path / "m.csv", rows), CLASSES)
    assert "line 2 valpx is 1 but the row has no mask" in str(e.value)
    assert "line 3 valpx 'maybe' is not 0 or 1" in str(e.value)


def test_nifti_and_mha_headers(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    _png(tmp_path / "a.png", 40, 30)
    m = np.zeros((30, 40), np.uint8)  # rows x cols
    sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / "ok.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / "ok.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((40, 31), np.uint8), np.eye(4)), str(tmp_path / "bad.nii.gz"))
    assert image_size(tmp_path / "ok.mha") == (40, 30)
    assert image_size(tmp_path / "ok.nii.gz") == (40, 30)
    rows = [
        {"image": "a.png", "mask": "ok.mha", "label": "benign", "split": "train", "group": "1"},
        {"image": str(tmp_path / "a.png"), "mask": "ok.nii.gz", "label": "benign", "split": "train", "group": "1"},
    ]
    with pytest.raises(DataError, match="already listed"):  # same file, relative and absolute
        load_manifest(_csv(tmp_path / "m.csv", rows), CLASSES)
    rows[1]["image"] = "a.png"
    rows = rows[:1] + [dict(rows[0], image="a.png", mask="bad.nii.gz")]
    with pytest.raises(DataError) as e:
        load_manifest(_csv(tmp_path / "m2.csv", rows), CLASSES)
    assert "mask 'bad.nii.gz' is 40x31 but its image is 40x30" in str(e.value)


def test_split_optional_only_when_asked(tmp_path):
    _png(tmp_path / "a.png", 20, 20)
    _png(tmp_path / "b.png", 20, 20)
    rows = [{"image": "a.png", "mask": "", "label": "benign", "group": "1"},
            {"image": "b.png", "mask": "", "label": "malignant", "group": "2"}]
    path = _csv(tmp_path / "m.csv", rows)
    df = load_manifest(path, CLASSES, require_split=False)
    assert list(df["split"]) == ["", ""]
    with pytest.raises(DataError, match="missing column split"):
        load_manifest(path, CLASSES)
    rows[0]["split"] = "train"
    rows[1]["split"] = ""
    with pytest.raises(DataError, match="split is empty on line 3"):
        load_manifest(_csv(tmp_path / "m2.csv", rows), CLASSES, require_split=False)


def _cohort(tmp_path: Path, n_groups: int = 24, per_group: int = 3) -> pd.DataFrame:
    rows = []
    for g in range(n_groups):
        label = CLASSES[int(g % 3 == 0)]  # 1/3 malignant groups
        for k in range(per_group):
            name = f"g{g:02d}_{k}.png"
            _png(tmp_path / name, 8, 8, seed=g * 10 + k)
            mask = ""
            if k != 2:  # the third image of a group has no mask
                _mask(tmp_path / f"m_{name}", 8, 8)
                mask = f"m_{name}"
            rows.append({"image": name, "mask": mask, "label": label, "group": f"p{g}"})
    return load_manifest(_csv(tmp_path / "m.csv", rows), CLASSES, require_split=False)


def test_assign_splits_group_disjoint_stratified_deterministic(tmp_path):
    df = _cohort(tmp_path)
    a = assign_splits(df, seed=0, n_folds=4, n_valpx=4)
    b = assign_splits(df, seed=0, n_folds=4, n_valpx=4)
    c = assign_splits(df, seed=1, n_folds=4, n_valpx=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    assert set(a["split"]) == {"train", "valid", "test"}
    groups = {s: set(a.loc[a["split"] == s, "group"]) for s in ("train", "valid", "test")}
    assert not groups["train"] & groups["valid"] and not groups["train"] & groups["test"]
    assert not groups["valid"] & groups["test"]
    overall = (a["label_idx"] == 1).mean()
    for s in ("train", "valid", "test"):
        frac = (a.loc[a["split"] == s, "label_idx"] == 1).mean()
        assert abs(frac - overall) < 0.2, (s, frac, overall)
    assert abs((a["split"] == "test").mean() - 0.25) < 0.1
    vp = a[a["valpx"] == 1]
    assert len(vp) == 4 and set(vp["split"]) == {"valid"}
    assert vp["mask_path"].notna().all()
    assert list(vp["label_idx"].value_counts().sort_index()) == [2, 2]


def test_assign_splits_needs_groups(tmp_path):
    df = _cohort(tmp_path, n_groups=2, per_group=2)
    with pytest.raises(DataError, match="group"):
        assign_splits(df)


def test_write_manifest_roundtrip_relative(tmp_path):
    df = load_manifest(_good(tmp_path), CLASSES)
    out = tmp_path / "sub" / "copy.csv"
    assert write_manifest(df, out) == out
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(raw.columns[:6]) == ["image", "mask", "label", "split", "group", "valpx"]
    assert "image_path" not in raw.columns and "label_idx" not in raw.columns
    assert raw["image"][0] == "../images/a.png" and raw["mask"][1] == ""
    again = load_manifest(out, CLASSES)
    assert list(again["image_path"]) == list(df["image_path"])
    assert list(again["valpx"]) == [1, 0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.csv"]  # no temp file left


def test_split_records(tmp_path):
    df = load_manifest(_good(tmp_path), CLASSES)
    train = split_records(df, "train")
    assert train == [{"image": str((tmp_path / "images/b.png").resolve()), "label": 1, "name": "b"}]
    (valpx,) = split_records(df, "valpx")
    assert valpx["mask"] == str((tmp_path / "masks/a.png").resolve()) and valpx["name"] == "a"
    assert len(split_records(df, "all")) == 2 and split_records(df, "test") == []
    with pytest.raises(DataError, match="unknown split; fix: use one of train, valid, test, valpx, all"):
        split_records(df, "validation")
