"""The correction diff: every change kind for every region type, as tables of tiny
Label Studio result items (shapes as Label Studio 1.23 sends them)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image, ImageDraw

from labelassist.plugin import corrections as c

W, H = 20, 10  # image size: 1 px = 5 % of the width, 10 % of the height


def _item(rid, rtype, value, origin=None, **extra):
    item = {"id": rid, "from_name": "label", "to_name": "image", "type": rtype, "original_width": W,
            "original_height": H, "image_rotation": 0, "value": value, **extra}
    if origin:
        item["origin"] = origin
    return item


def poly(rid, pts_px, label="cat", origin=None, **extra):
    """Polygon from pixel vertices (converted to Label Studio percent)."""
    pts = [[x * 100.0 / W, y * 100.0 / H] for x, y in pts_px]
    return _item(rid, "polygonlabels", {"points": pts, "closed": True, "polygonlabels": [label]}, origin, **extra)


def rect(rid, x, y, w, h, label="cat", origin=None, rotation=0, **extra):
    """Rectangle from a pixel box (top-left x, y, size w, h)."""
    value = {"x": x * 100.0 / W, "y": y * 100.0 / H, "width": w * 100.0 / W, "height": h * 100.0 / H,
             "rotation": rotation, "rectanglelabels": [label]}
    return _item(rid, "rectanglelabels", value, origin, **extra)


def brush(rid, x0, y0, x1, y1, label="cat", origin=None, **extra):
    """Brush stroke filling pixels [x0, x1) x [y0, y1), in Label Studio's RLE."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 255
    return _item(rid, "brushlabels", {"format": "rle", "rle": [int(v) for v in mask2rle(m)], "brushlabels": [label]}, origin, **extra)


