"""QuPath GeoJSON: tile measurements (a heatmap in QuPath) and thresholded region polygons.

QuPath's GeoJSON import rules (from QuPath's own GeoJSON reader), all followed here and checked by
:func:`validate_qupath_geojson`:

* a ``FeatureCollection`` of ``Feature`` s, each with a UUID string ``id``;
* ``properties.objectType`` in ``annotation | detection | tile`` (*inside* ``properties``);
* ``properties.classification = {"name": str, "color": [r, g, b]}`` (no colour: import fails);
* ``properties.measurements`` a dict ``{name: number}`` (finite numbers: JSON has no NaN);
* coordinates in level-0 pixels, origin top-left; polygons valid with closed rings.

:func:`heatmap_geojson` writes one ``tile`` object per inferred tile, carrying ``mean_weight``,
``prob_<class>`` and ``tissue`` measurements (QuPath: *Measure > Show measurement maps* turns them
into a heatmap), plus one ``annotation`` per connected region of ``heatmap >= threshold``:
contours traced with ``skimage.measure.find_contours`` (marching squares at 0.5 through pixel
centres, holes kept), built and repaired with shapely (``make_valid``), simplified, small regions
dropped, scaled from heatmap pixels to level-0 pixels and clipped to the slide.

Example:
    >>> import numpy as np, pandas as pd
    >>> from medwsol.export.qupath import heatmap_geojson, validate_qupath_geojson
    >>> heat = np.zeros((8, 8), np.float32); heat[2:6, 2:6] = 0.9
    >>> meta = {"width": 64, "height": 64, "slide_mpp": 1.0, "level0_per_heatmap_px": 8.0, "classes": ["b", "m"]}
    >>> tiles = pd.DataFrame({"x": [0], "y": [0], "w": [64], "h": [64], "mean_weight": [0.3], "prob_b": [0.2],
    ...                       "prob_m": [0.8], "pred": ["m"]})
    >>> gj = heatmap_geojson(tiles, meta, heat, threshold=0.5)
    >>> [f["properties"]["objectType"] for f in gj["features"]]
    ['tile', 'annotation']
    >>> validate_qupath_geojson(gj, 64, 64)
    []
"""

from __future__ import annotations

import gzip as gzip_module
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medwsol.errors import DataError
from medwsol.io import atomic_path

__all__ = [
    "OBJECT_TYPES",
    "heatmap_geojson",
    "heatmap_regions",
    "write_geojson",
    "read_geojson",
    "validate_qupath_geojson",
    "geojson_geometry",
    "polygons_iou",
]

OBJECT_TYPES = ("annotation", "detection", "tile")
#: colour of tiles whose predicted class is not the positive (last) class
OTHER_COLOUR = (60, 160, 60)
_NS = uuid.UUID("6f1c2b7e-2f4e-4c1e-9a53-6d2d9c1b7a10")  # namespace of the deterministic feature ids


def _uuid(*parts: Any) -> str:
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


def _ring(coords: Iterable[Sequence[float]], ndigits: int = 2) -> list[list[float]]:
    ring = [[round(float(x), ndigits), round(float(y), ndigits)] for x, y in coords]
    if ring and ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _geometry(geom) -> dict[str, Any]:
    """shapely (Multi)Polygon -> GeoJSON geometry (exterior counter-clockwise in x-right/y-down, closed)."""
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient

    if isinstance(geom, Polygon):
        g = orient(geom, 1.0)
        return {"type": "Polygon", "coordinates": [_ring(g.exterior.coords)] + [_ring(r.coords) for r in g.interiors]}
    if isinstance(geom, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [_geometry(p)["coordinates"] for p in geom.geoms]}
    raise DataError(f"cannot export a {geom.geom_type} as a QuPath polygon; fix: pass polygons")


