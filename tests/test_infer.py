"""medwsol.engine.infer: batched slide inference, stitching, per-slide outputs, cohorts.

Slides are small pyramidal TIFFs written here with tifffile; models are tiny ``nn.Module``s that
return ``WSOLOutput`` (a constant map, or a map read off the pixels, so the stitched heatmap can be
checked against the slide's own content).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from medwsol.config import SlidesConfig
from medwsol.engine.infer import BandedZarrMerger, infer_cohort, infer_slide, load_heatmap, rebuild_summary
from medwsol.engine.served import ServedModel
from medwsol.methods.base import WSOLOutput

CLASSES = ["benign", "malignant"]


def write_slide(path, img, mpp=0.5, levels=3, tile=256, compression="deflate"):
    """A pyramidal tiled TIFF (top-level page per level, downsample 2**l, cm resolution tags)."""
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            im = np.ascontiguousarray(img[:: 2**lvl, :: 2**lvl])
            if lvl and min(im.shape[:2]) < 16:
                break
            kw = {"resolution": (1e4 / (mpp * 2**lvl),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tw.write(im, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=0 if lvl == 0 else 1, **kw)
    return path


def gradient(h, w):
    """R encodes x, G encodes y (55..255 across the slide), B = 20: tissue (saturated) everywhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([55 + 200 * xx / w, 55 + 200 * yy / h, np.full(xx.shape, 20.0)], -1).astype(np.uint8)


def islands(h, w, discs):
    img = np.full((h, w, 3), 238, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx, cy, r in discs:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (205, 110, 170)
    return img


class ConstModel(torch.nn.Module):
    """Weight map = ``value`` everywhere; class scores favour 'malignant'."""

    def __init__(self, value: float = 0.7):
        super().__init__()
        self.value = value

    def forward(self, x):
        b, _, h, w = x.shape
        return WSOLOutput(logits=torch.tensor([[0.0, 1.0]]).repeat(b, 1), weight_map=torch.full((b, 1, h, w), self.value))


class ChannelModel(torch.nn.Module):
    """Weight map = the pixel's R (ch=0, i.e. x on the gradient slide) or G (ch=1, y), decoded to [0, 1]."""

    def __init__(self, ch: int):
        super().__init__()
        self.ch = ch

    def forward(self, x):
        w = ((x[:, self.ch : self.ch + 1] * 255 - 55) / 200).clamp(0, 1)
        return WSOLOutput(logits=torch.zeros(x.shape[0], 2), weight_map=w)


def serve(module, tau=0.5, score="weight", positive="malignant", digest=None):
    """The ServedModel the slide path runs (no map range: the test modules' maps are served as they are)."""
    return ServedModel(module, CLASSES, positive, score, map_range=None, tau=tau, tau_source="test", digest=digest)


def cfg(**kw):
    base = dict(target_mpp=1.0, tile_size=64, overlap=0, output_mpp=4.0, tissue_mpp=8.0, min_tissue=0.1,
                batch_size=16, num_workers=0, overwrite=False)
    base.update(kw)
    return SlidesConfig(**base)


@pytest.fixture(scope="module")
def grad_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("grad") / "grad.tif", gradient(1200, 1800))


# ------------------------------------------------------------------------------------- stitching


@pytest.mark.parametrize(
    "overlap, target_mpp, output_mpp, disk",
    [(0, 1.0, 4.0, False), (32, 1.0, 4.0, False), (64, 1.0, 4.0, True), (96, 1.0, 4.0, False),
     (0, 1.0, 3.0, False), (20, 1.5, 2.5, True), (10, 0.5, 1.5, False)],
)
def test_constant_model_gives_seamless_constant_heatmap(tmp_path, grad_slide, overlap, target_mpp, output_mpp, disk):
    """Any overlap, and tile/heatmap pixel ratios that are not integers (boxes of varying size)."""
    c = cfg(overlap=overlap, target_mpp=target_mpp, output_mpp=output_mpp, tile_size=128)
    row = infer_slide(serve(ConstModel(0.7), tau=0.5), grad_slide, c, tmp_path, "cpu", progress=False,
                      disk_threshold_px=0 if disk else 10**9)
    assert row["status"] == "ok" and row["tiles"] > 4
    heat, cov, meta = load_heatmap(tmp_path / "grad")
    assert meta["heatmap_format"] == ("zarr" if disk else "npy")
    heat, cov = np.asarray(heat[:]), np.asarray(cov[:])
    assert heat.dtype == np.float32 and cov.dtype == bool
    k = output_mpp / 0.5
    assert heat.shape == (int(np.ceil(1200 / k)), int(np.ceil(1800 / k))) == tuple(meta["heatmap_shape"])
    assert cov.all()  # no gaps between tiles
    np.testing.assert_allclose(heat, 0.7, atol=1e-6)  # no seams from overlap averaging
    assert row["max_score"] == pytest.approx(0.7) and row["mean_score"] == pytest.approx(0.7)


