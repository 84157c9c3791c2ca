"""medwsol.export.overlay: blends are exact where they must be, PNGs are valid, writes are atomic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medwsol.errors import DataError
from medwsol.export.overlay import (
    blend_heatmap,
    overlay_grid,
    plot_pr_curve,
    plot_training_curves,
    slide_thumbnail,
)
from medwsol.metrics import PixelPR


def png_size(path: Path) -> tuple[int, int]:
    """Width, height of a file that must be a complete, valid PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()  # decodes every byte: a truncated file fails here
        return im.size


def sample(rng: np.random.Generator, h: int = 48, w: int = 64):
    gt = np.zeros((h, w), bool)
    gt[h // 4 : 3 * h // 4, w // 5 : w // 2] = True
    img = np.clip(np.stack([220 - 60 * gt, 170 - 100 * gt, 200 - 40 * gt], -1) + rng.normal(0, 10, (h, w, 3)), 0, 255)
    heat = np.clip(0.7 * gt + 0.3 * rng.random((h, w)), 0, 1)
    return img.astype(np.uint8), gt, heat


# ----------------------------------------------------------------------------- blend_heatmap


def test_blend_alpha_zero_and_one():
    rng = np.random.default_rng(0)
    img, _, heat = sample(rng)
    np.testing.assert_array_equal(blend_heatmap(img, heat, alpha=0.0), img)
    full = blend_heatmap(img, heat, alpha=1.0, cmap="viridis")
    expected = np.round(matplotlib.colormaps["viridis"](heat)[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(full, expected)


def test_blend_half_alpha_is_the_midpoint():
    rng = np.random.default_rng(1)
    img, _, heat = sample(rng)
    out = blend_heatmap(img, heat, alpha=0.5, cmap="inferno")
    colours = matplotlib.colormaps["inferno"](heat)[..., :3] * 255
    mid = (img.astype(float) + colours) / 2
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(float) - mid).max() <= 0.5 + 1e-9


def test_blend_nan_and_mask_keep_the_original_colour():
    rng = np.random.default_rng(2)
    img, gt, heat = sample(rng)
    heat[:10] = np.nan
    for alpha in (0.3, 1.0):
        out = blend_heatmap(img, heat, alpha=alpha)
        np.testing.assert_array_equal(out[:10], img[:10])
        assert (out[10:] != img[10:]).any()
    masked = blend_heatmap(img, np.nan_to_num(heat), alpha=0.8, mask=gt)
    np.testing.assert_array_equal(masked[~gt], img[~gt])
    assert (masked[gt] != img[gt]).any()


def test_blend_accepts_float_grey_and_channel_first_images_and_coarse_heat():
    rng = np.random.default_rng(3)
    img, _, _ = sample(rng)
    heat = rng.random((6, 8))  # a coarse tile grid over a 48x64 image: 8x8 blocks
    ref = blend_heatmap(img, heat)
    np.testing.assert_array_equal(blend_heatmap(img / 255.0, heat), ref)
    np.testing.assert_array_equal(blend_heatmap(np.moveaxis(img, -1, 0), heat), ref)
    up = np.kron(heat, np.ones((8, 8)))
    np.testing.assert_array_equal(ref, blend_heatmap(img, up))
    grey = blend_heatmap(img[..., 0], heat, alpha=0.0)
    np.testing.assert_array_equal(grey, np.repeat(img[..., :1], 3, axis=-1))


def test_blend_rejects_bad_arguments():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="alpha"):
        blend_heatmap(img, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        blend_heatmap(img, np.zeros((4, 4)), cmap="no-such-map")
    with pytest.raises(DataError):
        blend_heatmap(np.zeros((5, 6, 7)), np.zeros((5, 6)))


# ----------------------------------------------------------------------------- figures


def test_overlay_grid_writes_a_png_whose_height_grows_with_rows(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for i in range(3):
        img, gt, heat = sample(rng)
        rows.append(dict(image=img, gt=gt if i else None, weight_map=heat, threshold=0.5, name=f"img{i}",
                         label="benign", pred="malignant" if i == 2 else "benign"))
    rows.append(dict(image=img / 255.0, weight_map=heat[None]))  # float image, [1, H, W] map, no extras
    one = overlay_grid(rows[:1], tmp_path / "one.png")
    many = overlay_grid(rows, tmp_path / "sub" / "many.png", title="test grid")
    w1, h1 = png_size(one)
    w4, h4 = png_size(many)
    assert 1100 <= w1 <= 1500 and w1 == w4  # four ~3-inch panels at 100 dpi
    assert h4 > 2.5 * h1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["many.png", "one.png", "sub"]  # no temp files


def test_overlay_grid_rejects_incomplete_rows(tmp_path):
    with pytest.raises(DataError):
        overlay_grid([], tmp_path / "x.png")
    with pytest.raises(DataError, match="weight_map"):
        overlay_grid([dict(image=np.zeros((8, 8, 3), np.uint8))], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_slide_thumbnail(tmp_path):
    rng = np.random.default_rng(5)
    thumb = np.full((120, 200, 3), 240, np.uint8)
    tissue = np.zeros((120, 200), bool)
    tissue[20:100, 30:170] = True
    thumb[tissue] = (200, 140, 190)
    heat = rng.random((12, 20))
    heat[:2] = np.nan
    out = slide_thumbnail(thumb, heat, tmp_path / "slide.png", title="slide 1", tissue_mask=tissue)
    w, h = png_size(out)
    assert 250 <= w <= 450 and 150 <= h <= 300
    big = slide_thumbnail(np.zeros((1500, 2500, 3), np.uint8), heat, tmp_path / "big.png")
    assert png_size(big)[0] <= 17.5 * 100  # capped at max_inches (+ colour bar)


def test_plot_pr_curve_from_pixel_pr(tmp_path):
    rng = np.random.default_rng(6)
    _, gt, heat = sample(rng)
    pr = PixelPR(1000)
    pr.update(heat, gt)
    p, r = pr.precision_recall()
    w, h = png_size(plot_pr_curve(p, r, tmp_path / "pr.png", label=f"toy PxAP {pr.pxap():.3f}", baseline=gt.mean()))
    assert w == 500 and abs(h - 460) <= 1  # 5.0 x 4.6 in at 100 dpi (4.6 * 100 rounds to 459 with some versions)
    png_size(plot_pr_curve([p, p], [r, r ** 2], tmp_path / "pr2.png", label=["a", "b"]))
    with pytest.raises(DataError):
        plot_pr_curve([p], [r, r], tmp_path / "bad.png", label=["a"])


def test_plot_training_curves_from_csv_and_dataframe(tmp_path):
    df = pd.DataFrame({
        "epoch": [1, 2, 3, 1, 2, 3],
        "split": ["train"] * 3 + ["valid"] * 3,
        "loss": [1.0, 0.7, 0.5, 1.1, 0.8, 0.7],
        "pxap": [np.nan] * 3 + [0.4, 0.5, 0.55],
        "lr": [1e-3, 9e-4, 8e-4] * 2,
        "seconds": [1.0] * 6,
    })
    csv = tmp_path / "train_log.csv"
    df.to_csv(csv, index=False)
    w_csv, h_csv = png_size(plot_training_curves(csv, tmp_path / "curves.png", title="run"))
    assert 1200 <= w_csv <= 1500 and 300 <= h_csv <= 450  # three panels: loss, metrics, lr
    w_df, _ = png_size(plot_training_curves(df[["epoch", "loss"]], tmp_path / "loss_only.png"))
    assert w_df < w_csv / 2
    with pytest.raises(DataError, match="does not exist"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
    with pytest.raises(DataError, match="numeric"):
        plot_training_curves(pd.DataFrame({"epoch": [1], "note": ["x"]}), tmp_path / "x.png")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="no rows"):
        plot_training_curves(tmp_path / "empty.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_training_curves_panels_follow_the_trainer_columns(tmp_path):
    from medwsol.export.overlay import _panel_of

    expected = {
        "train_total": "loss", "train_cls": "loss", "val_loss": "loss", "val_error": "metrics",
        "valpx_pxap": "metrics", "valpx_miou": "metrics", "train_error": "metrics", "valpx_tau": "threshold",
        "lr": "learning rate", "train_images_per_s": None, "best": None, "epoch_seconds": None,
    }
    assert {c: _panel_of(c) for c in expected} == expected
    log = pd.DataFrame({"epoch": [1, 2, 3], "lr": [1e-3, 1e-3, 5e-4], "train_images_per_s": [9.0, 9.5, 9.4],
                        "train_total": [2.0, 1.5, 1.2], "val_error": [40.0, 20.0, 25.0],
                        "valpx_pxap": [50.0, 60.0, 58.0], "valpx_tau": [0.4, 0.45, 0.5], "best": [1, 1, 0]})
    w, _ = png_size(plot_training_curves(log, tmp_path / "trainer.png"))
    assert 1650 <= w <= 1950  # four panels: loss, metrics, threshold, learning rate


# ----------------------------------------------------------------------------- atomic writes


def test_unwritable_folder_raises_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(7)
    img, gt, heat = sample(rng)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError):
        overlay_grid([dict(image=img, gt=gt, weight_map=heat)], blocker / "grid.png")
    with pytest.raises(OSError):
        slide_thumbnail(img, heat, blocker / "deeper" / "slide.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(PermissionError):
                slide_thumbnail(img, heat, locked / "slide.png")
            assert not list(locked.iterdir())
        finally:
            locked.chmod(0o700)


def test_failure_while_writing_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    rng = np.random.default_rng(8)
    img, gt, heat = sample(rng)
    out = tmp_path / "slide.png"
    slide_thumbnail(img, heat, out)
    before = out.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        slide_thumbnail(img, np.zeros_like(heat), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["slide.png"]


def test_import_is_light_and_pyplot_is_never_used():
    code = (
        "import sys, numpy as np\n"
        "import medwsol.export.overlay as o\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at module import'\n"
        "o.blend_heatmap(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4)))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- what the PNGs show


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _region(png: np.ndarray, colour, tol: int = 0) -> tuple[int, int, int, int, float]:
    """Bounding box (top, bottom, left, right) of the pixels of ``colour`` (within ``tol``) and how full it is."""
    hit = np.all(np.abs(png.astype(int) - np.asarray(colour, int)) <= tol, axis=-1)
    assert hit.any(), f"colour {tuple(colour)} is nowhere in the PNG"
    # the block: rows and columns holding at least half as many such pixels as the fullest one
    # (stray anti-aliased pixels of text and frames elsewhere do not stretch the box)
    rows = np.nonzero(hit.sum(1) >= hit.sum(1).max() / 2)[0]
    cols = np.nonzero(hit.sum(0) >= hit.sum(0).max() / 2)[0]
    t, b, l, r = rows.min(), rows.max(), cols.min(), cols.max()
    return t, b, l, r, hit[t : b + 1, l : r + 1].mean()


def _cmap_colour(value: float, name: str = "inferno") -> tuple[int, int, int]:
    """The colour map's colour; matplotlib renders it through a 256-entry uint8 table (so compare within 2)."""
    return tuple(int(v) for v in np.round(np.asarray(matplotlib.colormaps[name](value)[:3]) * 255))


def test_overlay_grid_png_shows_image_truth_map_and_mask_in_place(tmp_path):
    """Left half blue, right half green; truth and map = the right half: each panel's pixels are where they belong."""
    h, w = 48, 64
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (20, 40, 230)
    img[:, w // 2 :] = (30, 200, 60)
    right = np.zeros((h, w), bool)
    right[:, w // 2 :] = True
    png = _read(overlay_grid([dict(image=img, gt=right, weight_map=right * 1.0, threshold=0.5)], tmp_path / "g.png"))
    blue = _region(png, (20, 40, 230))  # only in the image panel
    half = blue[3] - blue[2] + 1  # screen width of half a panel
    green = _region(png[:, : blue[3] + half + 3], (30, 200, 60))  # the image panel's green half
    hot = _region(png, _cmap_colour(1.0), tol=2)  # weight 1 on the right half of the map panel
    cold = _region(png, _cmap_colour(0.0), tol=2)  # weight 0 on its left half (near black: not the truth's black)
    dimmed = _region(png, (6, 12, 69))  # the mask panel: outside the mask the image at 30 %
    kept = _region(png[:, dimmed[3] + 1 :], (30, 200, 60))  # ... and inside it the image itself
    kept = (kept[0], kept[1], kept[2] + dimmed[3] + 1, kept[3] + dimmed[3] + 1, kept[4])
    for box in (blue, green, hot, cold, dimmed, kept):
        assert box[4] > 0.9, box  # solid rectangles, not scattered pixels
    scale = (blue[1] - blue[0] + 1) / h  # screen pixels per image pixel
    assert 2.0 < scale < 6.0
    for box in (blue, green, hot, cold, dimmed, kept):  # every half-panel is 32 x 48 image pixels, in the same rows
        assert abs((box[3] - box[2] + 1) / scale - w / 2) <= 2 and abs((box[1] - box[0] + 1) / scale - h) <= 2, box
        assert abs(box[0] - blue[0]) <= 2
    assert green[2] == blue[3] + 1  # the image panel: green right next to blue
    assert cold[3] + 1 == hot[2]  # the map panel: cold left half, hot right half
    assert 0 <= kept[2] - (dimmed[3] + 1) <= 4  # the mask panel: dimmed left half, kept right half, ...
    gap = png[dimmed[0] + 5 : dimmed[1] - 5, dimmed[3] - 2 : kept[2] + 3]
    assert np.all(np.abs(gap.astype(int) - (0, 229, 255)) <= 40, axis=-1).any(axis=1).all()  # ... the cyan truth outline
    assert blue[2] < cold[2] < dimmed[2]  # panel order: image | truth | map | mask
    between = np.all(png[blue[0] : blue[1] + 1, green[3] + 1 : cold[2]] == 0, axis=-1)  # the truth panel's black
    assert between.sum() / scale**2 == pytest.approx(h * w / 2, rel=0.1)  # background half: 32 x 48 image pixels
    white = np.all(png[blue[0] : blue[1] + 1, green[3] + 1 : cold[2]] == 255, axis=-1)
    assert white.sum() / scale**2 > 0.9 * h * w / 2  # the truth half, white (plus the white margins)


def test_slide_thumbnail_png_blends_heat_only_where_it_is_defined(tmp_path):
    thumb = np.full((100, 200, 3), 200, np.uint8)
    heat = np.full((10, 20), np.nan)
    heat[:, 10:] = 1.0  # heat on the right half, none (NaN) on the left
    png = _read(slide_thumbnail(thumb, heat, tmp_path / "s.png"))
    hot = np.round(0.5 * 200 + 0.5 * np.asarray(matplotlib.colormaps["inferno"](1.0)[:3]) * 255)
    grey = _region(png, (200, 200, 200))  # NaN heat: the thumbnail's own colour, exactly
    blend = _region(png, hot, tol=1)
    assert grey[4] > 0.95 and blend[4] > 0.95
    assert blend[2] == grey[3] + 1 and (grey[0], grey[1]) == (blend[0], blend[1])  # side by side, same rows
    assert abs((grey[3] - grey[2]) - (blend[3] - blend[2])) <= 1  # two equal halves
    assert abs((grey[3] - grey[2] + blend[3] - blend[2] + 2) / (grey[1] - grey[0] + 1) - 2.0) < 0.05  # 2:1 thumbnail
    bar = png[grey[0] : grey[1] + 1, blend[3] + 2 :]  # the colour bar, right of the image: from near black to light
    for v in (0.02, 0.5, 0.98):  # the bar is ~80 px for 256 colours: accept a neighbouring colour
        near = [_cmap_colour(u) for u in np.linspace(v - 0.02, v + 0.02, 11)]
        assert any(np.all(np.abs(bar.astype(int) - c) <= 3, axis=-1).any() for c in near), v
