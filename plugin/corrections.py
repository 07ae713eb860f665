"""Corrections: what the annotator did to each predicted region.

Input is Label Studio JSON as it arrives: the ``result`` list of the prediction the
annotation started from (the regions our backend produced) and the ``result`` list
of the submitted annotation. Output is one :class:`RegionCorrection` per predicted
or final region, wrapped in an :class:`AnnotationCorrection`.

Kinds (``KIND_*``):
    accepted   matched, same labels, same geometry (within ``VERTEX_TOLERANCE_PX``)
    edited     matched, same labels, geometry changed (``iou``, vertex and pixel counts)
    relabeled  matched, labels changed (``label_from`` -> ``label_to``); the geometry
               may have changed too (``geometry_changed``)
    deleted    a predicted region with no final counterpart (a false positive)
    added      a final region with no predicted counterpart (a miss)

Matching, in order (``MATCH_*`` records which one paired a region):
    1. by id: Label Studio keeps the id of a predicted region the annotator kept;
    2. by ``origin``: a final region marked ``prediction`` / ``prediction-changed``
       whose id did not survive is paired with the unmatched predicted region of the
       same control that it equals (``prediction``) or overlaps most (``prediction-changed``);
    3. by geometry: what is left is paired greedily by IoU, highest first, when the
       IoU reaches ``DEFAULT_MATCH_IOU``. A hand-drawn region over a deleted proposal
       of the same object is an edit of that proposal, not a miss.
Only regions of the same type, control (``from_name``) and image (``to_name``) pair.

IoU is computed on masks rasterised at the original image size: polygons and
rectangles with PIL's ``ImageDraw.polygon`` (outline included), brush strokes with
Label Studio's own RLE decoder (``label_studio_sdk.converter.brush``). Masks are kept
cropped to their bounding box, so large images cost what their regions cover.

How a prediction carries what the log keeps of each proposal: Label Studio stores a
prediction's result items verbatim, so each item our backend emits may carry
``score`` (Label Studio's own per-region field) and
``meta["labelassist"] = {"embedding": <base64 float16 little-endian>, "image_sha256": ...}``
(build it with :func:`prediction_meta`). The correction store can also hold the
embeddings in a side table keyed by region id; callers pass those in as
``extras`` and they win over the item's meta.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from labelassist.workers.errors import LabelassistError

KIND_ACCEPTED = "accepted"
KIND_EDITED = "edited"
KIND_RELABELED = "relabeled"
KIND_DELETED = "deleted"
KIND_ADDED = "added"
KINDS = (KIND_ACCEPTED, KIND_EDITED, KIND_RELABELED, KIND_DELETED, KIND_ADDED)

MATCH_ID = "id"
MATCH_ORIGIN = "origin"
MATCH_IOU = "iou"
MATCHES = (MATCH_ID, MATCH_ORIGIN, MATCH_IOU)

# Label Studio's region `origin` values.
ORIGIN_PREDICTION = "prediction"
ORIGIN_PREDICTION_CHANGED = "prediction-changed"
ORIGIN_MANUAL = "manual"

POLYGON = "polygonlabels"
BRUSH = "brushlabels"
RECTANGLE = "rectanglelabels"
REGION_TYPES = (POLYGON, BRUSH, RECTANGLE)

DEFAULT_MATCH_IOU = 0.5  # geometric matching: the usual "same object" IoU of detection benchmarks
VERTEX_TOLERANCE_PX = 0.5  # a vertex that moved less than this (pixels) did not move
PREDICTION_META_KEY = "labelassist"  # our namespace inside a result item's `meta`


class CorrectionError(LabelassistError, ValueError):
    """A prediction or annotation result that cannot be diffed (malformed region JSON)."""

    code = "bad_annotation"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CorrectionError(message)


# --- embeddings carried by prediction items ---------------------------------------


def encode_embedding_b64(embedding: Sequence[float]) -> str:
    """L2-normalised CLIP embedding -> base64 of little-endian float16 (2 bytes per dim)."""
    arr = np.asarray(embedding, dtype="<f2")
    _require(arr.ndim == 1, f"embedding: expected a 1-d vector, got shape {arr.shape}")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_embedding_b64(text: str) -> tuple[float, ...]:
    """Inverse of :func:`encode_embedding_b64`; returns float values."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise CorrectionError(f"embedding: expected base64 text, got {str(text)[:32]!r}... ({exc})") from None
    _require(len(raw) % 2 == 0, f"embedding: expected float16 bytes (an even count), got {len(raw)} bytes")
    return tuple(float(v) for v in np.frombuffer(raw, dtype="<f2").astype(np.float32))