def square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Shapes per type: A is the prediction, B an edit of it (IoU 25/35 for polygon and
# rectangle: PIL fills the outline, so a 2..6 px square covers 5x5 pixels), FAR is
# elsewhere, NEAR overlaps A by less than the matching IoU.
SHAPES = {
    "polygonlabels": {
        "A": lambda rid, **kw: poly(rid, square(2, 2, 6, 6), **kw),
        "B": lambda rid, **kw: poly(rid, square(2, 2, 8, 6), **kw),
        "FAR": lambda rid, **kw: poly(rid, square(12, 1, 16, 5), **kw),
        "NEAR": lambda rid, **kw: poly(rid, square(5, 2, 9, 6), **kw),
    },
    "rectanglelabels": {
        "A": lambda rid, **kw: rect(rid, 2, 2, 4, 4, **kw),
        "B": lambda rid, **kw: rect(rid, 2, 2, 6, 4, **kw),
        "FAR": lambda rid, **kw: rect(rid, 12, 1, 4, 4, **kw),
        "NEAR": lambda rid, **kw: rect(rid, 5, 2, 4, 4, **kw),
    },
    "brushlabels": {
        "A": lambda rid, **kw: brush(rid, 2, 2, 7, 7, **kw),
        "B": lambda rid, **kw: brush(rid, 2, 2, 9, 7, **kw),
        "FAR": lambda rid, **kw: brush(rid, 12, 1, 17, 6, **kw),
        "NEAR": lambda rid, **kw: brush(rid, 5, 2, 10, 7, **kw),
    },
}
IOU_AB = 25 / 35
TYPES = list(SHAPES)

# (case, prediction [(shape, id, label)], annotation [(shape, id, label, origin)],
#  expected [(kind, pred id, final id, label_from, label_to, match, iou)])
CASES = [
    ("accepted", [("A", "p1", "cat")], [("A", "p1", "cat", "prediction")],
     [("accepted", "p1", "p1", "cat", "cat", "id", 1.0)]),
    ("edited", [("A", "p1", "cat")], [("B", "p1", "cat", "prediction-changed")],
     [("edited", "p1", "p1", "cat", "cat", "id", IOU_AB)]),
    ("relabeled", [("A", "p1", "cat")], [("A", "p1", "dog", "prediction-changed")],
     [("relabeled", "p1", "p1", "cat", "dog", "id", 1.0)]),
    ("relabeled and edited", [("A", "p1", "cat")], [("B", "p1", "dog", "prediction-changed")],
     [("relabeled", "p1", "p1", "cat", "dog", "id", IOU_AB)]),
    ("deleted", [("A", "p1", "cat"), ("FAR", "p2", "dog")], [("A", "p1", "cat", "prediction")],
     [("accepted", "p1", "p1", "cat", "cat", "id", 1.0), ("deleted", "p2", None, "dog", None, None, None)]),
    ("added", [("A", "p1", "cat")], [("A", "p1", "cat", "prediction"), ("FAR", "m1", "dog", "manual")],
     [("accepted", "p1", "p1", "cat", "cat", "id", 1.0), ("added", None, "m1", None, "dog", None, None)]),
    ("everything deleted", [("A", "p1", "cat")], [],
     [("deleted", "p1", None, "cat", None, None, None)]),
    ("no prediction", [], [("A", "m1", "cat", "manual")],
     [("added", None, "m1", None, "cat", None, None)]),
    ("id lost, origin says unchanged", [("FAR", "p0", "cat"), ("A", "p1", "cat")],
     [("A", "x1", "cat", "prediction"), ("FAR", "x0", "cat", "prediction")],
     [("accepted", "p0", "x0", "cat", "cat", "origin", 1.0), ("accepted", "p1", "x1", "cat", "cat", "origin", 1.0)]),
    ("id lost, origin says changed", [("A", "p1", "cat")], [("B", "x1", "cat", "prediction-changed")],
     [("edited", "p1", "x1", "cat", "cat", "origin", IOU_AB)]),
    ("redrawn by hand over a deleted proposal", [("A", "p1", "cat")], [("B", "m1", "cat", "manual")],
     [("edited", "p1", "m1", "cat", "cat", "iou", IOU_AB)]),
    ("no origin, relabeled by geometry", [("A", "p1", "cat")], [("A", "x1", "dog", None)],
     [("relabeled", "p1", "x1", "cat", "dog", "iou", 1.0)]),
    ("overlap below the matching IoU", [("A", "p1", "cat")], [("NEAR", "m1", "cat", "manual")],
     [("deleted", "p1", None, "cat", None, None, None), ("added", None, "m1", None, "cat", None, None)]),
]


def _build(rtype, spec):
    shape, rid, label, *origin = spec
    return SHAPES[rtype][shape](rid, label=label, origin=origin[0] if origin else None)


@pytest.mark.parametrize("rtype", TYPES)
@pytest.mark.parametrize("case,pred,final,expected", CASES, ids=[row[0] for row in CASES])
def test_diff_kinds(rtype, case, pred, final, expected):
    got = c.diff_results([_build(rtype, s) for s in pred], [_build(rtype, s) for s in final])
    assert [(r.kind, r.pred_region_id, r.final_region_id, r.label_from, r.label_to, r.match) for r in got] == \
        [e[:6] for e in expected]
    for r, e in zip(got, expected):
        assert r.region_type == rtype
        if e[6] is None:
            assert r.iou is None
        else:
            assert r.iou == pytest.approx(e[6])
        assert r.geometry_changed == (e[6] is not None and e[6] < 1.0)
        assert r.size_wh == (W, H)


@pytest.mark.parametrize("rtype", TYPES)
def test_pixel_counts(rtype):
    [r] = c.diff_results([SHAPES[rtype]["A"]("p1")], [SHAPES[rtype]["B"]("p1")])
    assert (r.pixels_added, r.pixels_removed) == (10, 0)
    [d] = c.diff_results([SHAPES[rtype]["A"]("p1")], [])
    assert (d.pixels_added, d.pixels_removed) == (0, 25)


# (case, predicted vertices px, final vertices px, (added, removed, moved))
VERTEX_CASES = [
    ("unchanged", square(2, 2, 6, 6), square(2, 2, 6, 6), (0, 0, 0)),
    ("one moved", square(2, 2, 6, 6), [(2, 2), (6, 2), (7, 7), (2, 6)], (0, 0, 1)),
    ("one added", square(2, 2, 6, 6), [(2, 2), (4, 1), (6, 2), (6, 6), (2, 6)], (1, 0, 0)),
    ("one removed", square(2, 2, 6, 6), [(2, 2), (6, 2), (6, 6)], (0, 1, 0)),
    ("moved and added", square(2, 2, 6, 6), [(2, 2), (4, 1), (6, 2), (7, 7), (2, 6)], (1, 0, 1)),
    ("below tolerance", square(2, 2, 6, 6), [(2.2, 2), (6, 2), (6, 6), (2, 6)], (0, 0, 0)),
]


@pytest.mark.parametrize("case,pred,final,expected", VERTEX_CASES, ids=[r[0] for r in VERTEX_CASES])
def test_vertex_changes(case, pred, final, expected):
    assert c.vertex_changes(pred, final) == expected


def test_polygon_edit_reports_vertices():
    [r] = c.diff_results([poly("p1", square(2, 2, 6, 6))], [poly("p1", [(2, 2), (4, 1), (6, 2), (7, 7), (2, 6)])])
    assert r.kind == "edited" and (r.vertices_added, r.vertices_removed, r.vertices_moved) == (1, 0, 1)


def test_rectangle_edit_reports_corners_moved():
    [r] = c.diff_results([rect("p1", 2, 2, 4, 4)], [rect("p1", 2, 2, 6, 4)])
    assert (r.vertices_added, r.vertices_removed, r.vertices_moved) == (0, 0, 2)


@pytest.mark.parametrize("rotation,corners", [
    (0, ((2, 2), (6, 2), (6, 4), (2, 4))),
    (90, ((2, 2), (2, 6), (0, 6), (0, 2))),
])
def test_rectangle_corners_rotate_about_top_left(rotation, corners):
    got = c.rectangle_corners_px(10, 20, 20, 20, rotation, (W, H))
    assert np.allclose(got, corners, atol=1e-9)


def test_other_result_items_are_ignored():
    choice = {"id": "c1", "from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["ok"]}}
    relation = {"type": "relation", "from_id": "p1", "to_id": "p2", "direction": "right"}
    got = c.diff_results([poly("p1", square(2, 2, 6, 6)), choice], [poly("p1", square(2, 2, 6, 6)), relation, choice])
    assert [r.kind for r in got] == ["accepted"]


def test_regions_of_different_controls_never_pair():
    other = poly("m1", square(2, 2, 6, 6))
    other["from_name"] = "other_labels"
    got = c.diff_results([poly("p1", square(2, 2, 6, 6))], [other])
    assert [r.kind for r in got] == ["deleted", "added"]


def test_geometric_matching_is_greedy_by_iou():
    # two proposals, two hand-drawn regions: each final goes to the proposal it overlaps most
    pred = [poly("p1", square(2, 2, 6, 6)), poly("p2", square(10, 2, 14, 6))]
    final = [poly("m2", square(10, 2, 15, 6), origin="manual"), poly("m1", square(2, 2, 6, 7), origin="manual")]
    got = {r.pred_region_id: r.final_region_id for r in c.diff_results(pred, final)}
    assert got == {"p1": "m1", "p2": "m2"}


def test_prediction_extras_travel_with_the_region():
    emb = [0.6, -0.8, 0.0]
    item = poly("p1", square(2, 2, 6, 6), score=0.87, meta=c.prediction_meta(emb, image_sha256="ab" * 32))
    [r] = c.diff_results([item], [poly("p1", square(2, 2, 6, 6))])
    assert r.pred_score == pytest.approx(0.87)
    assert r.pred_embedding == pytest.approx(emb, abs=1e-3)
    # a side table's extras win over the item's meta
    [r] = c.diff_results([item], [], extras={"p1": c.RegionExtras(score=0.5, embedding=(1.0, 0.0))})
    assert (r.pred_score, r.pred_embedding) == (0.5, (1.0, 0.0))
    assert c.prediction_image_sha256([item]) == "ab" * 32


def test_embedding_b64_round_trip():
    v = np.random.default_rng(0).normal(size=512)
    v /= np.linalg.norm(v)
    text = c.encode_embedding_b64(v)
    assert len(text) == math.ceil(512 * 2 / 3) * 4
    assert np.allclose(c.decode_embedding_b64(text), v, atol=1e-3)


# (case, item or result list, error fragment)
ERROR_CASES = [
    ("not a list", {"id": "x"}, "expected a result list"),
    ("no size", [{"id": "p1", "type": "polygonlabels", "value": {"points": [], "polygonlabels": []}}], "original_width"),
    ("bad points", [poly("p1", square(2, 2, 6, 6)) | {"value": {"points": [[1, 2, 3]], "polygonlabels": ["a"]}}], "value.points"),
    ("nan point", [poly("p1", [(float("nan"), 1), (2, 2), (3, 3)])], "finite number"),
    ("labels not a list", [rect("p1", 1, 1, 2, 2) | {"value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": "a"}}], "list of labels"),
    ("rectangle without width", [rect("p1", 1, 1, 2, 2) | {"value": {"x": 1, "y": 1, "height": 2, "rectanglelabels": []}}], "value.width"),
    ("rle of another size", [brush("p1", 1, 1, 3, 3) | {"original_width": W + 1}], "values for a 21x10 image"),
    ("rle not bytes", [brush("p1", 1, 1, 3, 3) | {"value": {"format": "rle", "rle": [300], "brushlabels": []}}], "list of bytes"),
    ("duplicate ids", [poly("p1", square(2, 2, 6, 6)), poly("p1", square(3, 3, 6, 6))], "unique"),
    ("no id", [poly(None, square(2, 2, 6, 6))], "region id"),
]


@pytest.mark.parametrize("case,result,fragment", ERROR_CASES, ids=[r[0] for r in ERROR_CASES])
def test_malformed_results_raise_clear_errors(case, result, fragment):
    with pytest.raises(c.CorrectionError, match=fragment):
        c.diff_results(result, [])


def _reference_iou(a_px, b_px, size_wh):
    """Straightforward reference: both polygons drawn on full-size canvases."""
    masks = []
    for pts in (a_px, b_px):
        img = Image.new("1", size_wh, 0)
        ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
        masks.append(np.array(img, bool))
    union = np.logical_or(*masks).sum()
    return np.logical_and(*masks).sum() / union if union else 0.0


def test_cropped_iou_matches_full_size_reference():
    rng = random.Random(7)
    size = (64, 48)
    for _ in range(40):
        shapes = []
        for _ in range(2):
            cx, cy, r = rng.uniform(0, 64), rng.uniform(0, 48), rng.uniform(3, 30)
            n = rng.randint(3, 9)
            shapes.append([(cx + r * math.cos(2 * math.pi * k / n) * rng.uniform(0.5, 1), cy + r * math.sin(2 * math.pi * k / n) * rng.uniform(0.5, 1))
                           for k in range(n)])
        fast = c.mask_iou(c.rasterize_polygon_px(shapes[0], size), c.rasterize_polygon_px(shapes[1], size))
        assert fast == pytest.approx(_reference_iou(*shapes, size))


def test_brush_iou_matches_full_size_reference():
    a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[1:6, 2:9] = True
    b[3:9, 5:15] = True
    ra = c.decode_brush_rle(mask2rle(a.astype(np.uint8) * 255), (W, H))
    assert np.array_equal(ra, a)
    fast = c.mask_iou(c.crop_mask(a), c.crop_mask(b))
    assert fast == pytest.approx((a & b).sum() / (a | b).sum())


# A Label Studio ANNOTATION_CREATED payload's annotation and the prediction
# GET /api/predictions/<id>/ returns, trimmed to the fields the diff reads.
PREDICTION = {
    "id": 41, "model_version": "labelassist-0.1.0-sam_vit_b-clip_b32", "score": 0.71, "task": 7, "project": 3,
    "result": [poly("r-0001-aaaaaaaaaaaaaaaa", square(2, 2, 6, 6), score=0.9, meta=c.prediction_meta([1.0, 0.0], "ff" * 32)),
               rect("r-0002-bbbbbbbbbbbbbbbb", 12, 1, 4, 4, label="dog", score=0.4)],
}
ANNOTATION = {
    "id": 17, "task": 7, "project": 3, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
    "created_at": "2025-05-02T10:00:00.000000Z", "updated_at": "2025-05-02T10:01:05.123456Z", "lead_time": 37.13,
    "parent_prediction": 41, "parent_annotation": None, "last_action": "prediction",
    "result": [poly("r-0001-aaaaaaaaaaaaaaaa", square(2, 2, 6, 6), origin="prediction"),
               brush("kP3xA9", 1, 6, 5, 9, label="cat", origin="manual")],
}
TASK = {"id": 7, "data": {"image": "/data/upload/3/cat.png"}, "project": 3}


def test_diff_annotation_builds_the_record():
    rec = c.diff_annotation(ANNOTATION, PREDICTION, task=TASK)
    assert (rec.annotation_id, rec.task_id, rec.project, rec.prediction_id) == (17, 7, 3, 41)
    assert rec.model_version == PREDICTION["model_version"]
    assert rec.lead_time == pytest.approx(37.13)
    assert rec.updated_at == ANNOTATION["updated_at"]
    assert rec.image == "/data/upload/3/cat.png" and rec.image_sha256 == "ff" * 32
    assert [(r.kind, r.region_type) for r in rec.regions] == [("accepted", "polygonlabels"), ("deleted", "rectanglelabels"), ("added", "brushlabels")]
    assert rec.regions[0].pred_embedding == (1.0, 0.0)
    assert (rec.count("accepted"), rec.count("deleted"), rec.count("added")) == (1, 1, 1)
    assert c.AnnotationCorrection.from_json(rec.to_json()) == rec


def test_diff_annotation_without_prediction():
    ann = dict(ANNOTATION, parent_prediction=None)
    rec = c.diff_annotation(ann, None, task=TASK)
    assert rec.prediction_id is None and rec.model_version == ""
    assert [r.kind for r in rec.regions] == ["added", "added"]


@pytest.mark.parametrize("field,value,fragment", [
    ("id", None, "annotation id"),
    ("task", "seven", "task"),
    ("updated_at", "", "updated_at"),
])
def test_diff_annotation_rejects_bad_annotations(field, value, fragment):
    ann = dict(ANNOTATION, **{field: value})
    if field == "updated_at":
        ann["created_at"] = None
    with pytest.raises(c.CorrectionError, match=fragment):
        c.diff_annotation(ann, PREDICTION)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(kind="moved"), "kind expected"),
    (dict(kind="deleted", final_region_id="f"), "deleted region"),
    (dict(kind="edited", iou=1.5), "iou expected"),
    (dict(kind="edited", match="guess"), "match expected"),
    (dict(kind="edited", vertices_added=-1), "vertices_added"),
    (dict(region_type="ellipselabels"), "region_type"),
])
def test_region_correction_validates(kwargs, fragment):
    base = dict(kind="accepted", region_type="polygonlabels", pred_region_id="p", final_region_id="f",
                label_from="a", label_to="a", iou=1.0, match="id")
    with pytest.raises(c.CorrectionError, match=fragment):
        c.RegionCorrection(**{**base, **kwargs})