def _finite_measurements(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def heatmap_regions(
    heat: np.ndarray,
    threshold: float,
    level0_per_px: float,
    width: int,
    height: int,
    simplify: float = 1.0,
    min_area_px0: float = 0.0,
    coverage: np.ndarray | None = None,
) -> list[tuple[Any, dict[str, float]]]:
    """Connected regions of ``heat >= threshold`` as level-0 shapely polygons with holes.

    Args:
        heat: float heatmap ``[H, W]`` in [0, 1].
        threshold: regions are ``heat >= threshold`` (and ``coverage`` when given).
        level0_per_px: level-0 pixels per heatmap pixel; heatmap pixel ``(r, c)`` covers
            ``x in [c*k, (c+1)*k)``, ``y in [r*k, (r+1)*k)``.
        width: slide level-0 width (polygons are clipped to the slide).
        height: slide level-0 height.
        simplify: Douglas-Peucker tolerance in heatmap pixels (0: none; topology preserved).
        min_area_px0: drop regions smaller than this (level-0 px²).
        coverage: optional bool ``[H, W]``: only covered pixels can be foreground.

    Returns:
        list of ``(polygon, stats)`` with stats ``mean_weight`` and ``max_weight`` (over the region's
        heatmap pixels) and ``area_px`` (level-0 px²), largest first.
    """
    import shapely
    from shapely.affinity import affine_transform
    from shapely.geometry import Polygon, box
    from skimage.measure import find_contours, label, regionprops

    heat = np.asarray(heat, dtype=np.float32)
    fg = heat >= threshold
    if coverage is not None:
        fg &= np.asarray(coverage, dtype=bool)
    if not fg.any():
        return []
    k = float(level0_per_px)
    slide_box = box(0, 0, width, height)
    lab = label(fg, connectivity=2)
    out = []
    for reg in regionprops(lab):
        r0, c0, r1, c1 = reg.bbox
        sub = np.pad((lab[r0:r1, c0:c1] == reg.label).astype(np.float32), 1)
        rings = [c for c in find_contours(sub, 0.5, fully_connected="high") if len(c) >= 4]
        if not rings:
            continue
        # contours are (row, col) in the padded crop; pixel centre (r, c) of the heatmap is level-0 ((c+.5)k, (r+.5)k)
        polys = [Polygon(np.stack([c[:, 1], c[:, 0]], 1)) for c in rings]
        polys.sort(key=lambda p: p.area, reverse=True)
        outer, holes = polys[0], [p for p in polys[1:] if p.area > 0]
        geom = Polygon(outer.exterior.coords, [h.exterior.coords for h in holes])
        geom = shapely.make_valid(geom)
        geom = affine_transform(geom, [k, 0, 0, k, (c0 - 1 + 0.5) * k, (r0 - 1 + 0.5) * k])
        if simplify > 0:
            geom = geom.simplify(simplify * k, preserve_topology=True)
        geom = shapely.make_valid(geom).intersection(slide_box)
        parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and not g.is_empty]
        if not parts:
            continue
        geom = parts[0] if len(parts) == 1 else shapely.geometry.MultiPolygon(parts)
        if geom.area < min_area_px0 or geom.area <= 0:
            continue
        vals = heat[r0:r1, c0:c1][lab[r0:r1, c0:c1] == reg.label]
        out.append((geom, {"mean_weight": float(vals.mean()), "max_weight": float(vals.max()), "area_px": float(geom.area)}))
    out.sort(key=lambda t: t[1]["area_px"], reverse=True)
    return out