def prediction_meta(embedding: Sequence[float] = (), image_sha256: str = "") -> dict[str, Any]:
    """The ``meta`` a predicted result item carries so its correction keeps the proposal's embedding."""
    ours: dict[str, Any] = {}
    if len(embedding):
        ours["embedding"] = encode_embedding_b64(embedding)
    if image_sha256:
        ours["image_sha256"] = image_sha256
    return {PREDICTION_META_KEY: ours}


@dataclass(frozen=True)
class RegionExtras:
    """What the log keeps of a proposal beyond its Label Studio JSON."""

    score: float | None = None
    embedding: tuple[float, ...] = ()


def region_extras(item: Mapping[str, Any]) -> RegionExtras:
    """Score and embedding from a predicted result item (see the module docstring)."""
    score = item.get("score")
    score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) else None
    meta = item.get("meta")
    ours = meta.get(PREDICTION_META_KEY) if isinstance(meta, Mapping) else None
    embedding: tuple[float, ...] = ()
    if isinstance(ours, Mapping):
        emb = ours.get("embedding")
        if isinstance(emb, str) and emb:
            embedding = decode_embedding_b64(emb)
        elif isinstance(emb, (list, tuple)):
            embedding = tuple(float(v) for v in emb)
    return RegionExtras(score=score, embedding=embedding)


def prediction_image_sha256(result: Iterable[Mapping[str, Any]]) -> str:
    """The image hash our backend put in the prediction's items' meta, or ""."""
    for item in result:
        meta = item.get("meta") if isinstance(item, Mapping) else None
        ours = meta.get(PREDICTION_META_KEY) if isinstance(meta, Mapping) else None
        if isinstance(ours, Mapping) and isinstance(ours.get("image_sha256"), str):
            return ours["image_sha256"]
    return ""


# --- regions and their geometry ----------------------------------------------------


@dataclass(frozen=True)
class RasterMask:
    """A binary mask cropped to its bounding box: ``mask[y - y0, x - x0]`` is pixel (x, y).

    ``mask``: bool array of shape (h, w); (x0, y0) is its top-left pixel in the image.
    """

    x0: int
    y0: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_intersection(a: RasterMask, b: RasterMask) -> int:
    """Pixels set in both cropped masks of the same image."""
    inter = 0
    ax1, ay1 = a.x0 + a.mask.shape[1], a.y0 + a.mask.shape[0]
    bx1, by1 = b.x0 + b.mask.shape[1], b.y0 + b.mask.shape[0]
    x0, y0, x1, y1 = max(a.x0, b.x0), max(a.y0, b.y0), min(ax1, bx1), min(ay1, by1)
    if x1 > x0 and y1 > y0:
        sa = a.mask[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0]
        sb = b.mask[y0 - b.y0:y1 - b.y0, x0 - b.x0:x1 - b.x0]
        inter = int(np.logical_and(sa, sb).sum())
    return inter


