"""QuPath GeoJSON in and out: annotation classes, tile overlaps, tissue contours and the tile grid.

QuPath's *Export objects as GeoJSON* writes a FeatureCollection, a bare list of Features or one
Feature (depending on version and options). Coordinates are level-0 pixels, y down, which is
the store's tile space, so nothing is rescaled. Each feature's ``properties.objectType`` (older
versions: ``object_type``; missing means annotation) says what it is, and
``properties.classification`` its class: ``{"name": ..., "color": [r, g, b]}``, or a bare string
in older exports. An annotation without a class belongs to :data:`UNCLASSIFIED`; its ``name`` is
the object's label in QuPath, not a class, so it is never used as one.

Only areal objects count: polygons (holes kept) and multipolygons. Point and line annotations,
which QuPath exports alongside, have no area to overlap a tile and are skipped. Self-intersecting
rings, which freehand brushes produce, are repaired with ``make_valid``.

Overlaps are computed on arrays (``shapely.box`` per tile, an STRtree to find the tiles a class
touches, ``contains_properly`` for the tiles wholly inside it), so only tiles on a class's boundary
are intersected exactly: a slide of 100k tiles costs as much as its boundary does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape

from featurestore.schemas.errors import FsError
from featurestore.slides.tissue import TissueMask

UNCLASSIFIED = "Unclassified"
"""Class name of annotations QuPath exports without a classification."""

TISSUE = "Tissue"
"""Class of the tissue contours ``fs extract --geojson`` writes."""

_TISSUE_COLOUR = [0, 160, 0]  # the green of the QC image's tissue outline

BOUNDS_TOLERANCE = 0.01
"""Share of the slide's width and height an annotation may reach beyond its edge (brush strokes that
overshoot); geometry there is clipped away. Beyond it the file is taken to be of another slide or scale."""

_AREAL = ("Polygon", "MultiPolygon")
_EXPORT_HINT = "export it from QuPath with File > Export objects as GeoJSON"


class AnnotationError(FsError, ValueError):
    """An annotation file is not QuPath GeoJSON, or does not fit its slide."""


@dataclass(frozen=True, slots=True)
class QuPathObject:
    """One areal object of a QuPath GeoJSON file: its type, class, geometry and numeric measurements."""

    object_type: str
    class_name: str
    geometry: shapely.Geometry
    measurements: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class AnnotationClass:
    """The union of one class's annotations on a slide, in level-0 pixels."""

    name: str
    geometry: shapely.Geometry

    @property
    def area(self) -> float:
        return float(self.geometry.area)

    def to_geojson(self) -> str:
        return shapely.to_geojson(self.geometry)


