"""Mask geometry: RLE, polygons for Label Studio, boxes and areas.

Conventions shared by every function here:

- A mask is a 2-D array, shape (H, W), of bool (or of 0/1 numbers), indexed ``[row, col]``.
- Pixel-corner coordinates: pixel ``(col, row)`` is the unit square ``[col, col + 1) x
  [row, row + 1)``, so the image spans ``[0, W] x [0, H]`` and a polygon around pixels
  2..11 has its corners at 2 and 12. A pixel belongs to a polygon when its centre
  ``(col + 0.5, row + 0.5)`` is inside (even-odd rule; a centre on a left or top edge is
  inside, on a right or bottom edge outside). Under this rule a polygon traced along the
  pixel edges rasterises back to exactly its mask. ``cv2.fillPoly`` is not used for it:
  it also fills every pixel an edge touches, which grows such a polygon by one pixel on
  the right and bottom.
- Percent coordinates (``_pct``) are Label Studio's: ``x / W * 100`` and ``y / H * 100``
  of those same corner coordinates, so 0 and 100 are the image borders.
- RLE is COCO's uncompressed form, ``{"size": [h, w], "counts": [...]}``: run lengths of
  the column-major (Fortran order) pixel sequence, alternating zeros and ones and always
  starting with zeros (a leading 0 when the first pixel is set).

OpenCV is imported inside the functions that need it and torch inside
``masks_to_rle_torch``, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from labelassist.workers.contract import DEFAULT_MAX_VERTICES, DEFAULT_MIN_POLYGON_AREA_PX
from labelassist.workers.errors import ContractError

HOLE_POLICIES = ("bridge", "fill")

# The traced outline passes no closer than sqrt(2)/4 ~ 0.354 px to any pixel centre (its
# diagonal cuts at pixel corners are the closest), so dropping points that lie within
# 0.3 px of the simplified outline moves no centre across it: the search starts lossless,
# shedding only the staircase points.
START_TOLERANCE_PX = 0.3
# Halvings of the tolerance interval; 2**-24 of the component's size is far below a pixel.
TOLERANCE_SEARCH_STEPS = 24
# Holes may use at most this share of the vertex budget, counted at their smallest (a
# triangle plus the two slit vertices), so a mask riddled with holes still gets an outline.
MAX_HOLE_BUDGET_SHARE = 0.5
_MIN_VERTICES_PER_BRIDGED_HOLE = 5


@dataclass(frozen=True, eq=False)
class Polygon:
    """One Label Studio polygon: a single closed ring, no holes.

    ``points_xy_px``: (K, 2) float32, K >= 3, pixel-corner coordinates, read-only; the
    ring closes by itself (the last point is not a repeat of the first).
    ``iou``: IoU of this polygon, rasterised, with the connected component it was traced
    from, in [0, 1]; what the vertex budget and hole policy cost. None when the caller
    did not ask for it (``mask_to_polygons_px(measure_iou=False)``).
    """

    points_xy_px: np.ndarray
    iou: float | None

    def __post_init__(self) -> None:
        points = _points_xy(self.points_xy_px, "polygon points_xy_px").astype(np.float32)
        points.setflags(write=False)
        object.__setattr__(self, "points_xy_px", points)
        iou = self.iou
        if iou is None:
            return
        if isinstance(iou, bool) or not isinstance(iou, (int, float, np.floating, np.integer)) or not 0.0 <= float(iou) <= 1.0:
            raise ContractError(f"polygon iou: expected a number in [0, 1], got {iou!r}")
        object.__setattr__(self, "iou", float(iou))


# ---------------------------------------------------------------------------- validation


def _mask_2d(mask: Any, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a bool (H, W) array, or raise ContractError saying what is wrong."""
    if isinstance(mask, np.ndarray):
        arr = mask
    else:
        try:
            arr = np.asarray(mask)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{name}: expected a 2-D (H, W) array, got {type(mask).__name__} ({exc})") from None
    if arr.ndim != 2:
        raise ContractError(f"{name}: expected a 2-D (H, W) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ContractError(f"{name}: expected a non-empty (H, W) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
        raise ContractError(f"{name}: expected a bool array or 0/1 values, got dtype {arr.dtype} with values outside {{0, 1}}")
    return arr.astype(bool)


def _points_xy(points: Any, name: str, min_points: int = 3) -> np.ndarray:
    """Return ``points`` (or a Polygon's points) as a finite float64 (K, 2) array."""
    if isinstance(points, Polygon):
        points = points.points_xy_px
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ContractError(f"{name}: expected (K, 2) numeric x, y points, got {type(points).__name__}") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < min_points:
        raise ContractError(f"{name}: expected shape (K, 2) with K >= {min_points}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ContractError(f"{name}: expected finite coordinates, got NaN or infinity")
    return arr


def _positive_pair(value: Any, name: str, what: str) -> tuple[float, float]:
    try:
        a, b = value
        ok = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in (a, b))
    except (TypeError, ValueError):
        ok = False
    if not ok or not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ContractError(f"{name}: expected {what} as two positive numbers, got {value!r}")
    return float(a), float(b)


def _size_hw(size_hw: Any) -> tuple[int, int]:
    h, w = _positive_pair(size_hw, "size_hw", "(height, width) in pixels")
    if not (h.is_integer() and w.is_integer()):
        raise ContractError(f"size_hw: expected whole pixel counts, got {size_hw!r}")
    return int(h), int(w)


def _int_at_least(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ContractError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- RLE


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a bool (H, W) mask as uncompressed COCO RLE ``{"size": [H, W], "counts": [...]}``.

    Counts are Python ints, column-major runs starting with zeros.
    """
    m = _mask_2d(mask)
    h, w = m.shape
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [int(h), int(w)], "counts": counts.tolist()}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode uncompressed COCO RLE into a bool (H, W) mask; raise ContractError on malformed RLE."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        got = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise ContractError(f"rle: expected a dict with 'size' and 'counts', got {got}")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ContractError(f"rle size: expected [h, w] with two positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        raise ContractError("rle counts: expected a list of run lengths (uncompressed RLE), got a string (compressed COCO RLE)")
    try:
        runs = np.asarray(counts)
    except (TypeError, ValueError):
        raise ContractError(f"rle counts: expected a flat list of integers, got {type(counts).__name__}") from None
    if runs.ndim != 1 or runs.size == 0 or runs.dtype.kind not in "iu":
        raise ContractError(f"rle counts: expected a non-empty flat list of integers, got shape {runs.shape} of {runs.dtype}")
    if (runs < 0).any():
        raise ContractError(f"rle counts: expected non-negative run lengths, got {int(runs.min())}")
    total = int(runs.sum())
    if total != h * w:
        raise ContractError(f"rle counts: expected runs summing to h*w = {h}*{w} = {h * w}, got {total}")
    values = (np.arange(runs.size) % 2).astype(bool)
    return np.repeat(values, runs).reshape(w, h).T.copy()


def masks_to_rle_torch(masks) -> list[dict]:
    """Encode a torch bool (N, H, W) batch, on any device, as N RLE dicts equal to ``mask_to_rle``'s.

    The run boundaries of the whole batch are found on the device and come to the host in
    one copy: a copy per mask would sync the device N times.
    """
    import torch

    if not isinstance(masks, torch.Tensor):
        raise ContractError(f"masks: expected a torch.Tensor (N, H, W), got {type(masks).__name__}")
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ContractError(f"masks: expected a torch.bool tensor of shape (N, H, W), got {masks.dtype} of shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    if h * w == 0:
        raise ContractError(f"masks: expected non-empty (H, W) masks, got shape {tuple(masks.shape)}")
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)  # column-major per mask
    change = (flat[:, 1:] != flat[:, :-1]).nonzero()  # (K, 2): mask index, position before the change
    packed = torch.cat([flat[:, 0].to(torch.int64), change[:, 0], change[:, 1] + 1]).cpu().numpy()
    first_set = packed[:n].astype(bool)
    k = change.shape[0]
    which, starts = packed[n:n + k], packed[n + k:]
    lo = np.searchsorted(which, np.arange(n), side="left")
    hi = np.searchsorted(which, np.arange(n), side="right")
    out = []
    for i in range(n):
        counts = np.diff(np.concatenate(([0], starts[lo[i]:hi[i]], [h * w])))
        if first_set[i]:
            counts = np.concatenate(([0], counts))
        out.append({"size": [int(h), int(w)], "counts": counts.tolist()})
    return out


# ---------------------------------------------------------------------------- boxes and areas


def area_px(mask: np.ndarray) -> int:
    """Number of set pixels of a bool (H, W) mask."""
    return int(np.count_nonzero(_mask_2d(mask)))


def bbox_xywh_px(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a bool (H, W) mask as (x, y, w, h) in pixel-corner coordinates.

    ``w`` and ``h`` count pixels inclusively (a single pixel is 1 x 1), so the box spans
    ``[x, x + w] x [y, y + h]``. An empty mask gives (0, 0, 0, 0).
    """
    m = _mask_2d(mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    cols = np.flatnonzero(m.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


# ---------------------------------------------------------------------------- polygons


def polygon_px_to_pct(points_xy_px: np.ndarray, size_wh: tuple[float, float]) -> list[list[float]]:
    """Pixel-corner (K, 2) points to Label Studio's ``[[x%, y%], ...]``, clamped to [0, 100]."""
    points = _points_xy(points_xy_px, "points_xy_px", min_points=1)
    w, h = _positive_pair(size_wh, "size_wh", "(width, height) in pixels")
    pct = np.clip(points / np.array([w, h]) * 100.0, 0.0, 100.0)
    return pct.tolist()


def polygon_pct_to_px(points_xy_pct: Any, size_wh: tuple[float, float]) -> np.ndarray:
    """Label Studio ``[[x%, y%], ...]`` to pixel-corner points, (K, 2) float32 (not clamped)."""
    points = _points_xy(points_xy_pct, "points_xy_pct", min_points=1)
    w, h = _positive_pair(size_wh, "size_wh", "(width, height) in pixels")
    return (points * np.array([w, h]) / 100.0).astype(np.float32)


def rasterize_polygons_px(polygons: Sequence[Any], size_hw: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons into a bool (H, W) mask, the union of each polygon's even-odd fill.

    ``polygons``: (K, 2) pixel-corner point arrays (K >= 3) or Polygon objects. A pixel is
    set when its centre is inside (see the module docstring); parts outside the image
    are clipped.
    """
    h, w = _size_hw(size_hw)
    rows_all, xs_all, ids_all = [], [], []
    for k, poly in enumerate(polygons):
        p = _points_xy(poly, f"polygons[{k}]")
        q = np.roll(p, -1, axis=0)
        y_lo, y_hi = np.minimum(p[:, 1], q[:, 1]), np.maximum(p[:, 1], q[:, 1])
        # Half-open in y, so a vertex on a scanline is crossed once, not twice or never.
        first = np.clip(np.ceil(y_lo - 0.5), 0, h).astype(np.int64)
        stop = np.clip(np.ceil(y_hi - 0.5), 0, h).astype(np.int64)
        n_rows = np.maximum(stop - first, 0)
        total = int(n_rows.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(p)), n_rows)
        offset = np.arange(total) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
        rows = first[edge] + offset
        x0, y0, x1, y1 = p[edge, 0], p[edge, 1], q[edge, 0], q[edge, 1]
        xs = x0 + (rows + 0.5 - y0) * (x1 - x0) / (y1 - y0)  # y1 != y0: flat edges span no rows
        rows_all.append(rows)
        xs_all.append(xs)
        ids_all.append(np.full(total, k))
    if not rows_all:
        return np.zeros((h, w), dtype=bool)
    rows, xs, ids = np.concatenate(rows_all), np.concatenate(xs_all), np.concatenate(ids_all)
    order = np.lexsort((xs, rows, ids))
    # Every (polygon, row) holds an even number of crossings, so consecutive pairs are spans.
    rows, xs = rows[order][0::2], xs[order]
    start = np.clip(np.ceil(xs[0::2] - 0.5), 0, w).astype(np.int64)
    stop = np.clip(np.ceil(xs[1::2] - 0.5), 0, w).astype(np.int64)
    keep = stop > start
    rows, start, stop = rows[keep], start[keep], stop[keep]
    cells = h * (w + 1)
    delta = np.bincount(rows * (w + 1) + start, minlength=cells) - np.bincount(rows * (w + 1) + stop, minlength=cells)
    return np.cumsum(delta.reshape(h, w + 1)[:, :w], axis=1) > 0


def polygons_iou(polygons: Sequence[Any], mask: np.ndarray) -> float:
    """IoU of the rasterised ``polygons`` (union) with a bool (H, W) mask; 0.0 when both are empty.

    Only the box around the mask and the polygons is rasterised: a region is
    usually a small part of its image, and nothing outside that box can count.
    """
    m = _mask_2d(mask)
    h, w = m.shape
    points = [_points_xy(p, f"polygons[{k}]") for k, p in enumerate(polygons)]
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    x0, y0, x1, y1 = w, h, 0, 0
    if len(rows):
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    for p in points:
        x0, y0 = min(x0, int(np.floor(p[:, 0].min()))), min(y0, int(np.floor(p[:, 1].min())))
        x1, y1 = max(x1, int(np.ceil(p[:, 0].max()))), max(y1, int(np.ceil(p[:, 1].max())))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    offset = np.array([x0, y0], dtype=np.float32)
    r = rasterize_polygons_px([p - offset for p in points], (y1 - y0, x1 - x0))
    crop = m[y0:y1, x0:x1]
    union = int(np.count_nonzero(r | crop))
    return int(np.count_nonzero(r & crop)) / union if union else 0.0


def mask_to_polygons_px(
    mask: np.ndarray,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    min_area_px: int = DEFAULT_MIN_POLYGON_AREA_PX,
    holes: str = "bridge",
    measure_iou: bool = True,
) -> list[Polygon]:
    """Trace a bool (H, W) mask into Label Studio polygons, one per connected component.

    Components are 8-connected (as ``cv2.findContours`` sees them); those with fewer
    than ``min_area_px`` pixels are dropped. Polygons come largest component first, each
    a single ring in pixel-corner coordinates, running clockwise on screen.

    Hole policy (a Label Studio polygon is one ring and cannot have holes):
    ``"bridge"`` cuts each hole into the outer ring along a zero-width slit (out to the
    hole's nearest vertex, around the hole the other way, back along the same segment),
    so the one ring excludes the hole under both the even-odd and the non-zero fill rule.
    Holes smaller than ``min_area_px`` are filled, and so are the smallest holes beyond
    what ``MAX_HOLE_BUDGET_SHARE`` of the vertex budget allows. ``"fill"`` keeps the
    outer ring only. Anything inside a hole is its own component and polygon.

    Vertex budget: each polygon has 3 to ``max_vertices`` points (slit vertices
    included). The outline is traced along pixel edges, simplified with
    ``cv2.approxPolyDP`` at ``START_TOLERANCE_PX`` (lossless) and, when that is over
    budget, at the smallest tolerance found by binary search that meets it. Each
    polygon's ``iou`` is measured, not estimated, unless ``measure_iou`` is False (a
    caller that measures the whole mask's IoU once saves a rasterisation per component).
    """
    import cv2

    m = _mask_2d(mask)
    max_vertices = _int_at_least(max_vertices, "max_vertices", 3)
    min_area_px = _int_at_least(min_area_px, "min_area_px", 0)
    if holes not in HOLE_POLICIES:
        raise ContractError(f"holes: expected one of {list(HOLE_POLICIES)}, got {holes!r}")
    max_holes = 0 if holes == "fill" else int(max_vertices * MAX_HOLE_BUDGET_SHARE) // _MIN_VERTICES_PER_BRIDGED_HOLE

    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = [i + 1 for i in sorted(range(n - 1), key=lambda i: (-areas[i], i)) if areas[i] >= min_area_px]
    polygons = []
    for label in order:
        x, y, w, h = (int(v) for v in stats[label, :4])
        component = labels[y:y + h, x:x + w] == label
        ring = _component_ring(component, max_vertices, min_area_px, max_holes)
        iou = polygons_iou([ring], component) if measure_iou else None
        polygons.append(Polygon(points_xy_px=ring + np.array([x, y], dtype=np.float32), iou=iou))
    return polygons


def _component_ring(component: np.ndarray, max_vertices: int, min_hole_area_px: int, max_holes: int) -> np.ndarray:
    """One ring, (K, 2) float32 in the component's own pixel-corner frame, for one 8-connected component."""
    import cv2

    # A one-pixel empty margin keeps the outline off the array border, whatever the mask touches.
    padded = np.pad(component, 1)
    n, hole_labels, hole_stats, _ = cv2.connectedComponentsWithStats((~padded).astype(np.uint8), connectivity=4)
    outside = hole_labels[0, 0]
    hole_ids = sorted((k for k in range(1, n) if k != outside), key=lambda k: -hole_stats[k, cv2.CC_STAT_AREA])
    kept = [k for k in hole_ids if hole_stats[k, cv2.CC_STAT_AREA] >= min_hole_area_px][:max_holes]
    solid = padded | np.isin(hole_labels, [k for k in hole_ids if k not in kept])

    outer, hole_rings = _trace_pixel_edges(solid)
    outer -= 1.0  # undo the margin
    hole_rings = [r - 1.0 for r in hole_rings]

    def simplify(eps: float) -> tuple[np.ndarray, list[np.ndarray]]:
        o = cv2.approxPolyDP(outer.reshape(-1, 1, 2), eps, True).reshape(-1, 2)
        hs = [s for s in (cv2.approxPolyDP(r.reshape(-1, 1, 2), eps, True).reshape(-1, 2) for r in hole_rings) if len(s) >= 3]
        return o, hs

    def n_points(o: np.ndarray, hs: list[np.ndarray]) -> int:
        return len(o) + sum(len(s) + 2 for s in hs)

    o, hs = simplify(START_TOLERANCE_PX)
    if n_points(o, hs) > max_vertices:
        # Point counts only fall as the tolerance grows (Douglas-Peucker keeps a subset), and
        # a tolerance of the component's whole extent leaves at most two points, so bisect.
        lo, hi = START_TOLERANCE_PX, float(max(component.shape)) + 1.0
        for _ in range(TOLERANCE_SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            if n_points(*simplify(mid)) <= max_vertices:
                hi = mid
            else:
                lo = mid
        o, hs = simplify(hi)
    if len(o) < 3:
        # The tolerance that meets a tiny budget collapsed the outline to a segment.
        return _widest_triangle(outer)
    return _bridge(o, hs)


def _trace_pixel_edges(solid: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Outer ring and hole rings of one 8-connected bool component (zero border), along pixel edges.

    findContours follows pixel centres, which would shrink the outline by half a pixel;
    tracing a lattice twice as fine, where each pixel becomes its closed 3x3 block of
    corners, edge midpoints and centre, puts the outline on the pixel edges. Returns
    float32 (K, 2) rings in pixel-corner coordinates.
    """
    import cv2

    h, w = solid.shape
    lattice = np.zeros((2 * h + 1, 2 * w + 1), dtype=np.uint8)
    lattice[1::2, 1::2] = solid
    lattice = cv2.dilate(lattice, np.ones((3, 3), dtype=np.uint8))
    contours, hierarchy = cv2.findContours(lattice, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings = [c.reshape(-1, 2).astype(np.float32) / 2.0 for c in contours]
    outer_ids = [i for i in range(len(rings)) if hierarchy[0, i, 3] < 0]
    # One component has one outer ring; the largest is taken should that ever not hold.
    top = max(outer_ids, key=lambda i: abs(_signed_area(rings[i])))
    return rings[top], [rings[i] for i in range(len(rings)) if hierarchy[0, i, 3] == top]


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a (K, 2) ring; positive when clockwise on screen (y pointing down)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _bridge(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Splice hole rings into the outer ring along zero-width slits; (K, 2) float32."""
    ring = outer if _signed_area(outer) > 0 else outer[::-1]
    # Holes run against the outer ring so the non-zero rule (the HTML canvas default, which
    # Label Studio draws with) also leaves them empty; even-odd does regardless.
    for hole in sorted(holes, key=lambda s: -abs(_signed_area(s))):
        hole = hole if _signed_area(hole) < 0 else hole[::-1]
        d = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        around = np.roll(hole, -j, axis=0)
        ring = np.concatenate([ring[:i + 1], around, around[:1], ring[i:]])
    return np.ascontiguousarray(ring, dtype=np.float32)


def _widest_triangle(ring: np.ndarray) -> np.ndarray:
    """A triangle on the ring's points: the top-left-most one, the one farthest from it, and the one farthest from that chord."""
    a = ring[np.argmin(ring[:, 0] + ring[:, 1])]
    b = ring[np.argmax(((ring - a) ** 2).sum(axis=1))]
    ab = b - a
    c = ring[np.argmax(np.abs(ab[0] * (ring[:, 1] - a[1]) - ab[1] * (ring[:, 0] - a[0])))]
    tri = np.stack([a, b, c]).astype(np.float32)
    return tri if _signed_area(tri) > 0 else tri[::-1].copy()