def mask_iou(a: RasterMask, b: RasterMask) -> float:
    """Intersection over union of two cropped masks of the same image; 0.0 when both are empty."""
    inter = mask_intersection(a, b)
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def rasterize_polygon_px(points_px: Sequence[tuple[float, float]], size_wh: tuple[int, int]) -> RasterMask:
    """Fill a polygon given in pixels (outline included) on a ``size_wh`` image, cropped to its box."""
    from PIL import Image, ImageDraw

    w, h = size_wh
    if len(points_px) < 2:
        return RasterMask(0, 0, np.zeros((0, 0), bool))
    xs = [p[0] for p in points_px]
    ys = [p[1] for p in points_px]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(w, math.ceil(max(xs)) + 1), min(h, math.ceil(max(ys)) + 1)
    if x1 <= x0 or y1 <= y0:
        return RasterMask(0, 0, np.zeros((0, 0), bool))
    img = Image.new("1", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(img).polygon([(x - x0, y - y0) for x, y in points_px], fill=1, outline=1)
    return RasterMask(x0, y0, np.array(img, dtype=bool))


def decode_brush_rle(rle: Sequence[int], size_wh: tuple[int, int]) -> np.ndarray:
    """Label Studio brush RLE -> bool mask of shape (h, w) (the alpha channel of its RGBA layer)."""
    from label_studio_sdk.converter.brush import decode_rle

    w, h = size_wh
    try:
        flat = decode_rle(list(rle))
    except (IndexError, ValueError, TypeError) as exc:
        raise CorrectionError(f"brush rle: not Label Studio RLE ({type(exc).__name__}: {exc})") from None
    _require(flat.size == w * h * 4, f"brush rle: expected {w}x{h}x4 = {w * h * 4} values for a {w}x{h} image, got {flat.size}")
    return flat.reshape(h, w, 4)[:, :, 3] > 0


def crop_mask(mask: np.ndarray) -> RasterMask:
    """A full-size bool mask (h, w) -> the same mask cropped to its nonzero box."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return RasterMask(0, 0, np.zeros((0, 0), bool))
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return RasterMask(x0, y0, mask[y0:y1, x0:x1].copy())


def rectangle_corners_px(x_pct: float, y_pct: float, w_pct: float, h_pct: float, rotation_deg: float,
                         size_wh: tuple[int, int]) -> tuple[tuple[float, float], ...]:
    """Label Studio rectangle (percent, top-left origin, rotated clockwise about that corner) -> 4 corners in px."""
    w, h = size_wh
    x0, y0 = x_pct * w / 100.0, y_pct * h / 100.0
    bw, bh = w_pct * w / 100.0, h_pct * h / 100.0
    t = math.radians(rotation_deg)
    c, s = math.cos(t), math.sin(t)
    return tuple((x0 + dx * c - dy * s, y0 + dx * s + dy * c) for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh)))


@dataclass(frozen=True)
class LabeledRegion:
    """One region item of a Label Studio result, parsed and validated.

    ``points_px``: polygon vertices or rectangle corners in pixels of the original
    image (empty for brush); ``rle``: Label Studio brush RLE (brush only).
    """

    id: str
    region_type: str
    from_name: str
    to_name: str
    size_wh: tuple[int, int]
    labels: tuple[str, ...]
    origin: str | None
    value: Mapping[str, Any]
    points_px: tuple[tuple[float, float], ...] = ()
    rle: tuple[int, ...] = ()

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None

    def raster(self) -> RasterMask:
        if self.region_type == BRUSH:
            return crop_mask(decode_brush_rle(self.rle, self.size_wh))
        return rasterize_polygon_px(self.points_px, self.size_wh)

    def box_xyxy_px(self) -> tuple[float, float, float, float] | None:
        """Bounding box of the vertices; None for brush (known only after decoding)."""
        if not self.points_px:
            return None
        xs = [p[0] for p in self.points_px]
        ys = [p[1] for p in self.points_px]
        return min(xs), min(ys), max(xs), max(ys)


def _number(value: Any, what: str) -> float:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"{what}: expected a finite number, got {value!r}")
    return float(value)


def parse_region(item: Any, where: str = "region") -> LabeledRegion | None:
    """A Label Studio result item -> :class:`LabeledRegion`; None for items that are not
    polygon/brush/rectangle labels (choices, text areas, relations...)."""
    _require(isinstance(item, Mapping), f"{where}: expected a JSON object, got {type(item).__name__}")
    rtype = item.get("type")
    if rtype not in REGION_TYPES:
        return None
    rid = item.get("id")
    _require(isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) != "", f"{where}: expected a region id, got {rid!r}")
    where = f"{where} {rid!s} ({rtype})"
    value = item.get("value")
    _require(isinstance(value, Mapping), f"{where}: expected a `value` object, got {type(value).__name__}")
    ow, oh = item.get("original_width"), item.get("original_height")
    _require(isinstance(ow, int) and isinstance(oh, int) and not isinstance(ow, bool) and ow > 0 and oh > 0,
             f"{where}: expected positive integer original_width/original_height, got {ow!r}x{oh!r}")
    size = (ow, oh)
    labels = value.get(rtype, [])
    _require(isinstance(labels, list) and all(isinstance(l, str) for l in labels), f"{where}: expected value.{rtype} to be a list of labels, got {labels!r}")
    origin = item.get("origin")
    common = dict(id=str(rid), region_type=rtype, from_name=str(item.get("from_name", "")), to_name=str(item.get("to_name", "")),
                  size_wh=size, labels=tuple(labels), origin=origin if isinstance(origin, str) else None, value=value)
    if rtype == POLYGON:
        pts = value.get("points")
        _require(isinstance(pts, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pts),
                 f"{where}: expected value.points as [[x%, y%], ...], got {str(pts)[:80]}")
        px = tuple((_number(x, f"{where} point") * ow / 100.0, _number(y, f"{where} point") * oh / 100.0) for x, y in pts)
        return LabeledRegion(**common, points_px=px)
    if rtype == RECTANGLE:
        nums = [_number(value.get(k), f"{where} value.{k}") for k in ("x", "y", "width", "height")]
        rot = _number(value.get("rotation", 0) or 0, f"{where} value.rotation")
        return LabeledRegion(**common, points_px=rectangle_corners_px(*nums, rot, size))
    rle = value.get("rle")
    _require(value.get("format", "rle") == "rle", f"{where}: expected value.format 'rle', got {value.get('format')!r}")
    _require(isinstance(rle, list) and rle and all(isinstance(v, int) and 0 <= v <= 255 for v in rle),
             f"{where}: expected value.rle as a list of bytes, got {str(rle)[:80]}")
    return LabeledRegion(**common, rle=tuple(rle))


def parse_result(result: Any, where: str) -> list[LabeledRegion]:
    """A Label Studio ``result`` list -> its region items, in order."""
    if result is None:
        return []
    _require(isinstance(result, list), f"{where}: expected a result list, got {type(result).__name__}")
    regions = [r for i, item in enumerate(result) if (r := parse_region(item, f"{where}[{i}]")) is not None]
    ids = [r.id for r in regions]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    _require(not dup, f"{where}: region ids must be unique, {dup} repeat")
    return regions


def vertex_changes(pred_px: Sequence[tuple[float, float]], final_px: Sequence[tuple[float, float]],
                   tolerance_px: float = VERTEX_TOLERANCE_PX) -> tuple[int, int, int]:
    """(added, removed, moved) vertices: kept vertices pair one to one within ``tolerance_px``;
    of the rest, as many as both sides have are moved, the surplus added or removed."""
    if not pred_px or not final_px:
        return len(final_px), len(pred_px), 0
    p = np.asarray(pred_px, dtype=float)
    f = np.asarray(final_px, dtype=float)
    dist = np.hypot(p[:, None, 0] - f[None, :, 0], p[:, None, 1] - f[None, :, 1])
    close = np.argwhere(dist <= tolerance_px)
    order = np.argsort(dist[close[:, 0], close[:, 1]], kind="stable")
    used_p: set[int] = set()
    used_f: set[int] = set()
    for i, j in close[order]:
        if i not in used_p and j not in used_f:
            used_p.add(int(i))
            used_f.add(int(j))
    left_p, left_f = len(p) - len(used_p), len(f) - len(used_f)
    moved = min(left_p, left_f)
    return left_f - moved, left_p - moved, moved


def geometry_equal(a: LabeledRegion, b: LabeledRegion, tolerance_px: float = VERTEX_TOLERANCE_PX) -> bool:
    if a.region_type != b.region_type or a.size_wh != b.size_wh:
        return False
    if a.region_type == BRUSH:
        return a.rle == b.rle or bool(np.array_equal(decode_brush_rle(a.rle, a.size_wh), decode_brush_rle(b.rle, b.size_wh)))
    if len(a.points_px) != len(b.points_px):
        return False
    pa, pb = np.asarray(a.points_px, float), np.asarray(b.points_px, float)
    return bool(len(pa) == 0 or np.hypot(*(pa - pb).T).max() <= tolerance_px)


# --- records -----------------------------------------------------------------------


@dataclass(frozen=True)
class RegionCorrection:
    """What happened to one region. ``pred_*`` describe the proposal, ``final_*`` the
    annotator's region; ``iou`` (0..1) is None unless both exist. Vertex counts are
    for polygons and rectangle corners (0 for brush); pixel counts for every type.
    ``pred_value`` / ``final_value`` are the Label Studio ``value`` objects verbatim."""

    kind: str
    region_type: str
    pred_region_id: str | None
    final_region_id: str | None
    label_from: str | None
    label_to: str | None
    iou: float | None
    geometry_changed: bool = False
    vertices_added: int = 0
    vertices_removed: int = 0
    vertices_moved: int = 0
    pixels_added: int = 0
    pixels_removed: int = 0
    match: str | None = None
    origin: str | None = None
    from_name: str = ""
    to_name: str = ""
    size_wh: tuple[int, int] = (0, 0)
    pred_score: float | None = None
    pred_embedding: tuple[float, ...] = ()
    pred_value: Mapping[str, Any] | None = None
    final_value: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        what = f"region correction {self.pred_region_id or self.final_region_id}"
        _require(self.kind in KINDS, f"{what}: kind expected one of {KINDS}, got {self.kind!r}")
        _require(self.region_type in REGION_TYPES, f"{what}: region_type expected one of {REGION_TYPES}, got {self.region_type!r}")
        has_pred, has_final = self.pred_region_id is not None, self.final_region_id is not None
        if self.kind == KIND_DELETED:
            _require(has_pred and not has_final, f"{what}: a deleted region has a predicted id and no final id")
        elif self.kind == KIND_ADDED:
            _require(has_final and not has_pred, f"{what}: an added region has a final id and no predicted id")
        else:
            _require(has_pred and has_final, f"{what}: an {self.kind} region needs both a predicted and a final id")
            _require(self.match in MATCHES, f"{what}: match expected one of {MATCHES}, got {self.match!r}")
            _require(self.iou is not None and 0.0 <= self.iou <= 1.0, f"{what}: iou expected in [0, 1], got {self.iou!r}")
        for name in ("vertices_added", "vertices_removed", "vertices_moved", "pixels_added", "pixels_removed"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, f"{what}: {name} expected a non-negative integer, got {v!r}")
        object.__setattr__(self, "size_wh", tuple(self.size_wh))
        object.__setattr__(self, "pred_embedding", tuple(float(v) for v in self.pred_embedding))

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["size_wh"] = list(self.size_wh)
        out["pred_embedding"] = list(self.pred_embedding)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RegionCorrection:
        _require(isinstance(data, Mapping), f"region correction: expected a JSON object, got {type(data).__name__}")
        return _build(cls, data, "region correction")


@dataclass(frozen=True)
class AnnotationCorrection:
    """One annotation version diffed against the prediction it started from.

    ``updated_at`` is Label Studio's timestamp text, kept as sent: together with
    ``annotation_id`` it identifies the version (the store keeps each version once).
    ``lead_time``: seconds the annotator spent (Label Studio's ``lead_time``).
    ``prediction_id`` is None when the annotation started from no prediction.
    """

    annotation_id: int
    task_id: int
    updated_at: str
    project: int | None = None
    lead_time: float | None = None
    prediction_id: int | None = None
    model_version: str = ""
    completed_by: int | None = None
    image: str = ""  # the task's image reference, as in the task data
    image_sha256: str = ""
    regions: tuple[RegionCorrection, ...] = ()

    def __post_init__(self) -> None:
        for name in ("annotation_id", "task_id"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool), f"annotation correction: {name} expected an integer id, got {v!r}")
        for name in ("project", "prediction_id", "completed_by"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and not isinstance(v, bool)), f"annotation correction: {name} expected an integer id or null, got {v!r}")
        _require(isinstance(self.updated_at, str) and self.updated_at != "", f"annotation correction: updated_at expected a timestamp, got {self.updated_at!r}")
        if self.lead_time is not None:
            object.__setattr__(self, "lead_time", _number(self.lead_time, "annotation correction lead_time"))
        regions = tuple(self.regions)
        _require(all(isinstance(r, RegionCorrection) for r in regions), "annotation correction: regions expected RegionCorrection items")
        object.__setattr__(self, "regions", regions)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.regions if r.kind == kind)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["regions"] = [r.to_json() for r in self.regions]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnnotationCorrection:
        _require(isinstance(data, Mapping), f"annotation correction: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        data["regions"] = tuple(RegionCorrection.from_json(r) for r in data.get("regions", ()))
        return _build(cls, data, "annotation correction")


def _build(cls, data: Mapping[str, Any], what: str):
    """``cls(**data)``, naming unknown and missing fields as a CorrectionError."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    _require(not unknown, f"{what}: unknown field(s) {unknown}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise CorrectionError(f"{what}: {exc}") from None


# --- the diff ------------------------------------------------------------------------


def _compatible(p: LabeledRegion, f: LabeledRegion) -> bool:
    return p.region_type == f.region_type and p.from_name == f.from_name and p.to_name == f.to_name


class _Rasters:
    """Masks computed once per region, on demand."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], RasterMask] = {}

    def get(self, side: str, r: LabeledRegion) -> RasterMask:
        key = (side, r.id)
        if key not in self._cache:
            self._cache[key] = r.raster()
        return self._cache[key]

    def iou(self, p: LabeledRegion, f: LabeledRegion) -> float:
        bp, bf = p.box_xyxy_px(), f.box_xyxy_px()
        if bp and bf and (bp[2] < bf[0] - 1 or bf[2] < bp[0] - 1 or bp[3] < bf[1] - 1 or bf[3] < bp[1] - 1):
            return 0.0  # boxes apart: no need to rasterise
        return mask_iou(self.get("pred", p), self.get("final", f))


def _greedy(pairs: list[tuple[float, int, int]], min_iou: float, strict: bool) -> list[tuple[int, int, float]]:
    """Pair (pred index, final index) by descending IoU; ``strict``: IoU must exceed ``min_iou``."""
    out = []
    used_p: set[int] = set()
    used_f: set[int] = set()
    for iou, i, j in sorted(pairs, key=lambda t: (-t[0], t[1], t[2])):
        if (iou > min_iou if strict else iou >= min_iou) and i not in used_p and j not in used_f:
            used_p.add(i)
            used_f.add(j)
            out.append((i, j, iou))
    return out


def diff_results(pred_result: Any, final_result: Any, *, extras: Mapping[str, RegionExtras] | None = None,
                 match_iou: float = DEFAULT_MATCH_IOU, tolerance_px: float = VERTEX_TOLERANCE_PX) -> list[RegionCorrection]:
    """Diff a prediction's ``result`` list against an annotation's ``result`` list.

    ``extras``: score and embedding per predicted region id (e.g. from the store's side
    table); they win over what the predicted items carry in ``meta``. Returns the
    predicted regions' records in prediction order, then the added regions in
    annotation order. Raises :class:`CorrectionError` for malformed region JSON.
    """
    _require(0.0 < match_iou <= 1.0, f"match_iou: expected in (0, 1], got {match_iou}")
    preds = parse_result(pred_result, "prediction result")
    finals = parse_result(final_result, "annotation result")
    raw_items = {str(it.get("id")): it for it in (pred_result or []) if isinstance(it, Mapping)}
    rasters = _Rasters()
    matched: dict[int, tuple[int, str]] = {}  # pred index -> (final index, how)
    free_p = set(range(len(preds)))
    free_f = set(range(len(finals)))

    def pair(i: int, j: int, how: str) -> None:
        matched[i] = (j, how)
        free_p.discard(i)
        free_f.discard(j)

    pred_by_id = {p.id: i for i, p in enumerate(preds)}
    for j, f in enumerate(finals):
        i = pred_by_id.get(f.id)
        if i is not None and i in free_p and _compatible(preds[i], f):
            pair(i, j, MATCH_ID)

    for j in sorted(free_f):
        f = finals[j]
        if f.origin == ORIGIN_PREDICTION:
            for i in sorted(free_p):
                p = preds[i]
                if _compatible(p, f) and set(p.labels) == set(f.labels) and geometry_equal(p, f, tolerance_px):
                    pair(i, j, MATCH_ORIGIN)
                    break
    changed = [j for j in sorted(free_f) if finals[j].origin in (ORIGIN_PREDICTION, ORIGIN_PREDICTION_CHANGED)]
    cands = [(rasters.iou(preds[i], finals[j]), i, j) for j in changed for i in sorted(free_p) if _compatible(preds[i], finals[j])]
    for i, j, _ in _greedy(cands, 0.0, strict=True):
        pair(i, j, MATCH_ORIGIN)

    cands = [(rasters.iou(preds[i], finals[j]), i, j) for j in sorted(free_f) for i in sorted(free_p) if _compatible(preds[i], finals[j])]
    for i, j, _ in _greedy(cands, match_iou, strict=False):
        pair(i, j, MATCH_IOU)

    out: list[RegionCorrection] = []
    for i, p in enumerate(preds):
        ext = (extras or {}).get(p.id) or region_extras(raw_items.get(p.id, {}))
        base = dict(region_type=p.region_type, pred_region_id=p.id, label_from=p.label, from_name=p.from_name,
                    to_name=p.to_name, size_wh=p.size_wh, pred_score=ext.score, pred_embedding=ext.embedding,
                    pred_value=dict(p.value))
        if i not in matched:
            out.append(RegionCorrection(kind=KIND_DELETED, final_region_id=None, label_to=None, iou=None,
                                        pixels_removed=rasters.get("pred", p).area, **base))
            continue
        j, how = matched[i]
        f = finals[j]
        same_geometry = geometry_equal(p, f, tolerance_px)
        if same_geometry:
            iou, added_px, removed_px = 1.0, 0, 0
        else:
            mp, mf = rasters.get("pred", p), rasters.get("final", f)
            inter = mask_intersection(mp, mf)
            union = mp.area + mf.area - inter
            iou = inter / union if union else 0.0
            added_px, removed_px = mf.area - inter, mp.area - inter
        v_added = v_removed = v_moved = 0
        if p.region_type != BRUSH and not same_geometry:
            v_added, v_removed, v_moved = vertex_changes(p.points_px, f.points_px, tolerance_px)
        if set(p.labels) != set(f.labels):
            kind = KIND_RELABELED
        else:
            kind = KIND_EDITED if not same_geometry else KIND_ACCEPTED
        out.append(RegionCorrection(kind=kind, final_region_id=f.id, label_to=f.label, iou=iou,
                                    geometry_changed=not same_geometry, vertices_added=v_added,
                                    vertices_removed=v_removed, vertices_moved=v_moved, pixels_added=added_px,
                                    pixels_removed=removed_px, match=how, origin=f.origin,
                                    final_value=dict(f.value), **base))
    for j in sorted(free_f):
        f = finals[j]
        out.append(RegionCorrection(kind=KIND_ADDED, region_type=f.region_type, pred_region_id=None, final_region_id=f.id,
                                    label_from=None, label_to=f.label, iou=None, origin=f.origin, from_name=f.from_name,
                                    to_name=f.to_name, size_wh=f.size_wh, pixels_added=rasters.get("final", f).area,
                                    final_value=dict(f.value)))
    return out


def _optional_id(value: Any) -> int | None:
    """An id Label Studio may send as an integer, digits or an object with an id; None otherwise."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _int_id(value: Any, what: str, required: bool = True) -> int | None:
    if isinstance(value, Mapping):  # Label Studio nests some references as objects with an id
        value = value.get("id")
    if value is None and not required:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    _require(isinstance(value, int) and not isinstance(value, bool), f"{what}: expected an integer id, got {value!r}")
    return value


def task_image_ref(task_data: Any) -> str:
    """The image reference in a task's ``data``: the ``image`` key, else the first
    value that looks like an image URL or Label Studio path; "" when none does."""
    if not isinstance(task_data, Mapping):
        return ""
    if isinstance(task_data.get("image"), str):
        return task_data["image"]
    prefixes = ("http://", "https://", "/data/", "s3://", "gs://", "azure-blob://", "file://")
    for v in task_data.values():
        if isinstance(v, str) and v.startswith(prefixes):
            return v
    return ""


def diff_annotation(annotation: Mapping[str, Any], prediction: Mapping[str, Any] | None, *, task: Mapping[str, Any] | None = None,
                    project: int | None = None, extras: Mapping[str, RegionExtras] | None = None,
                    match_iou: float = DEFAULT_MATCH_IOU) -> AnnotationCorrection:
    """Diff one Label Studio annotation object against the prediction object it started from.

    ``annotation``: as in the webhook payload (``id``, ``task``, ``result``,
    ``updated_at``, ``lead_time``, ``parent_prediction``...). ``prediction``: as
    ``GET /api/predictions/<id>/`` returns it (``id``, ``result``, ``model_version``),
    or None. ``task``: the payload's task object, for the image reference.
    """
    _require(isinstance(annotation, Mapping), f"annotation: expected a JSON object, got {type(annotation).__name__}")
    ann_id = _int_id(annotation.get("id"), "annotation id")
    task_id = _int_id(annotation.get("task") if annotation.get("task") is not None else (task or {}).get("id"), f"annotation {ann_id} task")
    updated_at = annotation.get("updated_at") or annotation.get("created_at")
    _require(isinstance(updated_at, str) and updated_at != "", f"annotation {ann_id}: expected updated_at or created_at, got {updated_at!r}")
    if project is None:
        project = _int_id(annotation.get("project"), f"annotation {ann_id} project", required=False)
    pred_result: list = []
    pred_id = model_version = None
    if prediction is not None:
        _require(isinstance(prediction, Mapping), f"prediction: expected a JSON object, got {type(prediction).__name__}")
        pred_result = prediction.get("result") or []
        pred_id = _int_id(prediction.get("id"), "prediction id", required=False)
        model_version = prediction.get("model_version")
    if pred_id is None:
        pred_id = _int_id(annotation.get("parent_prediction"), f"annotation {ann_id} parent_prediction", required=False)
    lead = annotation.get("lead_time")
    lead = float(lead) if isinstance(lead, (int, float)) and not isinstance(lead, bool) and math.isfinite(lead) else None
    regions = diff_results(pred_result, annotation.get("result") or [], extras=extras, match_iou=match_iou)
    return AnnotationCorrection(
        annotation_id=ann_id, task_id=task_id, updated_at=updated_at, project=project, lead_time=lead,
        prediction_id=pred_id, model_version=model_version if isinstance(model_version, str) else "",
        completed_by=_optional_id(annotation.get("completed_by")),
        image=task_image_ref((task or {}).get("data")), image_sha256=prediction_image_sha256(pred_result if isinstance(pred_result, list) else []),
        regions=tuple(regions),
    )


# --- exports for fine-tuning ------------------------------------------------------------


def _value_raster(region_type: str, value: Mapping[str, Any] | None, size_wh: tuple[int, int]) -> RasterMask | None:
    if value is None or size_wh[0] <= 0 or size_wh[1] <= 0:
        return None
    region = parse_region({"id": "r", "type": region_type, "value": value, "original_width": size_wh[0],
                           "original_height": size_wh[1]})
    return region.raster() if region is not None else None


def share_inside_final(deleted: RegionCorrection, corr: AnnotationCorrection) -> float:
    """How much of a deleted region's area lies inside the annotation's final regions (0..1).

    A deleted proposal mostly inside an object the annotator kept or drew was a
    duplicate, a part or an overlap of that object rather than something that is
    none of the labels.
    """
    mine = _value_raster(deleted.region_type, deleted.pred_value, deleted.size_wh)
    if mine is None or mine.area == 0:
        return 0.0
    inside = 0
    for r in corr.regions:
        if r.kind != KIND_DELETED and r.final_value is not None and r.region_type == deleted.region_type:
            final = _value_raster(r.region_type, r.final_value, r.size_wh)
            if final is not None:
                inside += mask_intersection(mine, final)
    return min(1.0, inside / mine.area)


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """Bool mask (h, w) -> uncompressed COCO RLE ``{"size": [h, w], "counts": [...]}``:
    column-major runs, the first one of zeros (possibly empty)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


@dataclass(frozen=True)
class FinalGeometry:
    """A final region in pixel terms: ``polygon_px`` (polygons, rectangle corners) or
    ``rle`` (brush, COCO RLE), its ``bbox_xywh_px`` and ``area_px`` (rasterised pixels)."""

    polygon_px: tuple[tuple[float, float], ...]
    rle: dict[str, Any] | None
    bbox_xywh_px: tuple[float, float, float, float]
    area_px: int


def final_geometry(r: RegionCorrection) -> FinalGeometry | None:
    """The annotator's geometry of a region correction; None for a deleted region."""
    if r.final_value is None or r.final_region_id is None:
        return None
    item = {"id": r.final_region_id, "type": r.region_type, "original_width": r.size_wh[0], "original_height": r.size_wh[1],
            "value": r.final_value}
    region = parse_region(item, "final region")
    assert region is not None  # region_type is one of REGION_TYPES
    if region.region_type == BRUSH:
        mask = decode_brush_rle(region.rle, region.size_wh)
        ys, xs = np.nonzero(mask)
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)) if xs.size else (0.0, 0.0, 0.0, 0.0)
        return FinalGeometry((), mask_to_coco_rle(mask), bbox, int(mask.sum()))
    x0, y0, x1, y1 = region.box_xyxy_px() or (0.0, 0.0, 0.0, 0.0)
    return FinalGeometry(region.points_px, None, (x0, y0, x1 - x0, y1 - y0), region.raster().area)