def read_qupath(path: str | Path) -> tuple[list[QuPathObject], int]:
    """The areal objects of a QuPath GeoJSON file, and how many non-areal ones (points, lines) were skipped.

    Raises :class:`AnnotationError` naming the file (and line, for broken JSON) when it is not
    GeoJSON of polygons as QuPath writes it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise AnnotationError(f"{path}: cannot read ({why}); {_EXPORT_HINT}") from err
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path} line {err.lineno}: not JSON ({err.msg}); {_EXPORT_HINT}") from err
    features = _features(doc, path)
    objects: list[QuPathObject] = []
    skipped = 0
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type", "Feature") != "Feature":
            raise AnnotationError(f"{path}: feature {i} is not a GeoJSON Feature; {_EXPORT_HINT}")
        geometry = feature.get("geometry")
        if geometry is not None and (not isinstance(geometry, dict) or "type" not in geometry):
            raise AnnotationError(f"{path}: feature {i} has a geometry without a GeoJSON type; {_EXPORT_HINT}")
        if geometry is None or geometry["type"] not in _AREAL:
            skipped += 1
            continue
        try:
            geom = shape(geometry)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as err:
            raise AnnotationError(f"{path}: feature {i} has a malformed {geometry['type']} "
                                  f"({str(err).splitlines()[0] or type(err).__name__}); {_EXPORT_HINT}") from err
        if not geom.is_valid:
            geom = _areal(shapely.make_valid(geom))
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise AnnotationError(f"{path}: feature {i} has properties that are not an object; {_EXPORT_HINT}")
        objects.append(QuPathObject(_object_type(properties), _class_name(properties), geom,
                                    _measurements(properties)))
    if not objects:
        what = f"only {skipped} point or line objects" if skipped else "no objects"
        raise AnnotationError(f"{path}: {what}, no polygon annotations; draw areas (rectangle, ellipse, polygon, "
                              f"brush) and {_EXPORT_HINT}")
    return objects, skipped


def _features(doc: Any, path: Path) -> list:
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(f"{path}: not QuPath GeoJSON (top level is {kind!r}, not a FeatureCollection, "
                              f"a Feature or a list of Features); {_EXPORT_HINT}")
    if not isinstance(features, list) or not features:
        raise AnnotationError(f"{path}: no features; {_EXPORT_HINT}")
    return features


def _areal(geom: shapely.Geometry) -> shapely.Geometry:
    """The polygonal part of a repaired geometry (``make_valid`` can return collections with lines)."""
    parts = shapely.get_parts(geom)
    return shapely.union_all([p for p in parts if p.geom_type in _AREAL])


def _object_type(properties: dict) -> str:
    return str(properties.get("objectType") or properties.get("object_type") or "annotation")


def _class_name(properties: dict) -> str:
    cls = properties.get("classification")
    if isinstance(cls, dict):
        # QuPath 0.4+ spells a derived class ("Tumor: Positive") as its parts in "names" as well.
        names = cls.get("names")
        name = cls.get("name") or (": ".join(map(str, names)) if isinstance(names, list) else None)
    else:
        name = cls
    return str(name).strip() if isinstance(name, str) and name.strip() else UNCLASSIFIED


def _measurements(properties: dict) -> dict[str, float]:
    raw = properties.get("measurements") or {}
    if isinstance(raw, list):  # QuPath before 0.4: [{"name": ..., "value": ...}]
        raw = {m.get("name"): m.get("value") for m in raw if isinstance(m, dict)}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def annotation_classes(objects: Iterable[QuPathObject], path: str | Path, width: int,
                       height: int) -> list[AnnotationClass]:
    """Each class's annotations on a ``width`` × ``height`` slide, unioned and clipped to the slide, by name.

    Raises :class:`AnnotationError` when an annotation reaches beyond the slide by more than
    :data:`BOUNDS_TOLERANCE`, or when the file has no annotation objects (only tiles or detections).
    """
    shapes: dict[str, list[shapely.Geometry]] = {}
    for obj in objects:
        if obj.object_type == "annotation":
            shapes.setdefault(obj.class_name, []).append(obj.geometry)
    if not shapes:
        raise AnnotationError(f"{path}: no annotation objects (only detections or tiles); select the annotations "
                              f"in QuPath and {_EXPORT_HINT}")
    x0, y0, x1, y1 = shapely.total_bounds([g for gs in shapes.values() for g in gs])
    dx, dy = BOUNDS_TOLERANCE * width, BOUNDS_TOLERANCE * height
    if x0 < -dx or y0 < -dy or x1 > width + dx or y1 > height + dy:
        raise AnnotationError(f"{path}: annotations span x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f} beyond the "
                              f"slide's {width} × {height} level-0 pixels; export from the image this slide is "
                              "(QuPath's full-resolution coordinates), or name the right slide with --slide")
    frame = shapely.box(0, 0, width, height)
    classes = [AnnotationClass(name, shapely.intersection(shapely.union_all(gs), frame))
               for name, gs in sorted(shapes.items())]
    return [c for c in classes if not c.geometry.is_empty]


def tile_overlaps(geometry: shapely.Geometry, x: np.ndarray, y: np.ndarray,
                  footprint: float) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (positions into ``x``/``y``, sorted) overlapping ``geometry``, and the fraction of each inside it.

    Tile ``i`` is the square ``[x_i, x_i + footprint) × [y_i, y_i + footprint)`` in level-0 pixels.
    Only tiles with a fraction above zero are returned.
    """
    boxes = shapely.box(x, y, np.asarray(x, np.float64) + footprint, np.asarray(y, np.float64) + footprint)
    tree = shapely.STRtree(boxes)
    parts = shapely.get_parts(geometry)
    # Querying by part keeps a multipolygon's far-apart pieces from pulling in every tile between them.
    hits = np.unique(tree.query(parts, predicate="intersects")[1])
    shapely.prepare(geometry)
    inside = shapely.contains_properly(geometry, boxes[hits])
    fraction = np.ones(len(hits), np.float64)
    edge = ~inside
    fraction[edge] = shapely.area(shapely.intersection(boxes[hits[edge]], geometry)) / float(footprint) ** 2
    keep = fraction > 0
    return hits[keep], np.minimum(fraction[keep], 1.0)