def heatmap_geojson(
    tiles_df,
    meta: Mapping[str, Any],
    heat: np.ndarray | None,
    threshold: float | None = None,
    class_name: str = "Tumor",
    colour: Sequence[int] = (200, 0, 0),
    simplify: float = 1.0,
    min_region_area: float = 0.0,
    gzip: bool = False,
    coverage: np.ndarray | None = None,
) -> dict[str, Any]:
    """QuPath FeatureCollection for one slide: a ``tile`` per inferred tile, an ``annotation`` per region.

    Args:
        tiles_df: ``tiles.csv`` of the slide (``x, y, w, h`` level-0 px, ``tissue``, ``mean_weight``,
            ``prob_<class>``, ``pred``); None or empty: no tiles.
        meta: the slide's ``meta.json`` (``width``, ``height``, ``slide_mpp``, ``level0_per_heatmap_px``,
            ``classes``, ``name``; ``threshold`` when ``threshold`` is None).
        heat: heatmap ``[H_out, W_out]`` in [0, 1], or None for tiles only.
        threshold: region threshold (default ``meta["threshold"]``, else 0.5).
        class_name: classification of the regions and of tiles predicted as the positive (last) class.
        colour: its RGB colour.
        simplify: polygon simplification tolerance in heatmap pixels.
        min_region_area: regions smaller than this many µm² are dropped.
        gzip: unused here (kept for a uniform signature); see :func:`write_geojson`.
        coverage: optional bool ``[H_out, W_out]``; regions only where tiles were inferred.

    Returns:
        A GeoJSON dict; feature ids are deterministic UUIDs (uuid5 of slide name, kind, index).
    """
    del gzip
    width, height = int(meta["width"]), int(meta["height"])
    k = float(meta.get("level0_per_heatmap_px", 1.0))
    mpp = float(meta.get("slide_mpp") or 1.0)
    name = str(meta.get("name", "slide"))
    classes = list(meta.get("classes") or [])
    thr = float(threshold if threshold is not None else meta.get("threshold", 0.5) or 0.5)
    colour = [int(c) for c in colour]
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise DataError(f"export.colour {colour}: expected 3 integers in 0..255; fix: e.g. [200, 0, 0]")
    positive = classes[-1] if classes else None
    feats: list[dict[str, Any]] = []

    if tiles_df is not None and len(tiles_df):
        from shapely.geometry import box

        meas_cols = [c for c in tiles_df.columns if c == "mean_weight" or c.startswith("prob_") or c == "tissue"]
        recs = tiles_df.to_dict("records")
        for i, t in enumerate(recs):
            x0, y0 = max(0.0, float(t["x"])), max(0.0, float(t["y"]))
            x1, y1 = min(float(width), float(t["x"]) + float(t["w"])), min(float(height), float(t["y"]) + float(t["h"]))
            if x1 <= x0 or y1 <= y0:
                continue
            pred = t.get("pred")
            pred = pred.strip() if isinstance(pred, str) else ""
            is_pos = positive is not None and pred == positive
            cls = {"name": class_name if is_pos else (pred or "Other"), "color": colour if is_pos else list(OTHER_COLOUR)}
            feats.append({
                "type": "Feature",
                "id": _uuid(name, "tile", i),
                "geometry": _geometry(box(x0, y0, x1, y1)),
                "properties": {
                    "objectType": "tile",
                    "classification": cls,
                    "measurements": _finite_measurements({c: t[c] for c in meas_cols}),
                    "isLocked": True,
                },
            })

    if heat is not None:
        regions = heatmap_regions(heat, thr, k, width, height, simplify=simplify,
                                  min_area_px0=min_region_area / (mpp * mpp), coverage=coverage)
        for i, (geom, stats) in enumerate(regions):
            feats.append({
                "type": "Feature",
                "id": _uuid(name, "annotation", i),
                "geometry": _geometry(geom),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{class_name} region {i + 1}",
                    "classification": {"name": class_name, "color": colour},
                    "measurements": _finite_measurements({
                        "mean_weight": stats["mean_weight"], "max_weight": stats["max_weight"],
                        "area_um2": stats["area_px"] * mpp * mpp, "threshold": thr,
                    }),
                    "isLocked": False,
                },
            })
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(obj: Mapping[str, Any], out_path: str | os.PathLike[str], gzip: bool | None = None) -> Path:
    """Write a GeoJSON dict atomically; gzip-compressed when ``gzip`` (or the path ends in ``.gz``).

    With ``gzip=True`` a path without ``.gz`` gets it appended (``x.geojson`` -> ``x.geojson.gz``).

    Returns:
        The written path.

    Example:
        >>> from medwsol.export.qupath import write_geojson
        >>> write_geojson({"type": "FeatureCollection", "features": []}, "/tmp/medwsol_doc/e.geojson", gzip=True).name
        'e.geojson.gz'
    """
    path = Path(out_path)
    if gzip is None:
        gzip = path.suffix == ".gz"
    if gzip and path.suffix != ".gz":
        path = path.with_name(path.name + ".gz")
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    with atomic_path(path) as tmp:
        if gzip:
            with open(tmp, "wb") as fh, gzip_module.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
                gz.write(data)
        else:
            tmp.write_bytes(data)
    return path