@pytest.mark.parametrize("ch, overlap, disk", [(0, 0, False), (1, 0, False), (0, 48, True), (1, 48, True)])
def test_heatmap_follows_slide_coordinates(tmp_path, grad_slide, ch, overlap, disk):
    """x increases left to right (ch 0), y top to bottom (ch 1): no transposed or shifted axes."""
    row = infer_slide(serve(ChannelModel(ch), tau=0.5), grad_slide, cfg(overlap=overlap, tile_size=128), tmp_path, "cpu",
                      progress=False, disk_threshold_px=0 if disk else 10**9)
    assert row["status"] == "ok"
    heat, cov, meta = load_heatmap(tmp_path / "grad")
    heat = np.asarray(heat[:])
    k = meta["level0_per_heatmap_px"]
    assert k == pytest.approx(8.0)
    if ch == 0:
        expected = ((np.arange(heat.shape[1]) + 0.5) * k / 1800)[None, :]
        assert (np.diff(heat.mean(0)) > 0).all() and np.abs(np.diff(heat, axis=0)).max() < 0.01
    else:
        expected = ((np.arange(heat.shape[0]) + 0.5) * k / 1200)[:, None]
        assert (np.diff(heat.mean(1)) > 0).all() and np.abs(np.diff(heat, axis=1)).max() < 0.01
    assert np.abs(heat - expected).max() < 0.01
    tiles = pd.read_csv(tmp_path / "grad" / "tiles.csv")
    # the tile's mean weight is its centre's coordinate
    centre = (tiles.x + tiles.w / 2) / 1800 if ch == 0 else (tiles.y + tiles.h / 2) / 1200
    inside = (tiles.x + tiles.w <= 1800) & (tiles.y + tiles.h <= 1200)
    assert np.abs(tiles.mean_weight[inside] - centre[inside]).max() < 0.01


@pytest.mark.parametrize("positive, expected", [(None, 0.7 / (1 + np.exp(-1.0))), ("benign", 0.7 / (1 + np.exp(1.0)))])
def test_weight_x_prob_scales_the_map_by_the_positive_class(tmp_path, grad_slide, positive, expected):
    """``score: weight_x_prob``: heatmap = weight map x softmax(logits)[positive_class] (default: last class)."""
    c = cfg(tile_size=128)
    infer_slide(serve(ConstModel(0.7), score="weight_x_prob", positive=positive or "malignant"), grad_slide, c,
                tmp_path, "cpu", progress=False)
    heat, _, meta = load_heatmap(tmp_path / "grad")
    np.testing.assert_allclose(np.asarray(heat[:]), expected, atol=1e-5)
    assert meta["score"] == "weight_x_prob" and meta["positive_class"] == (positive or "malignant")
    tiles = pd.read_csv(tmp_path / "grad" / "tiles.csv")
    np.testing.assert_allclose(tiles.mean_weight, 0.7, atol=1e-6)  # the raw weight, unscaled