def correction_record(corr: AnnotationCorrection, with_embeddings: bool = False) -> dict[str, Any]:
    """One JSONL line of the fine-tuning export: the image, every region's final geometry
    and label, and the proposal it came from (deleted proposals included, as negatives)."""
    regions = []
    for r in corr.regions:
        geo = final_geometry(r)
        out: dict[str, Any] = {
            "kind": r.kind, "region_type": r.region_type, "label": r.label_to, "label_from": r.label_from,
            "pred_region_id": r.pred_region_id, "final_region_id": r.final_region_id, "match": r.match, "iou": r.iou,
            "pred_score": r.pred_score, "size_wh": list(r.size_wh),
            "polygon_px": [list(p) for p in geo.polygon_px] if geo and geo.polygon_px else None,
            "rle": geo.rle if geo else None,
            "bbox_xywh_px": list(geo.bbox_xywh_px) if geo else None,
            "area_px": geo.area_px if geo else None,
            "final_value": r.final_value, "pred_value": r.pred_value,
        }
        if with_embeddings:
            out["pred_embedding"] = list(r.pred_embedding)
        regions.append(out)
    return {
        "annotation_id": corr.annotation_id, "task_id": corr.task_id, "project": corr.project, "image": corr.image,
        "image_sha256": corr.image_sha256, "updated_at": corr.updated_at, "lead_time": corr.lead_time,
        "completed_by": corr.completed_by, "prediction_id": corr.prediction_id, "model_version": corr.model_version,
        "regions": regions,
    }


