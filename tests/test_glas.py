"""GlaS import on a miniature folder laid out like the real Warwick-QU release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medwsol.data.glas import (
    GLAS_NAMES,
    GLAS_RELEASE_NAME,
    GLAS_TEST,
    GLAS_TRAIN,
    GLAS_VALID,
    glas_split_table,
    prepare_glas,
)
from medwsol.data.manifest import load_manifest
from medwsol.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# name -> (patient ID, GlaS grade). The valid names follow GLAS_VALID's order:
# 24 B, 54 M, 5 B, 36 B, 26 M, 77 B, 74 M, 18 M  -> valpx = 24, 5, 36 (benign) + 54, 26, 74 (malignant)
GRADES = {
    "train_1": (1, "malignant"),
    "train_3": (1, "malignant"),
    "train_24": (2, "benign"),
    "train_54": (3, "malignant"),
    "train_5": (4, "benign"),
    "train_36": (5, "benign"),
    "train_26": (6, "malignant"),
    "train_77": (7, "benign"),
    "train_74": (8, "malignant"),
    "train_18": (9, "malignant"),
    "testA_1": (4, "benign"),
    "testB_2": (10, "malignant"),
}


def _release(parent: Path, names=GRADES) -> Path:
    folder = parent / GLAS_RELEASE_NAME
    folder.mkdir(parents=True)
    lines = ["name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for i, (name, (pid, grade)) in enumerate(names.items()):
        lines.append(f"{name}, {pid}, {grade}, {'adenomatous' if grade == 'benign' else 'moderately differentiated'}")
        rng = np.random.default_rng(i)
        w, h = (36, 24) if i % 2 else (30, 20)  # two image sizes, as in the release
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.bmp")
        anno = np.zeros((h, w), np.uint8)
        anno[2:8, 3:12] = 1  # gland instance 1
        anno[10:18, 15:25] = 2  # gland instance 2
        anno[h - 3 :, w - 4 :] = 7
        Image.fromarray(anno).save(folder / f"{name}_anno.bmp")
    (folder / "Grade.csv").write_text("\n".join(lines) + "\n")
    return folder


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_prepare_glas_labels_masks_groups_split(tmp_path):
    folder = _release(tmp_path / "downloads")
    before = _listing(folder)
    out = tmp_path / "manifests" / "glas.csv"
    assert prepare_glas(folder, out) == out
    assert _listing(folder) == before  # nothing written into the user's folder

    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert raw["mask"][0].startswith("glas_masks/")
    df = load_manifest(out, ["benign", "malignant"])
    df.index = [Path(p).stem for p in df["image_path"]]
    assert set(df.index) == set(GRADES)
    for name, (pid, grade) in GRADES.items():
        assert df.at[name, "label"] == grade
        assert df.at[name, "group"] == str(pid)
    assert df.at["train_24", "split"] == "valid"
    assert df.at["train_1", "split"] == "train" and df.at["train_3", "split"] == "train"
    assert df.at["testA_1", "split"] == "test" and df.at["testB_2", "split"] == "test"
    assert set(df.index[df["valpx"] == 1]) == {"train_24", "train_5", "train_36", "train_54", "train_26", "train_74"}
    assert df.at["train_77", "valpx"] == 0 and df.at["train_18", "valpx"] == 0
    assert list(df.index[:3]) == ["train_1", "train_3", "train_5"]  # natural order, train first

    for name in GRADES:
        anno = np.asarray(Image.open(folder / f"{name}_anno.bmp"))
        mask = np.asarray(Image.open(df.at[name, "mask_path"]))
        assert Path(df.at[name, "mask_path"]).parent == (tmp_path / "manifests" / "glas_masks").resolve()
        assert mask.shape == anno.shape and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, anno > 0)
        assert df.at[name, "image_path"] == str((folder / f"{name}.bmp").resolve())


def test_parent_folder_and_custom_masks_dir(tmp_path):
    _release(tmp_path / "GlaS")
    out = tmp_path / "glas.csv"
    prepare_glas(tmp_path / "GlaS", out, masks_dir=tmp_path / "masks")
    df = load_manifest(out, ["benign", "malignant"])
    assert len(df) == len(GRADES)
    assert all(Path(m).parent == (tmp_path / "masks").resolve() for m in df["mask_path"])
    prepare_glas(tmp_path / "GlaS", out, masks_dir=tmp_path / "masks")  # re-running replaces its own masks


def test_missing_grade_csv(tmp_path):
    folder = _release(tmp_path)
    (folder / "Grade.csv").unlink()
    with pytest.raises(DataError) as e:
        prepare_glas(folder, tmp_path / "out.csv")
    msg = str(e.value)
    assert "\n" not in msg and "Grade.csv: not found" in msg and "fix:" in msg


def test_missing_and_unreadable_bmps_reported_together(tmp_path):
    folder = _release(tmp_path)
    (folder / "train_24.bmp").unlink()
    (folder / "testA_1.bmp").write_bytes(b"BM garbage")
    with pytest.raises(DataError) as e:
        prepare_glas(folder, tmp_path / "out.csv")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{folder / 'Grade.csv'}: 2 problems:")
    assert "train_24.bmp not found" in msg and "testA_1.bmp unreadable BMP" in msg
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "glas_masks").exists()


def test_unreadable_annotation_names_file(tmp_path):
    folder = _release(tmp_path)
    (folder / "train_3_anno.bmp").write_bytes(b"nonsense")
    with pytest.raises(DataError, match=r"train_3_anno\.bmp: unreadable BMP"):
        prepare_glas(folder, tmp_path / "out" / "glas.csv")
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or not list(out_dir.iterdir())  # the temp masks folder was removed


def test_bad_grade_and_unknown_name(tmp_path):
    folder = _release(tmp_path, {"train_1": (1, "malignant"), "train_99": (2, "benign")})
    csv = folder / "Grade.csv"
    csv.write_text(csv.read_text().replace(" malignant,", " malign,"))
    with pytest.raises(DataError) as e:
        prepare_glas(folder, tmp_path / "o.csv")
    assert "grade (GlaS) 'malign' of train_1" in str(e.value) and "name 'train_99' is not a GlaS image" in str(e.value)


def test_outputs_never_inside_release_nor_over_other_files(tmp_path):
    folder = _release(tmp_path)
    with pytest.raises(DataError, match="inside the GlaS release folder"):
        prepare_glas(folder, folder / "glas.csv")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="masks_dir holds other files"):
        prepare_glas(folder, tmp_path / "glas.csv", masks_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_split_csv_matches_constants():
    committed = pd.read_csv(REPO / "data_manifests" / "glas_split.csv", dtype={"valid_order": "Int64"})
    pd.testing.assert_frame_equal(committed, glas_split_table())
    assert len(GLAS_NAMES) == 165 and len(set(GLAS_NAMES)) == 165
    assert len(GLAS_TRAIN) == 85 and len(GLAS_TEST) == 80
    assert len(GLAS_VALID) == 18 and set(GLAS_VALID) <= set(GLAS_TRAIN)
    counts = committed["split"].value_counts().to_dict()
    assert counts == {"train": 67, "valid": 18, "test": 80}
    valid = committed[committed["split"] == "valid"].sort_values("valid_order")
    assert tuple(valid["name"]) == GLAS_VALID
    assert valid["valid_order"].tolist() == list(range(1, 19))