def test_banded_zarr_merger_matches_avg_merger(tmp_path):
    from monai.inferers import AvgMerger

    rng = np.random.default_rng(0)
    shape = (1, 1, 70, 90)
    ref = AvgMerger(merged_shape=shape, count_dtype=torch.int32)
    band = BandedZarrMerger(shape, store=tmp_path / "h.zarr", coverage_store=tmp_path / "c.zarr", chunks=8)
    locs = sorted((int(r), int(c)) for r, c in zip(rng.integers(0, 55, 40), rng.integers(0, 75, 40)))
    locs = [loc for loc in locs if loc[0] < 20 or loc[0] > 40]  # a gap of untouched rows
    for r, c in locs:
        v = torch.rand(1, 1, 15, 15)
        ref.aggregate(v, (r, c))
        band.aggregate(v, (r, c))
    counts = ref.get_counts()[0, 0].numpy()
    expected = np.nan_to_num(ref.finalize()[0, 0].numpy())
    np.testing.assert_allclose(band.finalize()[:], expected, atol=1e-6)
    np.testing.assert_array_equal(band.coverage[:], counts > 0)
    with pytest.raises(ValueError, match="finalized"):
        band.aggregate(torch.rand(1, 1, 2, 2), (60, 0))
    late = BandedZarrMerger((1, 1, 40, 40), store=tmp_path / "late.zarr", chunks=8)
    late.aggregate(torch.rand(1, 1, 4, 4), (30, 0))
    with pytest.raises(ValueError, match="non-decreasing row order"):
        late.aggregate(torch.rand(1, 1, 4, 4), (2, 0))


# ------------------------------------------------------------------------------- outputs, slides