def read_geojson(src: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A GeoJSON dict from a dict, a ``.geojson`` or a ``.geojson.gz`` file."""
    if isinstance(src, Mapping):
        return dict(src)
    p = Path(src)
    if not p.is_file():
        raise DataError(f"{p}: GeoJSON file not found; fix: check the path")
    try:
        raw = gzip_module.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        return json.loads(raw)
    except (OSError, ValueError) as err:
        raise DataError(f"{p}: not valid (gzipped) JSON ({str(err).splitlines()[0][:120]}); fix: re-export it") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_ring(ring: Any, where: str, width: float, height: float, problems: list[str]) -> bool:
    if not isinstance(ring, list) or len(ring) < 4:
        problems.append(f"{where}: a ring needs >= 4 positions (closed), got {len(ring) if isinstance(ring, list) else ring!r}")
        return False
    ok = True
    for j, pt in enumerate(ring):
        if not (isinstance(pt, list) and len(pt) >= 2 and _is_number(pt[0]) and _is_number(pt[1])):
            problems.append(f"{where}[{j}]: position {pt!r} is not [x, y] numbers")
            return False
        x, y = pt[0], pt[1]
        if ok and not (0 <= x <= width and 0 <= y <= height):
            problems.append(f"{where}[{j}]: ({x}, {y}) lies outside the slide (0..{width}, 0..{height})")
            ok = False
    if ring[0][:2] != ring[-1][:2]:
        problems.append(f"{where}: ring is not closed (first {ring[0]} != last {ring[-1]})")
        ok = False
    return ok


def validate_qupath_geojson(obj: Any, width: float, height: float) -> list[str]:
    """Problems that would stop QuPath importing ``obj`` (or misplace it); empty when it is fine.

    Checks (QuPath's GeoJSON reader rules): FeatureCollection of Features; UUID string ``id``;
    ``properties.objectType`` in annotation|detection|tile and inside ``properties``; classification
    ``{"name": non-empty str, "color": [3 ints 0..255]}``; ``measurements`` a dict of finite numbers;
    ``isLocked`` a bool when present; geometry Polygon/MultiPolygon (also Point, LineString and their
    Multi forms) with closed rings of >= 4 positions, valid polygons (shapely) and every coordinate
    inside ``[0, width] x [0, height]``.

    Args:
        obj: the parsed GeoJSON (or a path to a ``.geojson``/``.geojson.gz``).
        width: slide level-0 width.
        height: slide level-0 height.

    Returns:
        list of one-line problem descriptions.

    Example:
        >>> validate_qupath_geojson({"type": "FeatureCollection", "features": [{"type": "Feature"}]}, 10, 10)[0]
        'features[0]: id missing (QuPath needs a UUID string)'
    """
    if isinstance(obj, (str, os.PathLike)):
        obj = read_geojson(obj)
    problems: list[str] = []
    if not isinstance(obj, Mapping) or obj.get("type") != "FeatureCollection":
        return [f"top level: expected a FeatureCollection, got type {obj.get('type') if isinstance(obj, Mapping) else type(obj).__name__!r}"]
    feats = obj.get("features")
    if not isinstance(feats, list):
        return ["top level: 'features' must be a list"]
    for i, f in enumerate(feats):
        w = f"features[{i}]"
        if not isinstance(f, Mapping) or f.get("type") != "Feature":
            problems.append(f"{w}: expected a Feature")
            continue
        fid = f.get("id")
        if fid is None:
            problems.append(f"{w}: id missing (QuPath needs a UUID string)")
        else:
            try:
                if not isinstance(fid, str):
                    raise ValueError
                uuid.UUID(fid)
            except ValueError:
                problems.append(f"{w}: id {fid!r} is not a UUID string")
        props = f.get("properties")
        if not isinstance(props, Mapping):
            problems.append(f"{w}: properties missing or not an object")
            props = {}
        if "objectType" in f and "objectType" not in props:
            problems.append(f"{w}: objectType is outside properties (QuPath ignores it there)")
        ot = props.get("objectType")
        if ot not in OBJECT_TYPES:
            problems.append(f"{w}: properties.objectType {ot!r} not one of {', '.join(OBJECT_TYPES)}")
        if "classification" in props:
            c = props["classification"]
            if not isinstance(c, Mapping):
                problems.append(f"{w}: classification must be an object with name and color")
            else:
                if not isinstance(c.get("name"), str) or not c.get("name"):
                    problems.append(f"{w}: classification.name missing or empty")
                col = c.get("color")
                if not (isinstance(col, list) and len(col) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in col)):
                    problems.append(f"{w}: classification.color {col!r} must be [r, g, b] integers 0..255")
        if "measurements" in props:
            m = props["measurements"]
            if not isinstance(m, Mapping):
                problems.append(f"{w}: measurements must be an object {{name: number}}, got {type(m).__name__}")
            else:
                bad = [k for k, v in m.items() if not _is_number(v)]
                if bad:
                    problems.append(f"{w}: measurements {bad[:5]} are not finite numbers")
        if "isLocked" in props and not isinstance(props["isLocked"], bool):
            problems.append(f"{w}: isLocked must be true or false")
        _check_geometry(f.get("geometry"), w, width, height, problems)
    return problems


def _check_geometry(g: Any, w: str, width: float, height: float, problems: list[str]) -> None:
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    if not isinstance(g, Mapping) or "type" not in g or "coordinates" not in g:
        problems.append(f"{w}: geometry missing or without type/coordinates")
        return
    t, coords = g["type"], g["coordinates"]
    if t == "Polygon":
        polys = [coords]
    elif t == "MultiPolygon":
        polys = coords if isinstance(coords, list) else [None]
    elif t in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        pts = {"Point": lambda c: [c], "MultiPoint": lambda c: c, "LineString": lambda c: c,
               "MultiLineString": lambda c: [p for line in c for p in line]}[t](coords)
        for p in pts:
            if not (isinstance(p, list) and len(p) >= 2 and _is_number(p[0]) and _is_number(p[1])):
                problems.append(f"{w}: position {p!r} is not [x, y] numbers")
                return
            if not (0 <= p[0] <= width and 0 <= p[1] <= height):
                problems.append(f"{w}: ({p[0]}, {p[1]}) lies outside the slide (0..{width}, 0..{height})")
                return
        return
    else:
        problems.append(f"{w}: geometry type {t!r} is not a GeoJSON geometry QuPath reads")
        return
    ok = True
    for j, poly in enumerate(polys):
        if not isinstance(poly, list) or not poly:
            problems.append(f"{w}.geometry: polygon {j} has no rings")
            ok = False
            continue
        for r, ring in enumerate(poly):
            ok &= _check_ring(ring, f"{w}.geometry.polygon[{j}].ring[{r}]", width, height, problems)
    if ok:
        try:
            geom = shape(g)
        except Exception as err:  # noqa: BLE001 - shapely raises several types for bad input
            problems.append(f"{w}: geometry cannot be built ({err})")
            return
        if not geom.is_valid:
            problems.append(f"{w}: invalid polygon ({explain_validity(geom)})")
        elif geom.area <= 0:
            problems.append(f"{w}: polygon has zero area")


def geojson_geometry(
    src: str | os.PathLike[str] | Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    object_types: Sequence[str] | None = ("annotation",),
):
    """Union (shapely) of a GeoJSON's (Multi)Polygon features, filtered by class and objectType.

    Args:
        src: a GeoJSON dict or file (``.geojson``/``.geojson.gz``).
        class_names: keep features whose classification name is one of these (case-insensitive);
            None keeps all.
        object_types: keep these ``properties.objectType`` values (a feature without one counts as
            ``annotation``); None keeps all.

    Returns:
        a shapely geometry in level-0 px (empty when nothing matches).
    """
    from medwsol.data.slide_tiles import qupath_geometry

    return qupath_geometry(read_geojson(src), class_names=class_names, object_types=object_types)


def polygons_iou(
    geojson_a: str | os.PathLike[str] | Mapping[str, Any],
    geojson_b: str | os.PathLike[str] | Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    object_types: Sequence[str] | None = ("annotation",),
) -> float:
    """IoU of the polygon unions of two GeoJSONs (e.g. exported regions vs the true tumour regions).

    Both empty gives 1.0 (perfect agreement on "nothing"); one empty gives 0.0.

    Example:
        >>> a = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon",
        ...      "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]}, "properties": {}}]}
        >>> polygons_iou(a, a)
        1.0
    """
    ga = geojson_geometry(geojson_a, class_names, object_types)
    gb = geojson_geometry(geojson_b, class_names, object_types)
    if ga.is_empty and gb.is_empty:
        return 1.0
    union = ga.union(gb).area
    return float(ga.intersection(gb).area / union) if union > 0 else 0.0