def mask_polygons(mask: TissueMask, width: int, height: int) -> list[shapely.Polygon]:
    """The tissue mask's regions as polygons in level-0 pixels, holes included, one per connected piece.

    Outlines follow the mask's pixel edges exactly (the mask covers the whole slide, so a mask
    pixel is ``width / mask columns`` × ``height / mask rows`` level-0 pixels), so each polygon's
    area is its mask pixels' area.
    """
    m = np.asarray(mask.mask, bool)
    rows_n, cols_n = m.shape
    padded = np.zeros((rows_n, cols_n + 2), np.int8)
    padded[:, 1:-1] = m
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major order: the i-th end closes the i-th start
    if len(rows) == 0:
        return []
    union = shapely.union_all(shapely.box(starts, rows, ends, rows + 1))
    scale = np.array([width / cols_n, height / rows_n])
    level0 = shapely.transform(shapely.simplify(union, 0), lambda xy: xy * scale)
    return [p for p in shapely.get_parts(level0) if p.geom_type == "Polygon"]


def tissue_features(polygons: Sequence[shapely.Polygon]) -> list[dict]:
    """Tissue contours as QuPath annotations of class :data:`TISSUE`."""
    return [_feature(p, "annotation", {"name": TISSUE, "color": _TISSUE_COLOUR}) for p in polygons]


def tile_features(x: np.ndarray, y: np.ndarray, footprint: float,
                  measurements: Mapping[str, np.ndarray]) -> list[dict]:
    """One QuPath ``tile`` object per tile (a square of ``footprint`` level-0 px), with its measurements.

    A measurement whose value is NaN for a tile is left out of that tile (QuPath shows it as missing).
    """
    columns = {name: np.asarray(values, np.float64) for name, values in measurements.items()}
    out = []
    for i, (x0, y0) in enumerate(zip(np.asarray(x).tolist(), np.asarray(y).tolist(), strict=True)):
        x1, y1 = x0 + footprint, y0 + footprint
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        values = {name: float(v[i]) for name, v in columns.items() if not np.isnan(v[i])}
        out.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"objectType": "tile", "measurements": values}})
    return out


def _feature(geom: shapely.Geometry, object_type: str, classification: dict) -> dict:
    geometry = json.loads(shapely.to_geojson(shapely.set_precision(geom, 0.01)))
    properties: dict[str, Any] = {"objectType": object_type, "classification": classification}
    if object_type == "annotation":
        properties["isLocked"] = True  # contours computed from the mask: QuPath should not let a click move them
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def write_geojson(path: str | Path, features: list[dict]) -> Path:
    """Write ``features`` as a GeoJSON FeatureCollection QuPath imports (drag the file onto the slide).

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f, separators=(",", ":"))
    os.replace(tmp, out)
    return out