def test_outputs_contract_and_worker_loader(tmp_path):
    slide = write_slide(tmp_path / "isl.tif", islands(1000, 1400, [(400, 400, 250), (1050, 600, 260)]))
    row = infer_slide(serve(ConstModel(0.3), tau=0.4), slide, cfg(num_workers=1, batch_size=5), tmp_path / "out", "cpu",
                      progress=True)
    out = tmp_path / "out" / "isl"
    assert row["status"] == "ok" and row["outputs"] == str(out) and row["tiles_per_s"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["coverage.npy", "heatmap.npy", "meta.json", "tiles.csv"]
    meta = json.loads((out / "meta.json").read_text())
    for key in ("slide", "width", "height", "slide_mpp", "mpp_source", "heatmap_mpp", "level0_per_heatmap_px",
                "tile_size", "target_mpp", "threshold", "classes", "heatmap", "coverage", "heatmap_format"):
        assert key in meta
    assert (meta["width"], meta["height"], meta["slide_mpp"], meta["mpp_source"]) == (1400, 1000, 0.5, "openslide.mpp-x")
    assert meta["threshold"] == 0.4 and meta["classes"] == CLASSES and meta["status"] == "ok"
    tiles = pd.read_csv(out / "tiles.csv")
    assert list(tiles.columns) == ["x", "y", "w", "h", "tissue", "mean_weight", "prob_benign", "prob_malignant", "pred"]
    assert len(tiles) == row["tiles"] and (tiles.tissue >= 0.1).all() and (tiles.w == 128).all()
    np.testing.assert_allclose(tiles.prob_benign + tiles.prob_malignant, 1.0, atol=1e-6)
    assert (tiles.pred == "malignant").all()
    heat, cov = np.load(out / "heatmap.npy"), np.load(out / "coverage.npy")
    assert np.allclose(heat[cov], 0.3) and (heat[~cov] == 0).all()
    assert 0.2 < cov.mean() < 0.8  # tiles only over the two islands
    assert not cov[-5:, :5].any()  # glass in a corner: not inferred


def test_tile_loader_thread_reads_what_the_loop_reads_and_raises_its_errors(tmp_path):
    import threading

    from medwsol.data.slides import open_slide, slide_mpp, tile_grid
    from medwsol.engine.infer import SlideTileDataset, TileLoader
    from medwsol.errors import SlideError

    slide = write_slide(tmp_path / "g.tif", gradient(700, 900))
    base, _ = slide_mpp(open_slide(slide))
    xy = tile_grid((900, 700), base, 0.5, 128, 0, np.ones((7, 9), bool), 100 * base, 0.0)
    ds = SlideTileDataset(slide, xy, 128, 0.5, base)
    cpu = torch.device("cpu")

    def batches(loader):
        torch.manual_seed(0)
        out = [(imgs.clone(), idx.clone()) for imgs, idx in loader]
        drawn = torch.rand(1)  # the loader must not draw from the global RNG
        loader.stop()
        return out, drawn

    before = set(threading.enumerate())
    inline, drawn0 = batches(TileLoader(ds, 5, 0, cpu))
    threaded_loader = TileLoader(ds, 5, 2, cpu)
    assert threaded_loader.threaded and not TileLoader(ds, 5, 0, cpu).threaded
    threaded, drawn1 = batches(threaded_loader)
    assert len(inline) == len(threaded) == -(-len(xy) // 5) and drawn0 == drawn1
    for (a, i), (b, j) in zip(inline, threaded):
        assert torch.equal(i, j) and torch.equal(a, b)
    assert not set(threading.enumerate()) - before  # stop() joined the reader thread (no thread of ours is left)

    class Bad(SlideTileDataset):
        def __getitem__(self, i):
            if i == 7:
                raise SlideError(f"{self.path}: cannot decode the tile 7")
            return super().__getitem__(i)

    loader = TileLoader(Bad(slide, xy, 128, 0.5, base), 5, 1, cpu)
    seen = []
    with pytest.raises(SlideError, match="cannot decode the tile 7"):
        for _, idx in loader:
            seen.extend(idx.tolist())
    loader.stop()
    assert seen == list(range(5))  # the batches before the bad one arrived, none after it
    assert not set(threading.enumerate()) - before


def test_slide_smaller_than_one_tile(tmp_path):
    img = np.zeros((80, 100, 3), np.uint8)
    img[:] = (205, 110, 170)
    slide = write_slide(tmp_path / "tiny.tif", img, levels=1, tile=16)
    row = infer_slide(serve(ChannelModel(0)), slide, cfg(tile_size=128, target_mpp=0.5, output_mpp=2.0), tmp_path / "o",
                      "cpu", progress=False)
    assert row["status"] == "ok" and row["tiles"] == 1
    heat, cov, meta = load_heatmap(tmp_path / "o" / "tiny")
    assert heat.shape == (20, 25) and cov.all()
    np.testing.assert_allclose(heat, (205 - 55) / 200, atol=0.01)


def test_no_mpp_slide_uses_fallback_with_warning(tmp_path):
    slide = write_slide(tmp_path / "nompp.tif", gradient(600, 800), mpp=None, levels=1)
    with pytest.warns(UserWarning, match="fallback_mpp"):
        row = infer_slide(serve(ConstModel()), slide, cfg(fallback_mpp=0.5), tmp_path / "o", "cpu", progress=False)
    assert row["status"] == "ok"
    meta = json.loads((tmp_path / "o" / "nompp" / "meta.json").read_text())
    assert meta["mpp_source"] == "fallback" and meta["slide_mpp"] == 0.5 and meta["threshold"] == 0.5


def _corrupt_one_level0_tile(path):
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[len(page.dataoffsets) // 2], page.databytecounts[len(page.dataoffsets) // 2]
    data = bytearray(path.read_bytes())
    data[off : off + n] = b"\xff" * n
    path.write_bytes(bytes(data))


def test_cohort_records_failures_skips_on_rerun(tmp_path):
    good = [write_slide(tmp_path / f"good{i}.tif", islands(900, 1200, [(350 + 300 * i, 450, 260)])) for i in range(2)]
    blank = write_slide(tmp_path / "blank.tif", np.full((700, 900, 3), 238, np.uint8))
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide" * 100)
    nompp = write_slide(tmp_path / "nompp.tif", gradient(500, 600), mpp=None, levels=1)
    badtile = write_slide(tmp_path / "badtile.tif", gradient(1024, 1024))
    _corrupt_one_level0_tile(badtile)
    slides = [good[0], junk, blank, nompp, badtile, good[1]]
    c = cfg(target_mpp=0.5, num_workers=1)
    with pytest.warns(UserWarning):
        df = infer_cohort(serve(ConstModel()), slides, c, tmp_path / "out", "cpu", progress=False)
    assert list(df.columns) == ["slide", "name", "status", "error", "tiles", "seconds", "tiles_per_s", "max_score",
                                "mean_score", "outputs"]
    assert df.status.tolist() == ["ok", "failed", "empty", "failed", "failed", "ok"]
    err = dict(zip(df.slide, df.error.fillna("")))
    assert err[str(junk)].startswith(str(junk)) and "not a whole-slide image" in err[str(junk)]
    assert err[str(nompp)].startswith(str(nompp)) and "fix: set slides.fallback_mpp" in err[str(nompp)]
    assert err[str(badtile)].startswith(str(badtile)) and "cannot decode the tile" in err[str(badtile)]
    assert all("\n" not in e for e in err.values())
    assert not (tmp_path / "out" / "junk").exists() and not (tmp_path / "out" / "badtile").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp folders left
    csv = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert csv.status.tolist() == df.status.tolist()
    empty_meta = json.loads((tmp_path / "out" / "blank" / "meta.json").read_text())
    assert empty_meta["status"] == "empty"
    assert not np.load(tmp_path / "out" / "blank" / "coverage.npy").any()
    assert len(pd.read_csv(tmp_path / "out" / "blank" / "tiles.csv")) == 0

    class Tracker:
        def __init__(self):
            self.metrics, self.artifacts = {}, []

        def log_metrics(self, m, step=None):
            self.metrics.update(m)

        def log_artifact(self, path, artifact_path=None):
            self.artifacts.append(path)

    tr = Tracker()
    with pytest.warns(UserWarning):
        again = infer_cohort(serve(ConstModel()), slides, c.model_copy(update={"num_workers": 0}), tmp_path / "out",
                             "cpu", tracker=tr, progress=False)
    assert again.status.tolist() == ["skipped", "failed", "skipped", "failed", "failed", "skipped"]
    assert again.tiles[0] == df.tiles[0] and again.max_score[0] == pytest.approx(df.max_score[0])
    assert tr.metrics["slides_skipped"] == 3 and tr.metrics["slides_failed"] == 3 and tr.artifacts
    fixed = c.model_copy(update={"overwrite": True, "fallback_mpp": 0.5, "num_workers": 0})
    with pytest.warns(UserWarning):
        third = infer_cohort(serve(ConstModel()), [good[0], nompp], fixed, tmp_path / "out", "cpu", progress=False)
    assert third.status.tolist() == ["ok", "ok"]


def test_resume_is_keyed_on_package_slide_and_settings(tmp_path):
    """A finished slide is skipped only when the model, the slide file and the output settings are unchanged;
    two slides with the same stem in different folders get distinct outputs; slides.csv can be rebuilt."""
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_slide(tmp_path / "a" / "s.tif", islands(700, 900, [(350, 350, 220)]))
    b = write_slide(tmp_path / "b" / "s.tif", islands(700, 900, [(500, 350, 220)]))
    out = tmp_path / "out"
    c = cfg(target_mpp=0.5)
    first = infer_cohort(serve(ConstModel(0.3), digest="sha256:one"), [a, b], c, out, "cpu", progress=False)
    assert first.status.tolist() == ["ok", "ok"]
    names = first.name.tolist()
    assert len(set(names)) == 2 and all(n.startswith("s-") for n in names)  # same stem: distinct folders
    assert json.loads((out / names[0] / "meta.json").read_text())["slide"] == str(a.resolve())
    assert json.loads((out / names[1] / "meta.json").read_text())["slide"] == str(b.resolve())

    same = infer_cohort(serve(ConstModel(0.3), digest="sha256:one"), [a, b], c, out, "cpu", progress=False)
    assert same.status.tolist() == ["skipped", "skipped"]
    # another model package: recomputed, and the heatmap is the new model's
    new = infer_cohort(serve(ConstModel(0.6), digest="sha256:two"), [a, b], c, out, "cpu", progress=False)
    assert new.status.tolist() == ["ok", "ok"]
    heat, cov, _ = load_heatmap(out / names[0])
    np.testing.assert_allclose(np.asarray(heat)[np.asarray(cov)], 0.6, atol=1e-6)
    # the same package with another threshold, another output resolution, or a changed slide file: recomputed
    assert infer_cohort(serve(ConstModel(0.6), tau=0.7, digest="sha256:two"), [a], c, out, "cpu",
                        progress=False).status.tolist() == ["ok"]
    assert infer_cohort(serve(ConstModel(0.6), tau=0.7, digest="sha256:two"), [a], c.model_copy(update={"output_mpp": 8.0}),
                        out, "cpu", progress=False).status.tolist() == ["ok"]
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert infer_cohort(serve(ConstModel(0.6), tau=0.7, digest="sha256:two"), [a], c.model_copy(update={"output_mpp": 8.0}),
                        out, "cpu", progress=False).status.tolist() == ["ok"]

    # a crash after the records were written: slides.csv comes back from them
    (out / "slides.csv").unlink()
    rebuilt = rebuild_summary(out)
    assert sorted(rebuilt.name) == sorted(names) and set(rebuilt.status) == {"ok"}
    assert pd.read_csv(out / "slides.csv").shape[0] == 2