def corrections_to_coco(corrs: Iterable[AnnotationCorrection]) -> dict[str, Any]:
    """A COCO instance-segmentation document of the final regions (deleted proposals are
    not objects and are left out; the JSONL export keeps them).

    One image entry per annotation (``id`` = annotation id, ``file_name`` = the task's
    image reference), so two annotators of one task never mix. Polygons and rectangles
    are polygon segmentations in pixels; brush strokes are uncompressed COCO RLE.
    Each annotation's ``labelassist`` object says which proposal it came from.
    """
    images, annotations, labels = [], [], set()
    pending = []
    for corr in corrs:
        size = next((r.size_wh for r in corr.regions if r.size_wh != (0, 0)), (0, 0))
        images.append({"id": corr.annotation_id, "file_name": corr.image, "width": size[0], "height": size[1],
                       "labelassist": {"task_id": corr.task_id, "project": corr.project, "image_sha256": corr.image_sha256,
                                       "updated_at": corr.updated_at, "prediction_id": corr.prediction_id,
                                       "model_version": corr.model_version}})
        for r in corr.regions:
            if r.kind == KIND_DELETED or not r.label_to:
                continue
            geo = final_geometry(r)
            if geo is None:
                continue
            labels.add(r.label_to)
            pending.append((corr, r, geo))
    category_ids = {name: i + 1 for i, name in enumerate(sorted(labels))}
    for ann_id, (corr, r, geo) in enumerate(pending, start=1):
        seg: Any = geo.rle if geo.rle is not None else [[float(v) for p in geo.polygon_px for v in p]]
        annotations.append({
            "id": ann_id, "image_id": corr.annotation_id, "category_id": category_ids[r.label_to], "segmentation": seg,
            "area": geo.area_px, "bbox": list(geo.bbox_xywh_px), "iscrowd": 0,
            "labelassist": {"kind": r.kind, "region_type": r.region_type, "final_region_id": r.final_region_id,
                            "pred_region_id": r.pred_region_id, "label_from": r.label_from, "iou": r.iou,
                            "pred_score": r.pred_score, "match": r.match},
        })
    return {
        "info": {"description": "labelassist corrections: final regions and the proposals they came from"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in category_ids.items()],
    }
