"""CAMELYON16-style training tiles from whole slides with QuPath polygon annotations.

Protocol (the survey of Rony et al., MELBA 2023): split **by slide** first; tiles of
``tile_size`` px at ``mpp`` µm/px, no overlap; keep a tile whose tissue fraction (Otsu on saturation
at low resolution, :func:`medwsol.data.slides.tissue_mask`) is at least ``min_tissue``; a tumour tile
needs a tumour fraction of at least ``min_tumour`` and comes from a tumour slide (tiles of tumour
slides below it are dropped); normal tiles come only from normal slides; the majority class is
subsampled (seeded) so that each split is class-balanced; every tile gets a pixel mask rasterised
from the slide's polygons (all zero for normal tiles).

Inputs:

* ``slides.csv``: ``slide`` (path, relative to the CSV), ``label`` (a class of ``data.classes``, or
  ``tumour``/``tumor``/``normal``, mapped to ``tiles.tumour_class``/``tiles.normal_class``), optional
  ``group`` (patient; default the slide stem), ``split`` (train/valid/test on every row, else chosen
  with StratifiedGroupKFold on slides) and ``annotations`` (a GeoJSON path overriding the folder).
* annotations: ``<annotations_dir>/<slide stem>.geojson`` (or ``.geojson.gz``) as QuPath exports
  them: Features with Polygon/MultiPolygon geometry in level-0 pixels; features classified as the
  tumour class (``Tumor``, ``Tumour``, ``tiles.tumour_class``; case-insensitive) or unclassified
  count as tumour; other classes (e.g. ``Exclusion``) are ignored.

Outputs (``out_dir``): ``tiles/<stem>_x<X>_y<Y>.png`` (RGB), ``masks/<stem>_x<X>_y<Y>.png`` (0/255), each
folder replaced atomically, and the manifest (``manifest.csv``) with columns ``image, mask, label,
split, group, valpx, slide, x, y`` (level-0 top-left) plus ``tissue``, ``tumour`` (fractions),
``mpp`` and ``size``.

Example:
    >>> from medwsol.config import SlideTilesConfig, SyntheticSlidesConfig
    >>> from medwsol.data.slide_tiles import make_synthetic_slide_cohort, prepare_slide_tiles
    >>> syn = SyntheticSlidesConfig(n_train=4, width=2048, height=2048, mpp=1.0)
    >>> csv = make_synthetic_slide_cohort("/tmp/medwsol_doc/cohort", syn)  # doctest: +SKIP
    >>> cfg = SlideTilesConfig(tile_size=128, mpp=2.0)
    >>> prepare_slide_tiles(csv, "/tmp/medwsol_doc/cohort/annotations", "/tmp/medwsol_doc/tiles", cfg,
    ...                     ["benign", "malignant"], seed=0)  # doctest: +SKIP
    PosixPath('/tmp/medwsol_doc/tiles/manifest.csv')
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medwsol.errors import DataError
from medwsol.io import atomic_dir, atomic_path, write_json

__all__ = [
    "TUMOUR_ALIASES",
    "NORMAL_ALIASES",
    "qupath_geometry",
    "read_annotations",
    "read_slides_csv",
    "prepare_slide_tiles",
    "make_synthetic_slide_cohort",
]

TUMOUR_ALIASES = ("tumour", "tumor")
NORMAL_ALIASES = ("normal",)
_MAX_LISTED = 10


# ------------------------------------------------------------------------------------ annotations


def qupath_geometry(
    obj: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    object_types: Sequence[str] | None = ("annotation",),
    include_unclassified: bool = True,
):
    """Union of a QuPath GeoJSON's (Multi)Polygon features as one shapely geometry (level-0 px).

    Args:
        obj: parsed GeoJSON (FeatureCollection, a Feature list, or one Feature).
        class_names: keep features whose ``classification.name`` is one of these (case-insensitive);
            None keeps every class.
        object_types: keep these ``properties.objectType`` (missing counts as ``annotation``); None: all.
        include_unclassified: with ``class_names``, also keep features without a classification.

    Returns:
        a valid shapely geometry (empty when nothing matches).

    Example:
        >>> gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        ...     "classification": {"name": "Tumor", "color": [200, 0, 0]}}, "geometry": {"type": "Polygon",
        ...     "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}}]}
        >>> qupath_geometry(gj, ["tumor"]).area
        100.0
    """
    import shapely
    from shapely.geometry import Polygon, shape

    if isinstance(obj, Mapping) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features") or []
    elif isinstance(obj, Mapping) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, list):
        feats = obj
    else:
        raise DataError("GeoJSON: expected a FeatureCollection or Features; fix: export the annotations from QuPath "
                        "(File > Export objects as GeoJSON)")
    if not isinstance(feats, list):
        raise DataError(f"GeoJSON: 'features' is a {type(feats).__name__}, not a list; fix: export the annotations "
                        "from QuPath (File > Export objects as GeoJSON)")
    wanted = None if class_names is None else {c.lower() for c in class_names}
    geoms = []
    for i, f in enumerate(feats):
        if not isinstance(f, Mapping) or f.get("type") != "Feature":
            raise DataError(f"GeoJSON: item {i} of the features is not a Feature (got {str(f)[:40]!r}); fix: export "
                            "the annotations from QuPath (File > Export objects as GeoJSON)")
        g = f.get("geometry")
        if not isinstance(g, Mapping) or g.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        props = f.get("properties") or {}
        ot = props.get("objectType", "annotation")
        if object_types is not None and ot not in object_types:
            continue
        cls = props.get("classification")
        cname = cls.get("name") if isinstance(cls, Mapping) else cls if isinstance(cls, str) else None
        if wanted is not None:
            if cname is None:
                if not include_unclassified:
                    continue
            elif str(cname).lower() not in wanted:
                continue
        try:
            geoms.append(shapely.make_valid(shape(g)))
        except Exception as err:  # noqa: BLE001 - shapely raises many types on malformed coordinates
            reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise DataError(f"feature {i}: {g.get('type')} geometry cannot be built ({reason}); fix: re-export the "
                            "annotations from QuPath") from None
    if not geoms:
        return Polygon()
    try:
        u = shapely.unary_union(geoms)
        polys = [p for p in getattr(u, "geoms", [u]) if p.geom_type in ("Polygon", "MultiPolygon")]
        return shapely.unary_union(polys) if polys else Polygon()
    except Exception as err:  # noqa: BLE001 - GEOS errors on degenerate input
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise DataError(f"the polygons cannot be merged ({reason}); fix: re-export the annotations from QuPath") from None


def read_annotations(path: str | os.PathLike[str], class_names: Sequence[str] | None = None):
    """Tumour geometry of one slide from a ``.geojson`` / ``.geojson.gz`` file (see :func:`qupath_geometry`).

    Raises:
        DataError: one line naming the file: missing, not UTF-8, not JSON, not GeoJSON, or a geometry
            shapely cannot build.
    """
    from medwsol.io import read_json_file

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: annotation file not found; fix: export it from QuPath as <slide stem>.geojson")
    obj = read_json_file(p, "GeoJSON")
    try:
        return qupath_geometry(obj, class_names)
    except DataError as err:
        raise DataError(f"{p}: {err}") from None


# -------------------------------------------------------------------------------------- slides.csv


def read_slides_csv(
    slides_csv: str | os.PathLike[str],
    annotations_dir: str | os.PathLike[str] | None,
    classes: Sequence[str],
    tumour_class: str,
    normal_class: str,
) -> pd.DataFrame:
    """Validate ``slides.csv``.

    Problems of the table itself (columns, labels, splits, empty paths, repeated slide names) fail
    at once, listed together. Problems of one slide's files (the slide or the annotation file of a
    tumour slide is missing) are returned in its ``problem`` column, so that :func:`prepare_slide_tiles`
    records that slide as failed while the others go on; when the table also has problems of its
    own they are listed with them.

    Returns:
        DataFrame with ``slide`` (absolute Path), ``stem``, ``label`` (a class name), ``is_tumour``,
        ``group``, ``split`` ("" when not given), ``annotations`` (Path or None) and ``problem``
        ("" when the slide's files are there).
    """
    from medwsol.io import read_csv_table

    path = Path(slides_csv)
    if not path.is_file():
        raise DataError(f"{path}: slides.csv not found; fix: check data.tiles.slides")
    for c in (tumour_class, normal_class):
        if c not in classes:
            raise DataError(f"{path}: tiles class {c!r} is not in data.classes {list(classes)}; "
                            "fix: set data.tiles.tumour_class/normal_class to classes listed there")
    df = read_csv_table(path, "slides.csv", DataError, empty_fix="add a header line slide,label[,group,split] and "
                        "one row per slide")
    missing = [c for c in ("slide", "label") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: columns {missing} missing; fix: give at least slide,label (group, split optional)")
    if not len(df):
        raise DataError(f"{path}: no slides listed; fix: add one row per slide")
    ann_dir = Path(annotations_dir) if annotations_dir is not None else None
    alias = {**{a: tumour_class for a in TUMOUR_ALIASES}, **{a: normal_class for a in NORMAL_ALIASES}}
    rows, problems, per_slide = [], [], []
    for i, r in df.iterrows():
        line = f"line {i + 2}"
        rel = str(r["slide"]).strip()
        if not rel or "\x00" in rel:
            problems.append(f"{line}: {'empty' if not rel else 'unusable'} slide path")
            continue
        slide = Path(rel) if Path(rel).is_absolute() else (path.parent / rel)
        slide = Path(os.path.normpath(slide))
        problem = ""
        if not _exists(slide):
            problem = f"{slide}: slide file not found; fix: correct its path in {path.name} (relative to it)"
        raw = str(r["label"]).strip()
        label = raw if raw in classes else alias.get(raw.lower())
        if label not in (tumour_class, normal_class):
            problems.append(f"{line}: label {raw[:40]!r} is neither {tumour_class!r} nor {normal_class!r} "
                            "(or tumour/normal)")
            continue
        stem = slide.stem
        group = str(r.get("group", "") or "").strip() or stem
        split = str(r.get("split", "") or "").strip().lower()
        if split not in ("", "train", "valid", "test"):
            problems.append(f"{line}: split {split[:20]!r} is not train, valid or test")
        ann = None
        given = str(r.get("annotations", "") or "").strip()
        if given:
            ann = Path(given) if Path(given).is_absolute() else path.parent / given
        elif ann_dir is not None:
            cands = [ann_dir / f"{stem}.geojson", ann_dir / f"{stem}.geojson.gz", ann_dir / f"{stem}.json"]
            ann = next((c for c in cands if _exists(c)), None)
        if not problem and label == tumour_class and (ann is None or not _exists(ann)):
            where = str(ann) if ann is not None else f"{ann_dir}/{stem}.geojson" if ann_dir else "(no annotations folder)"
            problem = (f"{slide}: tumour slide has no annotation file {where}; fix: export its tumour polygons from "
                       "QuPath as <slide stem>.geojson")
        if problem:
            per_slide.append(f"{line}: {problem.split('; fix:')[0]}")
        rows.append({"slide": slide, "stem": stem, "label": label, "is_tumour": label == tumour_class,
                     "group": group, "split": split, "annotations": ann, "problem": problem})
    out = pd.DataFrame(rows)
    if len(out) and out["stem"].duplicated().any():
        dup = sorted(set(out.loc[out["stem"].duplicated(), "stem"]))
        problems.append(f"slide names repeat: {dup[:_MAX_LISTED]} (tile files are named by slide stem)")
    if problems:
        problems += per_slide
        more = f" (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{path}: " + "; ".join(problems[:_MAX_LISTED]) + more
                        + "; fix: correct slides.csv (paths are relative to it) or add the missing files")
    splits = set(out["split"])
    if "" in splits and len(splits) > 1:
        raise DataError(f"{path}: split is given on some rows only; fix: fill it on every row or on none")
    return out


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ tiles


def _slide_splits(slides: pd.DataFrame, seed: int, n_folds: int, path: Path) -> np.ndarray:
    """The slides.csv splits, else a seeded stratified group split of the slides.

    Groups (patients) are stratified by whether they hold a tumour slide. Each class first gives one
    group to ``train``; the other groups are ordered by ``(rank + u) / n_class`` (u uniform, seeded),
    which interleaves the classes in proportion, and the first ``max(1, round(N / n_folds))`` go to
    ``test``, the next ``max(1, round((N - n_test) / n_folds))`` to ``valid`` and the rest to ``train``
    (N = number of groups). Unlike scikit-learn's StratifiedGroupKFold this also works for tiny
    cohorts (e.g. 2 tumour + 2 normal slides: train 1 + 1, valid 1, test 1).
    """
    if (slides["split"] != "").all():
        return slides["split"].to_numpy()
    groups = slides.groupby("group", sort=True)["is_tumour"].any()
    n = len(groups)
    if n < 3:
        raise DataError(f"{path}: {n} patient group(s) cannot be split by slide into train/valid/test; "
                        "fix: add a split column to slides.csv or list at least 3 groups")
    rng = np.random.default_rng([seed, 3])
    train, rest = [], []
    for cls in (True, False):
        g = list(groups.index[groups.to_numpy() == cls])
        g = [g[i] for i in rng.permutation(len(g))]
        if g:
            train.append(g[0])
            rest += [((i + rng.random()) / len(g), name) for i, name in enumerate(g[1:])]
    rest = [name for _, name in sorted(rest)]
    n_test = max(1, round(n / n_folds))
    n_valid = max(1, round((n - n_test) / n_folds))
    split = {g: "train" for g in train}
    for i, g in enumerate(rest):
        split[g] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return slides["group"].map(split).to_numpy()


def _candidates(row, tiles_cfg, slide, base_mpp: float, tumour, max_read_mpx: float | None = None) -> pd.DataFrame:
    """Tissue-filtered grid of one slide with tissue and tumour fractions (no pixels read yet)."""
    from shapely.geometry import box

    from medwsol.data.geometry import rasterize_geometry
    from medwsol.data.slides import tile_grid, tissue_mask

    ts, mpp = int(tiles_cfg.tile_size), float(tiles_cfg.mpp)
    scale = mpp / base_mpp  # level-0 px per tile px
    tissue_mpp = max(min(16.0, ts * mpp / 8.0), base_mpp)
    kw = {} if max_read_mpx is None else {"max_read_mpx": max_read_mpx}
    mask, mask_mpp = tissue_mask(slide, mpp=tissue_mpp, base_mpp=base_mpp, **kw)
    xy, frac = tile_grid(slide.dimensions, base_mpp, mpp, ts, 0, mask, mask_mpp, tiles_cfg.min_tissue,
                         return_fraction=True)
    tum = np.zeros(len(xy), np.float32)
    if tumour is not None and not tumour.is_empty and len(xy):
        import shapely

        shapely.prepare(tumour)
        side = ts * scale
        for i, (x, y) in enumerate(xy):
            b = box(x, y, x + side, y + side)
            if shapely.intersects(tumour, b):
                tum[i] = 1.0 if shapely.contains(tumour, b) else rasterize_geometry(tumour, x, y, ts, ts, scale).mean()
    return pd.DataFrame({"x": xy[:, 0].astype(np.int64), "y": xy[:, 1].astype(np.int64),
                         "tissue": np.round(frac.astype(np.float64), 4), "tumour": tum.astype(np.float64)})


def prepare_slide_tiles(
    slides_csv: str | os.PathLike[str],
    annotations_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    tiles_cfg: Any,
    classes: Sequence[str],
    seed: int = 0,
    manifest_name: str = "manifest.csv",
    n_valpx: int = 6,
    n_folds: int = 5,
    progress: bool = False,
) -> Path:
    """Extract CAMELYON16-style tiles and pixel masks from annotated slides; write a manifest.

    Args:
        slides_csv: CSV with ``slide, label[, group, split, annotations]`` (see the module docstring).
        annotations_dir: folder of ``<slide stem>.geojson`` (QuPath export), or None when the CSV names them.
        out_dir: where ``tiles/``, ``masks/`` and the manifest go (``tiles/`` and ``masks/`` are replaced).
        tiles_cfg: a ``SlideTilesConfig`` (``tile_size``, ``mpp``, ``min_tissue``, ``min_tumour``,
            ``tumour_class``, ``normal_class``, ``max_tiles_per_slide``).
        classes: ``data.classes``; the manifest labels are the tumour/normal class names.
        seed: seeds the slide split, per-slide caps, class balancing and the valpx choice.
        manifest_name: file name of the manifest inside ``out_dir``.
        n_valpx: pixel-labelled validation tiles to flag (half per class, from the valid split).
        n_folds: folds of the StratifiedGroupKFold slide split (when slides.csv gives none).
        progress: show a progress bar over slides.

    Returns:
        The manifest path.

    Raises:
        DataError: a bad slides.csv or annotation, no tile of some class, a normal slide with tumour polygons.
        SlideError: a slide that cannot be read (no mpp, corrupt).
    """
    from PIL import Image

    from medwsol.data.geometry import rasterize_geometry
    from medwsol.data.manifest import write_manifest
    from medwsol.data.slides import open_slide, read_region_at_mpp, slide_mpp

    slides_csv, out_dir = Path(slides_csv), Path(out_dir)
    t = tiles_cfg
    _check_replaceable(out_dir, manifest_name)
    slides = read_slides_csv(slides_csv, annotations_dir, classes, t.tumour_class, t.normal_class)
    slides["split"] = _slide_splits(slides, seed, n_folds, slides_csv)
    tumour_names = sorted({*TUMOUR_ALIASES, t.tumour_class.lower()})
    failures: dict[Any, str] = {si: s["problem"] for si, s in slides.iterrows() if s["problem"]}
    limit = getattr(t, "max_tissue_read_mpx", None)

    bar = _progress(progress, len(slides), "tiles")
    cands, geoms, mpps = [], {}, {}
    for si, s in slides.iterrows():
        if si in failures:
            continue
        try:
            geom = read_annotations(s["annotations"], tumour_names) if s["annotations"] is not None else None
            if not s["is_tumour"] and geom is not None and not geom.is_empty:
                raise DataError(f"{s['annotations']}: normal slide {s['slide'].name} has tumour polygons; fix: label "
                                f"the slide {t.tumour_class!r} or remove its tumour annotations")
            if s["is_tumour"] and (geom is None or geom.is_empty):
                raise DataError(f"{s['annotations']}: tumour slide {s['slide'].name} has no tumour polygon (classified "
                                f"{', '.join(tumour_names)}, or unclassified); fix: export its tumour annotations, or "
                                f"set data.tiles.tumour_class to the class used in QuPath")
            slide = open_slide(s["slide"])
            try:
                base, _ = slide_mpp(slide)
                c = _candidates(s, t, slide, base, geom if s["is_tumour"] else None, limit)
            finally:
                slide.close()
        except Exception as err:  # noqa: BLE001 - one slide never stops the cohort
            failures[si] = _slide_failure(s["slide"], err)
            continue
        finally:
            if bar:
                bar.advance(bar.task_ids[0])
        if s["is_tumour"]:
            c = c[c["tumour"] >= t.min_tumour]
        rng = np.random.default_rng([seed, si])
        if t.max_tiles_per_slide is not None and len(c) > t.max_tiles_per_slide:
            c = c.iloc[np.sort(rng.choice(len(c), t.max_tiles_per_slide, replace=False))]
        c = c.assign(si=si, label=s["label"], split=s["split"], group=s["group"])
        cands.append(c)
        geoms[si], mpps[si] = geom, base
    if bar:
        bar.stop()
    tiles = pd.concat(cands, ignore_index=True) if cands else pd.DataFrame()
    missing_class = [cls for cls in (t.tumour_class, t.normal_class)
                     if not len(tiles) or not (tiles["label"] == cls).any()]
    if missing_class:
        if failures:
            _write_slide_status(out_dir, manifest_name, slides, failures, None)
            _raise_failures(slides_csv, out_dir, manifest_name, slides, failures, wrote=False)
        cls = missing_class[0]
        raise DataError(f"{slides_csv}: no {cls!r} tile passed the filters (min_tissue {t.min_tissue}, "
                        f"min_tumour {t.min_tumour}); fix: add {cls} slides or lower the thresholds")
    tiles = _balance(tiles, seed)
    tiles["valpx"] = _choose_valpx(tiles, n_valpx, seed)

    ts, mpp = int(t.tile_size), float(t.mpp)
    rows = []
    with atomic_dir(out_dir / "tiles") as tdir, atomic_dir(out_dir / "masks") as mdir:
        for si, group in tiles.groupby("si", sort=True):
            s = slides.loc[si]
            slide_rows, written = [], []
            try:
                slide = open_slide(s["slide"])
                try:
                    for r in group.itertuples():
                        fname = f"{s['stem']}_x{r.x}_y{r.y}.png"
                        rgb = read_region_at_mpp(slide, int(r.x), int(r.y), ts, ts, mpp, mpps[si])
                        mask = (rasterize_geometry(geoms[si], r.x, r.y, ts, ts, mpp / mpps[si]) if s["is_tumour"]
                                else np.zeros((ts, ts), bool))
                        written += [tdir / fname, mdir / fname]
                        Image.fromarray(rgb).save(tdir / fname, format="PNG", compress_level=1)
                        Image.fromarray(mask.astype(np.uint8) * 255).save(mdir / fname, format="PNG")
                        slide_rows.append({
                            "image": str((out_dir / "tiles" / fname).resolve()),
                            "mask": str((out_dir / "masks" / fname).resolve()),
                            "label": r.label, "split": r.split, "group": r.group, "valpx": int(r.valpx),
                            "slide": str(s["slide"]), "x": int(r.x), "y": int(r.y), "tissue": float(r.tissue),
                            "tumour": round(float(mask.mean()), 4) if s["is_tumour"] else 0.0, "mpp": mpp, "size": ts,
                        })
                finally:
                    slide.close()
            except Exception as err:  # noqa: BLE001 - a slide that fails while its tiles are read is dropped
                for f in written:
                    f.unlink(missing_ok=True)
                failures[si] = _slide_failure(s["slide"], err)
                continue
            rows += slide_rows
    manifest = pd.DataFrame(rows)
    path = write_manifest(manifest, out_dir / manifest_name)
    counts = manifest.groupby(["split", "label"]).size().to_dict() if len(manifest) else {}
    write_json(out_dir / (Path(manifest_name).stem + "_summary.json"), {
        "slides_csv": str(slides_csv), "tiles": len(manifest), "counts": {f"{a}/{b}": int(n) for (a, b), n in counts.items()},
        "slides": {str(s["slide"]): s["split"] for _, s in slides.iterrows()}, "tile_size": ts, "mpp": mpp,
        "min_tissue": t.min_tissue, "min_tumour": t.min_tumour, "seed": seed,
        "failed": {str(slides.loc[si, "slide"]): msg for si, msg in failures.items()},
    })
    _write_slide_status(out_dir, manifest_name, slides, failures, manifest)
    if failures:
        _raise_failures(slides_csv, out_dir, manifest_name, slides, failures, wrote=True)
    return path


def _check_replaceable(out_dir: Path, manifest_name: str) -> None:
    """``tiles/``, ``masks/`` and the manifest are replaced: only in a folder this function wrote before."""
    if not out_dir.is_dir():
        return
    ours = (out_dir / (Path(manifest_name).stem + "_summary.json")).is_file()
    clash = [n for n in ("tiles", "masks", manifest_name) if (out_dir / n).exists()]
    if clash and not ours:
        raise DataError(f"{out_dir}: holds {', '.join(clash)} that prepare slides did not write (no "
                        f"{Path(manifest_name).stem}_summary.json), and it would replace them; fix: choose an empty "
                        "or new output folder")


def _slide_failure(slide: Path, err: BaseException) -> str:
    """One line for a slide that failed: the error, prefixed with the slide when it does not name it."""
    from medwsol.errors import MedwsolError, one_line

    msg = one_line(err, 400)
    if not isinstance(err, MedwsolError):
        msg = f"{type(err).__name__}: {msg}"
    return msg if str(slide) in msg or slide.name in msg else f"{slide}: {msg}"


def _status_path(out_dir: Path, manifest_name: str) -> Path:
    return out_dir / (Path(manifest_name).stem + "_slides.csv")


def _write_slide_status(out_dir: Path, manifest_name: str, slides: pd.DataFrame, failures: dict,
                        manifest: pd.DataFrame | None) -> None:
    """``<manifest stem>_slides.csv``: slide, split, status (ok/failed), tiles, error: one row per slide."""
    per = manifest["slide"].value_counts().to_dict() if manifest is not None and len(manifest) else {}
    table = pd.DataFrame([{
        "slide": str(s["slide"]), "split": s["split"], "status": "failed" if si in failures else "ok",
        "tiles": 0 if si in failures else int(per.get(str(s["slide"]), 0)), "error": failures.get(si, ""),
    } for si, s in slides.iterrows()], columns=["slide", "split", "status", "tiles", "error"])
    with atomic_path(_status_path(out_dir, manifest_name)) as tmp:
        table.to_csv(tmp, index=False)


def _raise_failures(slides_csv: Path, out_dir: Path, manifest_name: str, slides: pd.DataFrame, failures: dict,
                    wrote: bool) -> None:
    from medwsol.errors import SlideError

    first = next(iter(failures.values()))
    n, total = len(failures), len(slides)
    done = f"the other slides' tiles are in {out_dir / manifest_name}" if wrote else "no manifest written"
    what, _, fix = first.partition("; fix: ")
    first = f"{what} ({fix})" if fix else what
    raise SlideError(f"{slides_csv}: {n} of {total} slide(s) failed ({done}); first: {first}; see "
                     f"{_status_path(out_dir, manifest_name)} for each; fix: correct or remove those slides and re-run")


def _balance(tiles: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Subsample the majority class within each split (seeded); a one-class split is kept whole (warned)."""
    keep = []
    for split, g in tiles.groupby("split", sort=True):
        by = dict(tuple(g.groupby("label")))
        if len(by) < 2:
            warnings.warn(f"split {split!r} holds tiles of one class only ({next(iter(by))}); not balanced "
                          "(split by slide with few slides)", stacklevel=3)
            keep.append(g)
            continue
        n = min(len(v) for v in by.values())
        rng = np.random.default_rng([seed, len(split), sum(map(ord, split))])
        for label in sorted(by):
            v = by[label]
            keep.append(v.iloc[np.sort(rng.choice(len(v), n, replace=False))] if len(v) > n else v)
    return pd.concat(keep).sort_values(["si", "y", "x"]).reset_index(drop=True)


def _choose_valpx(tiles: pd.DataFrame, n_valpx: int, seed: int) -> np.ndarray:
    """``n_valpx`` pixel-labelled validation tiles, spread over classes (as manifest.assign_splits does).

    Tumour tiles that straddle the tumour boundary (tumour fraction < 0.9) are taken first: a tile that is
    all tumour says nothing about where a map should stop, so a threshold chosen on such tiles alone is
    arbitrary (any value between the normal tiles' scores and the tumour tiles' fits them perfectly).
    """
    valpx = np.zeros(len(tiles), np.int64)
    labels = sorted(tiles["label"].unique())
    rng = np.random.default_rng([seed, 7])
    frac = tiles["tumour"].to_numpy() if "tumour" in tiles else np.zeros(len(tiles))
    for j, c in enumerate(labels):
        want = n_valpx // len(labels) + (1 if j < n_valpx % len(labels) else 0)
        cand = np.flatnonzero(((tiles["split"] == "valid") & (tiles["label"] == c)).to_numpy())
        if not want or not len(cand):
            continue
        edge = cand[(frac[cand] > 0) & (frac[cand] < 0.9)]
        rest = np.setdiff1d(cand, edge)
        pick = rng.choice(edge, size=min(want, len(edge)), replace=False) if len(edge) else edge
        if len(pick) < want and len(rest):
            pick = np.concatenate([pick, rng.choice(rest, size=min(want - len(pick), len(rest)), replace=False)])
        valpx[pick.astype(np.int64)] = 1
    return valpx


def _progress(enabled: bool, total: int, what: str):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress()
    bar.add_task(what, total=total)
    bar.start()
    return bar


# --------------------------------------------------------------------------------- synthetic cohort


def make_synthetic_slide_cohort(out_dir: str | os.PathLike[str], synth_cfg: Any, progress: bool = False) -> Path:
    """Synthetic annotated slides in the layout :func:`prepare_slide_tiles` reads.

    ``n_train`` annotated slides (alternating tumour / normal, so half have tumour) listed in
    ``slides.csv`` (with 6 or more, a ``split`` column: the last tumour/normal pair ``test``, the pair
    before it ``valid``, the rest ``train``; with fewer, the seeded group split decides) and ``n_test`` held-out tumour slides in ``test_slides.csv`` (columns ``slide,
    label, group``; labels ``tumour``/``normal``, mapped to the configured classes), under
    ``out_dir/slides/*.tif``, with QuPath GeoJSONs and tumour masks in ``out_dir/annotations/``.
    The folder is built in a temporary sibling and renamed into place; a cohort already built with
    the same settings (``cohort.json``) is reused.

    Args:
        out_dir: the cohort folder (replaced).
        synth_cfg: a ``SyntheticSlidesConfig`` (``n_train``, ``n_test``, ``width``, ``height``, ``mpp``, ``seed``).
        progress: progress bars while writing slides.

    Returns:
        Path of ``slides.csv``.

    Example:
        >>> from medwsol.config import SyntheticSlidesConfig
        >>> from medwsol.data.slide_tiles import make_synthetic_slide_cohort
        >>> make_synthetic_slide_cohort("/tmp/medwsol_doc/c", SyntheticSlidesConfig(n_train=2, width=1024,
        ...                             height=1024, mpp=1.0)).name
        'slides.csv'
    """
    import shutil

    from medwsol.data.synthetic_slide import make_synthetic_slide

    out = Path(out_dir)
    settings = synth_cfg.model_dump() if hasattr(synth_cfg, "model_dump") else dict(synth_cfg)
    marker = out / "cohort.json"
    if marker.is_file():
        from medwsol.errors import MedwsolError
        from medwsol.io import read_json_file

        try:
            same = read_json_file(marker, "cohort stamp") == json.loads(json.dumps(settings, default=str))
        except MedwsolError:
            same = False  # an unreadable stamp: build the cohort again
        if same and all((out / n).is_file() for n in ("slides.csv", "test_slides.csv")):
            return out / "slides.csv"
    specs = [(f"train_{i:03d}", i % 2 == 0, "slides.csv") for i in range(int(settings["n_train"]))]
    specs += [(f"test_{i:03d}", True, "test_slides.csv") for i in range(int(settings["n_test"]))]
    with atomic_dir(out) as tmp:
        (tmp / "slides").mkdir()
        (tmp / "annotations").mkdir()
        tables: dict[str, list[dict[str, str]]] = {"slides.csv": [], "test_slides.csv": []}
        for i, (stem, tumour, table) in enumerate(specs):
            res = make_synthetic_slide(tmp / "slides" / f"{stem}.tif", width=int(settings["width"]),
                                       height=int(settings["height"]), mpp=float(settings["mpp"]),
                                       seed=int(settings["seed"]) * 1000 + i, tumour=tumour, progress=progress)
            for key in ("geojson", "mask_png", "mask_json"):
                shutil.move(str(res[key]), tmp / "annotations" / res[key].name)
            tables[table].append({"slide": f"slides/{stem}.tif", "label": "tumour" if tumour else "normal",
                                  "group": stem})
        for name, rows in tables.items():
            cols = ["slide", "label", "group"]
            if name == "slides.csv" and len(rows) >= 6:
                # explicit slide split: the last tumour/normal pair is test, the one before valid, so both
                # hold both classes (a seeded group split of a handful of slides cannot promise that)
                n_pairs = len(rows) // 2
                for j, row in enumerate(rows):
                    pair = j // 2
                    row["split"] = "test" if pair >= n_pairs - 1 else "valid" if pair == n_pairs - 2 else "train"
                cols.append("split")
            with atomic_path(tmp / name) as p:
                pd.DataFrame(rows, columns=cols).to_csv(p, index=False)
        write_json(tmp / "cohort.json", settings)
    return out / "slides.csv"
