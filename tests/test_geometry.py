"""Mask geometry: RLE round trips, polygon tracing under a vertex budget, conversions.

Fast paths are checked against straightforward references written here: a per-pixel
ray-casting rasteriser (even-odd and non-zero winding) and per-mask numpy RLE.
"""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from labelassist.workers import geometry as g
from labelassist.workers.errors import ContractError


def _m(*rows: str) -> np.ndarray:
    """A bool mask from rows of '#' (set) and '.' (unset)."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def _box(shape, rows, cols) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _disk(shape, center_rc, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center_rc[0]) ** 2 + (xx - center_rc[1]) ** 2 < radius**2


def _reference_raster(polygons, size_hw, rule="evenodd") -> np.ndarray:
    """Union of polygons, one pixel centre at a time: a ray to the right counts edge crossings."""
    h, w = size_hw
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((h, w), dtype=bool)
    for poly in polygons:
        p = np.asarray(getattr(poly, "points_xy_px", poly), dtype=np.float64)
        winding = np.zeros((h, w), dtype=np.int64)
        for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
            if y0 == y1:
                continue
            spans = (np.minimum(y0, y1) <= ys) & (ys < np.maximum(y0, y1))
            crossing_x = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
            winding += np.where(spans & (crossing_x > xs), 1 if y1 > y0 else -1, 0)
        out |= (winding % 2 == 1) if rule == "evenodd" else (winding != 0)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


RING_5 = _m(
    "#####",
    "#...#",
    "#...#",
    "#...#",
    "#####",
)
RING_5_FILLED = np.ones((5, 5), dtype=bool)
RING_WITH_ISLAND = _m(
    "#######",
    "#.....#",
    "#.....#",
    "#..#..#",
    "#.....#",
    "#.....#",
    "#######",
)
TWO_HOLES = _m(
    "#######",
    "#..#..#",
    "#..#..#",
    "#######",
)
CHECKERBOARD = np.indices((5, 5)).sum(axis=0) % 2 == 0
SEVERAL = _m(
    "##....#",
    "##.....",
    ".......",
    "....###",
    "....###",
)


# Each row: mask, keyword arguments, expected polygon IoUs (largest component first),
# and the mask the polygons must rasterise back to exactly.
POLYGON_CASES = [
    pytest.param(_box((14, 14), (2, 12), (2, 12)), {}, [1.0], _box((14, 14), (2, 12), (2, 12)), id="square"),
    pytest.param(_m("...", ".#.", "..."), {"min_area_px": 1}, [1.0], _m("...", ".#.", "..."), id="single-pixel"),
    pytest.param(_m("#..", "#..", "###"), {"min_area_px": 1}, [1.0], _m("#..", "#..", "###"), id="l-shape"),
    pytest.param(np.ones((3, 4), bool), {"min_area_px": 1}, [1.0], np.ones((3, 4), bool), id="whole-image"),
    pytest.param(_m("##..", "##..", "....", "...."), {"min_area_px": 1}, [1.0], _m("##..", "##..", "....", "...."), id="top-left-corner"),
    pytest.param(_m("....", "....", "..##", "..##"), {"min_area_px": 1}, [1.0], _m("....", "....", "..##", "..##"), id="bottom-right-corner"),
    pytest.param(_m("#...#", ".....", "#...#"), {"min_area_px": 1}, [1.0] * 4, _m("#...#", ".....", "#...#"), id="every-corner"),
    pytest.param(_m(".##.", "....", "#..#", "#..#", "....", ".##."), {"min_area_px": 1}, [1.0] * 4,
                 _m(".##.", "....", "#..#", "#..#", "....", ".##."), id="every-edge"),
    pytest.param(_m("#####"), {"min_area_px": 1}, [1.0], _m("#####"), id="horizontal-line"),
    pytest.param(_m("#", "#", "#", "#"), {"min_area_px": 1}, [1.0], _m("#", "#", "#", "#"), id="vertical-line"),
    pytest.param(np.eye(6, dtype=bool), {"min_area_px": 1}, [1.0], np.eye(6, dtype=bool), id="diagonal-line"),
    pytest.param(np.eye(6, dtype=bool)[::-1], {"min_area_px": 1}, [1.0], np.eye(6, dtype=bool)[::-1], id="anti-diagonal-line"),
    pytest.param(_m("##..", "##..", "..##", "..##"), {"min_area_px": 1}, [1.0], _m("##..", "##..", "..##", "..##"),
                 id="corner-touching-blocks-are-one-component"),
    pytest.param(SEVERAL, {"min_area_px": 2}, [1.0, 1.0], _m("##.....", "##.....", ".......", "....###", "....###"),
                 id="several-components-small-one-dropped"),
    pytest.param(RING_5, {"min_area_px": 1}, [1.0], RING_5, id="ring-bridge"),
    pytest.param(RING_5, {"min_area_px": 1, "holes": "fill"}, [16 / 25], RING_5_FILLED, id="ring-fill"),
    pytest.param(RING_5, {"min_area_px": 10}, [16 / 25], RING_5_FILLED, id="ring-bridge-hole-below-min-area-filled"),
    pytest.param(RING_WITH_ISLAND, {"min_area_px": 1}, [1.0, 1.0], RING_WITH_ISLAND, id="island-in-hole"),
    pytest.param(TWO_HOLES, {"min_area_px": 1}, [1.0], TWO_HOLES, id="two-holes"),
    pytest.param(CHECKERBOARD, {"min_area_px": 1, "max_vertices": 1000}, [1.0], CHECKERBOARD, id="checkerboard-many-holes"),
    pytest.param(RING_5, {"min_area_px": 1, "max_vertices": 8}, [16 / 25], RING_5_FILLED, id="hole-filled-to-meet-budget"),
    pytest.param(np.zeros((4, 4), bool), {}, [], np.zeros((4, 4), bool), id="empty"),
]


@pytest.mark.parametrize("mask, kwargs, ious, raster", POLYGON_CASES)
def test_polygons_trace_components(mask, kwargs, ious, raster):
    polygons = g.mask_to_polygons_px(mask, **kwargs)
    assert [p.iou for p in polygons] == pytest.approx(ious)
    np.testing.assert_array_equal(g.rasterize_polygons_px(polygons, mask.shape), raster)
    np.testing.assert_array_equal(_reference_raster(polygons, mask.shape), raster)
    for p in polygons:
        assert p.points_xy_px.dtype == np.float32 and p.points_xy_px.ndim == 2 and p.points_xy_px.shape[1] == 2
        assert 3 <= len(p.points_xy_px) <= kwargs.get("max_vertices", g.DEFAULT_MAX_VERTICES)
        assert ((p.points_xy_px >= 0) & (p.points_xy_px <= np.array(mask.shape[::-1]))).all()
        x, y = p.points_xy_px[:, 0].astype(np.float64), p.points_xy_px[:, 1].astype(np.float64)
        assert np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y) > 0  # clockwise on screen


def test_square_corners_sit_on_pixel_corners():
    mask = _box((14, 14), (2, 12), (2, 12))
    (polygon,) = g.mask_to_polygons_px(mask)
    assert sorted(map(tuple, polygon.points_xy_px.tolist())) == [(2, 2), (2, 12), (12, 2), (12, 12)]
    assert polygon.iou == 1.0
    assert g.polygons_iou([polygon.points_xy_px], mask) == 1.0


@pytest.mark.parametrize("rule", ["evenodd", "nonzero"])
def test_bridged_ring_excludes_the_hole_under_both_fill_rules(rule):
    ring = _disk((50, 50), (25, 25), 20) & ~_disk((50, 50), (25, 25), 8)
    (bridged,) = g.mask_to_polygons_px(ring, holes="bridge")
    (filled,) = g.mask_to_polygons_px(ring, holes="fill")
    assert len(bridged.points_xy_px) <= g.DEFAULT_MAX_VERTICES
    raster = _reference_raster([bridged], ring.shape, rule)
    assert not raster[20:31, 20:31].any()  # the hole's middle
    assert _iou(raster, ring) == pytest.approx(bridged.iou) and bridged.iou > 0.95
    assert _reference_raster([filled], ring.shape, rule)[20:31, 20:31].all()
    assert filled.iou == pytest.approx(ring.sum() / _disk((50, 50), (25, 25), 20).sum(), abs=0.02)


def _noisy_blob() -> np.ndarray:
    rng = np.random.default_rng(7)
    return _disk((120, 120), (60, 55), 45) ^ (rng.random((120, 120)) < 0.03)


@pytest.mark.parametrize(
    "max_vertices, min_iou",
    # The noise leaves 1-pixel holes that are filled, so no budget reaches 1.0.
    [(3, 0.3), (4, 0.6), (8, 0.85), (12, 0.9), (64, 0.95), (10000, 0.96)],
)
def test_vertex_budget_is_met_and_iou_is_truthful(max_vertices, min_iou):
    blob = _noisy_blob()
    polygons = g.mask_to_polygons_px(blob, max_vertices=max_vertices)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(blob.astype(np.uint8), connectivity=8)
    assert len(polygons) == int((stats[1:, cv2.CC_STAT_AREA] >= g.DEFAULT_MIN_POLYGON_AREA_PX).sum())
    for polygon in polygons:
        assert 3 <= len(polygon.points_xy_px) <= max_vertices
        raster = _reference_raster([polygon], blob.shape)
        # The polygon's own component is the one it overlaps most.
        component = labels == np.bincount(labels[raster & blob]).argmax()
        assert polygon.iou == pytest.approx(_iou(raster, component), abs=1e-12)
    assert polygons[0].iou >= min_iou


def test_random_masks_trace_exactly_with_an_unlimited_budget():
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = rng.integers(1, 13, size=2)
        mask = rng.random((h, w)) < rng.random()
        polygons = g.mask_to_polygons_px(mask, max_vertices=10000, min_area_px=0)
        np.testing.assert_array_equal(g.rasterize_polygons_px(polygons, mask.shape), mask)
        assert all(p.iou == 1.0 for p in polygons)


def test_rasteriser_matches_reference_on_random_polygons():
    rng = np.random.default_rng(5)
    for _ in range(40):
        polygons = [rng.uniform(-3, 19, size=(rng.integers(3, 9), 2)) for _ in range(rng.integers(1, 3))]
        if rng.random() < 0.5:  # vertices on the half-pixel lattice hit the tie rules
            polygons = [np.round(p * 2) / 2 for p in polygons]
        np.testing.assert_array_equal(g.rasterize_polygons_px(polygons, (13, 16)), _reference_raster(polygons, (13, 16)))


@pytest.mark.parametrize(
    "polygons, size_hw, expected",
    [
        ([[[0, 0], [1, 0], [1, 1], [0, 1]]], (2, 2), _m("#.", "..")),
        ([[[1, 0], [2, 0], [2, 2], [1, 2]]], (2, 3), _m(".#.", ".#.")),
        ([[[-5, -5], [10, -5], [10, 10], [-5, 10]]], (2, 3), np.ones((2, 3), bool)),
        ([[[0, 0], [1, 0], [1, 1], [0, 1]], [[2, 1], [3, 1], [3, 2], [2, 2]]], (2, 3), _m("#..", "..#")),
        ([[[0.1, 0.1], [0.4, 0.1], [0.4, 0.4]]], (2, 2), np.zeros((2, 2), bool)),
        ([[[5, 5], [6, 5], [6, 6]]], (2, 2), np.zeros((2, 2), bool)),
    ],
    ids=["unit-square", "column", "clipped", "two-polygons", "misses-every-centre", "outside"],
)
def test_rasterize_polygons_px(polygons, size_hw, expected):
    np.testing.assert_array_equal(g.rasterize_polygons_px([np.array(p) for p in polygons], size_hw), expected)


@pytest.mark.parametrize(
    "polygons, mask, iou",
    [
        ([[[0, 0], [2, 0], [2, 1], [0, 1]]], _m("##", ".."), 1.0),
        ([[[0, 0], [1, 0], [1, 1], [0, 1]]], _m("##", ".."), 0.5),
        ([[[0, 0], [1, 0], [1, 1], [0, 1]]], _m("..", ".#"), 0.0),
        ([[[5, 5], [6, 5], [6, 6]]], _m("..", ".."), 0.0),
    ],
    ids=["equal", "half", "disjoint", "both-empty"],
)
def test_polygons_iou(polygons, mask, iou):
    assert g.polygons_iou([np.array(p) for p in polygons], mask) == iou


RLE_CASES = [
    (_m("..", ".."), [4]),
    (_m("##", "##"), [0, 4]),
    (_m(".#", "##"), [1, 3]),
    (_m("#.", ".."), [0, 1, 3]),
    (_m("#.", "#."), [0, 2, 2]),  # column-major: the first column is read first
    (_m("##", ".."), [0, 1, 1, 1, 1]),
    (_m("##."), [0, 2, 1]),
    (_m("#", ".", "#"), [0, 1, 1, 1]),
    (_m("."), [1]),
    (_m("#"), [0, 1]),
    (np.array([[0, 1], [1, 0]], dtype=np.uint8), [1, 2, 1]),
]


@pytest.mark.parametrize("mask, counts", RLE_CASES)
def test_rle_literals(mask, counts):
    rle = g.mask_to_rle(mask)
    assert rle == {"size": list(mask.shape), "counts": counts}
    assert all(type(c) is int for c in rle["counts"])
    np.testing.assert_array_equal(g.rle_to_mask(rle), mask.astype(bool))


@pytest.mark.parametrize("seed, shape, density", [(0, (1, 1), 0.5), (1, (7, 5), 0.5), (2, (16, 9), 0.1), (3, (9, 16), 0.9),
                                                  (4, (31, 17), 0.0), (5, (31, 17), 1.0)])
def test_rle_round_trip_random(seed, shape, density):
    rng = np.random.default_rng(seed)
    for first_pixel in (False, True):
        mask = rng.random(shape) < density
        mask[0, 0] = first_pixel if 0 < density < 1 else mask[0, 0]
        rle = g.mask_to_rle(mask)
        assert sum(rle["counts"]) == mask.size
        assert (rle["counts"][0] == 0) == bool(mask[0, 0])
        np.testing.assert_array_equal(g.rle_to_mask(rle), mask)


def test_masks_to_rle_torch_equals_mask_to_rle():
    rng = np.random.default_rng(11)
    batch = rng.random((9, 13, 17)) < rng.random((9, 1, 1))
    batch[0] = False
    batch[1] = True
    batch[2] = False
    batch[2, 0, 0] = True
    batch[3, -1, -1] = True
    rles = g.masks_to_rle_torch(torch.from_numpy(batch))
    assert rles == [g.mask_to_rle(m) for m in batch]
    assert g.masks_to_rle_torch(torch.zeros((0, 4, 5), dtype=torch.bool)) == []
    # A non-contiguous view (as a slice of a larger batch) encodes the same.
    big = torch.from_numpy(rng.random((4, 20, 20)) < 0.5)
    assert g.masks_to_rle_torch(big[:, ::2, 1::3]) == [g.mask_to_rle(m) for m in big[:, ::2, 1::3].numpy()]


@pytest.mark.parametrize(
    "mask, xywh, area",
    [
        (_m("...", "...", ".#."), (1.0, 2.0, 1.0, 1.0), 1),
        (_m("....", ".##.", ".#.."), (1.0, 1.0, 2.0, 2.0), 3),
        (np.ones((3, 4), bool), (0.0, 0.0, 4.0, 3.0), 12),
        (_m("#..", "...", "..#"), (0.0, 0.0, 3.0, 3.0), 2),
        (_m("..", ".."), (0.0, 0.0, 0.0, 0.0), 0),
    ],
    ids=["single-pixel", "l-shape", "full", "corners", "empty"],
)
def test_bbox_and_area(mask, xywh, area):
    assert g.bbox_xywh_px(mask) == xywh
    assert g.area_px(mask) == area


@pytest.mark.parametrize(
    "points_px, size_wh, points_pct",
    [
        ([[0, 0], [10, 5], [20, 10]], (20, 10), [[0.0, 0.0], [50.0, 50.0], [100.0, 100.0]]),
        ([[-1, 11], [25, -3], [5, 2.5]], (20, 10), [[0.0, 100.0], [100.0, 0.0], [25.0, 25.0]]),
        ([[1, 1], [3, 1], [3, 2]], (4, 8), [[25.0, 12.5], [75.0, 12.5], [75.0, 25.0]]),
    ],
    ids=["corners-and-middle", "clamped", "non-square"],
)
def test_polygon_percent_conversions(points_px, size_wh, points_pct):
    pct = g.polygon_px_to_pct(np.array(points_px, np.float32), size_wh)
    assert all(type(v) is float for point in pct for v in point)
    np.testing.assert_allclose(pct, points_pct)
    assert g.polygon_pct_to_px(points_pct, size_wh).dtype == np.float32
    inside = np.clip(np.array(points_px, np.float64), 0, size_wh)
    np.testing.assert_allclose(g.polygon_pct_to_px(points_pct, size_wh), inside, atol=1e-5)


def test_polygon_is_frozen_and_read_only():
    p = g.Polygon(points_xy_px=[[0, 0], [1, 0], [1, 1]], iou=1)
    assert p.points_xy_px.dtype == np.float32 and p.iou == 1.0
    with pytest.raises(ValueError):
        p.points_xy_px[0, 0] = 5
    with pytest.raises(AttributeError):
        p.iou = 0.5


def test_module_imports_without_torch_or_opencv():
    # The web tier imports geometry for percent conversions and must not pull in torch.
    code = "import sys; sys.modules['torch'] = sys.modules['cv2'] = None; import labelassist.workers.geometry"
    subprocess.run([sys.executable, "-c", code], check=True)


SQUARE = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)

ERROR_CASES = [
    (lambda: g.mask_to_rle(np.zeros((2, 2, 2), bool)), "expected a 2-D (H, W) array, got shape (2, 2, 2)"),
    (lambda: g.mask_to_rle(np.zeros((0, 3), bool)), "expected a non-empty (H, W) array, got shape (0, 3)"),
    (lambda: g.mask_to_rle(np.array([[0.0, 0.5]])), "expected a bool array or 0/1 values, got dtype float64"),
    (lambda: g.mask_to_rle(np.array([["a", "b"]])), "expected a bool array or 0/1 values"),
    (lambda: g.area_px([1, 0]), "expected a 2-D (H, W) array, got shape (2,)"),
    (lambda: g.rle_to_mask([4]), "expected a dict with 'size' and 'counts', got list"),
    (lambda: g.rle_to_mask({"size": [2, 2]}), "expected a dict with 'size' and 'counts', got ['size']"),
    (lambda: g.rle_to_mask({"size": [2], "counts": [4]}), "expected [h, w] with two positive integers, got [2]"),
    (lambda: g.rle_to_mask({"size": [2, 0], "counts": [0]}), "expected [h, w] with two positive integers"),
    (lambda: g.rle_to_mask({"size": [2, 3], "counts": [1, 4]}), "expected runs summing to h*w = 2*3 = 6, got 5"),
    (lambda: g.rle_to_mask({"size": [2, 3], "counts": [7, -1]}), "expected non-negative run lengths, got -1"),
    (lambda: g.rle_to_mask({"size": [2, 3], "counts": [1.5, 4.5]}), "expected a non-empty flat list of integers"),
    (lambda: g.rle_to_mask({"size": [2, 3], "counts": [[6]]}), "got shape (1, 1)"),
    (lambda: g.rle_to_mask({"size": [2, 3], "counts": "06"}), "compressed COCO RLE"),
    (lambda: g.masks_to_rle_torch(np.zeros((1, 2, 2), bool)), "expected a torch.Tensor (N, H, W), got ndarray"),
    (lambda: g.masks_to_rle_torch(torch.zeros((2, 2), dtype=torch.bool)), "got torch.bool of shape (2, 2)"),
    (lambda: g.masks_to_rle_torch(torch.zeros((1, 2, 2))), "expected a torch.bool tensor of shape (N, H, W), got torch.float32"),
    (lambda: g.masks_to_rle_torch(torch.zeros((1, 0, 2), dtype=torch.bool)), "expected non-empty (H, W) masks"),
    (lambda: g.mask_to_polygons_px(np.ones((3, 3), bool), max_vertices=2), "max_vertices: expected an integer >= 3, got 2"),
    (lambda: g.mask_to_polygons_px(np.ones((3, 3), bool), max_vertices=8.0), "max_vertices: expected an integer >= 3, got 8.0"),
    (lambda: g.mask_to_polygons_px(np.ones((3, 3), bool), min_area_px=-1), "min_area_px: expected an integer >= 0, got -1"),
    (lambda: g.mask_to_polygons_px(np.ones((3, 3), bool), holes="keep"), "holes: expected one of ['bridge', 'fill'], got 'keep'"),
    (lambda: g.mask_to_polygons_px(np.full((3, 3), 2)), "expected a bool array or 0/1 values, got dtype int64"),
    (lambda: g.rasterize_polygons_px([SQUARE[:2]], (2, 2)), "polygons[0]: expected shape (K, 2) with K >= 3, got (2, 2)"),
    (lambda: g.rasterize_polygons_px([np.zeros((4, 3))], (2, 2)), "expected shape (K, 2) with K >= 3, got (4, 3)"),
    (lambda: g.rasterize_polygons_px([SQUARE * np.nan], (2, 2)), "expected finite coordinates"),
    (lambda: g.rasterize_polygons_px([SQUARE], (2, 0)), "size_hw: expected (height, width) in pixels as two positive numbers, got (2, 0)"),
    (lambda: g.rasterize_polygons_px([SQUARE], (2.5, 2)), "size_hw: expected whole pixel counts, got (2.5, 2)"),
    (lambda: g.polygons_iou([SQUARE], np.zeros((2, 2, 1), bool)), "expected a 2-D (H, W) array"),
    (lambda: g.polygon_px_to_pct(SQUARE, (0, 10)), "size_wh: expected (width, height) in pixels as two positive numbers, got (0, 10)"),
    (lambda: g.polygon_px_to_pct(SQUARE, 10), "size_wh: expected (width, height) in pixels as two positive numbers, got 10"),
    (lambda: g.polygon_pct_to_px([[1, 2, 3]], (10, 10)), "points_xy_pct: expected shape (K, 2) with K >= 1, got (1, 3)"),
    (lambda: g.polygon_pct_to_px([["a", "b"]], (10, 10)), "points_xy_pct: expected (K, 2) numeric x, y points, got list"),
    (lambda: g.Polygon(points_xy_px=SQUARE, iou=1.5), "polygon iou: expected a number in [0, 1], got 1.5"),
    (lambda: g.Polygon(points_xy_px=SQUARE[:2], iou=1.0), "polygon points_xy_px: expected shape (K, 2) with K >= 3"),
]


@pytest.mark.parametrize("call, message", ERROR_CASES)
def test_bad_input_raises_contract_error(call, message):
    with pytest.raises(ContractError) as info:
        call()
    assert message in str(info.value)


def test_iou_can_be_left_unmeasured():
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:6, 2:6] = True
    mask[8:11, 7:11] = True
    measured = g.mask_to_polygons_px(mask, min_area_px=1)
    unmeasured = g.mask_to_polygons_px(mask, min_area_px=1, measure_iou=False)
    assert [p.iou for p in unmeasured] == [None, None]
    assert all(np.array_equal(a.points_xy_px, b.points_xy_px) for a, b in zip(measured, unmeasured))
