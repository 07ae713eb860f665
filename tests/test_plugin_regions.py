"""PredictResult -> Label Studio prediction JSON, brush RLE, and interactive context -> Prompt."""

import numpy as np
import pytest

from labelassist.plugin.config import parse_label_config
from labelassist.plugin.errors import ContextError
from labelassist.plugin.regions import (
    brush_rle_from_mask,
    failed_prediction,
    interactive_result,
    mask_from_brush_rle,
    mask_from_coco_rle,
    parse_interactive_context,
    prediction_from_result,
)
from labelassist.workers.contract import JobFailure, PredictResult, Prompt, Region
from labelassist.workers.errors import ContractError

CONFIG = parse_label_config(
    "<View>"
    '<Image name="img" value="$image"/><Image name="img2" value="$other"/>'
    '<PolygonLabels name="poly" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>'
    '<BrushLabels name="brush" toName="img"><Label value="cat"/></BrushLabels>'
    '<RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="car"/></RectangleLabels>'
    '<PolygonLabels name="poly2" toName="img2"><Label value="cat"/></PolygonLabels>'
    '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="cat"/></KeyPointLabels>'
    "</View>"
)
W, H = 8, 5


def coco_rle_reference(mask: np.ndarray) -> dict:
    """Straightforward COCO uncompressed RLE: column-major runs, starting with background."""
    counts, current, run = [], False, 0
    for v in mask.flatten(order="F"):
        if bool(v) != current:
            counts.append(run)
            current, run = bool(v), 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def box_mask(x0=2, y0=1, x1=5, y1=4) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def region(label="cat", rid="0123456789abcdef", polygons=(((25.0, 20.0), (62.5, 20.0), (62.5, 80.0)),), mask=None, **kw):
    mask = box_mask() if mask is None else mask
    base = dict(id=rid, label=label, score=0.875, margin=0.3, polygons_pct=polygons, rle=coco_rle_reference(mask),
                bbox_xywh_px=(2.0, 1.0, 3.0, 3.0), area_px=int(mask.sum()), predicted_iou=0.9, stability_score=0.95, polygon_iou=0.8)
    base.update(kw)
    return Region(**base)


def result(*regions, score=0.42, size_wh=(W, H), **kw):
    return PredictResult(task_id="7", model_version="worker-v", size_wh=size_wh, regions=regions, score=score, **kw)


def test_polygon_item_matches_design_shape_field_by_field():
    pred = prediction_from_result(result(region()), CONFIG, "la-1", value_key="image")
    polys = [i for i in pred["result"] if i["type"] == "polygonlabels"]
    assert polys == [{
        "id": "0123456789abcdef-poly-0",
        "from_name": "poly",
        "to_name": "img",
        "type": "polygonlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "score": 0.875,
        "value": {"points": [[25.0, 20.0], [62.5, 20.0], [62.5, 80.0]], "closed": True, "polygonlabels": ["cat"]},
    }]
    assert pred["score"] == 0.42 and pred["model_version"] == "la-1"
    assert set(pred) == {"result", "score", "model_version"}


def test_rectangle_item_in_percent_top_left():
    pred = prediction_from_result(result(region()), CONFIG, "la-1")
    (box,) = [i for i in pred["result"] if i["type"] == "rectanglelabels"]
    assert box["id"] == "0123456789abcdef-box-0"
    assert (box["from_name"], box["to_name"], box["original_width"], box["original_height"], box["image_rotation"]) == ("box", "img", W, H, 0)
    assert box["value"] == {"x": 25.0, "y": 20.0, "width": 37.5, "height": 60.0, "rotation": 0, "rectanglelabels": ["cat"]}


def test_brush_item_is_label_studio_rle_of_the_mask():
    pred = prediction_from_result(result(region()), CONFIG, "la-1")
    (brush,) = [i for i in pred["result"] if i["type"] == "brushlabels"]
    assert brush["id"] == "0123456789abcdef-brush-0"
    assert set(brush["value"]) == {"format", "rle", "brushlabels"}
    assert brush["value"]["format"] == "rle" and brush["value"]["brushlabels"] == ["cat"]
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in brush["value"]["rle"])
    assert np.array_equal(mask_from_brush_rle(brush["value"]["rle"], (W, H)), box_mask())


def _random_mask(seed):
    return np.random.default_rng(seed).random((H, W)) > 0.5


MASKS = [
    ("empty", np.zeros((H, W), bool)),
    ("full", np.ones((H, W), bool)),
    ("one pixel", box_mask(7, 4, 8, 5)),
    ("box", box_mask()),
    ("random", _random_mask(0)),
    ("wide run > 2**16", np.ones((300, 300), bool)),
]


@pytest.mark.parametrize("mask", [m for _, m in MASKS], ids=[n for n, _ in MASKS])
def test_brush_round_trip_through_label_studio_decoder(mask):
    from label_studio_sdk.converter.brush import decode_rle

    h, w = mask.shape
    assert np.array_equal(mask_from_coco_rle(coco_rle_reference(mask)), mask)
    rgba = decode_rle(brush_rle_from_mask(mask)).reshape(h, w, 4)
    assert np.array_equal(rgba[:, :, 3] > 0, mask)
    assert set(np.unique(rgba)) <= {0, 255}


@pytest.mark.parametrize("rle, message", [
    ({"size": [2, 2], "counts": [1, 2]}, "adding up to 2x2=4"),
    ({"size": [2, 2], "counts": [5, -1]}, "non-negative"),
    ({"size": [2, 2], "counts": "PP3"}, "uncompressed COCO RLE"),
    ({"size": [0, 2], "counts": []}, "[height, width]"),
    ({"counts": [4]}, "[height, width]"),
])
def test_bad_coco_rle_names_the_problem(rle, message):
    with pytest.raises(ContractError) as err:
        mask_from_coco_rle(rle)
    assert message in str(err.value)


def test_one_item_per_polygon_with_unique_full_length_ids():
    polygons = (((0, 0), (10, 0), (10, 10)), ((1, 1), (2, 2)), ((50, 50), (60, 50), (60, 60), (50, 60)))
    pred = prediction_from_result(result(region(polygons=polygons), region(rid="fedcba9876543210", label="dog")), CONFIG, "v", value_key="image")
    polys = [i for i in pred["result"] if i["type"] == "polygonlabels"]
    # the two-point ring is no polygon and is dropped; indices keep the region's numbering
    assert [i["id"] for i in polys] == ["0123456789abcdef-poly-0", "0123456789abcdef-poly-2", "fedcba9876543210-poly-0"]
    ids = [i["id"] for i in pred["result"]]
    assert len(ids) == len(set(ids))


def test_points_are_clamped_into_the_image():
    pred = prediction_from_result(result(region(polygons=(((-0.5, 10), (100.2, 10), (50, 101)),))), CONFIG, "v", value_key="image")
    (poly,) = [i for i in pred["result"] if i["type"] == "polygonlabels"]
    assert poly["value"]["points"] == [[0.0, 10.0], [100.0, 10.0], [50.0, 100.0]]


ROUTING = [
    # (regions, value_key, expected (from_name, label) pairs)
    ("label in three controls", [region()], "image", [("poly", "cat"), ("brush", "cat"), ("box", "cat")]),
    ("all images when no key given", [region()], None, [("poly", "cat"), ("brush", "cat"), ("box", "cat"), ("poly2", "cat")]),
    ("only the other image's controls", [region()], "other", [("poly2", "cat")]),
    ("label in one control", [region(label="car")], "image", [("box", "car")]),
    ("unlabelled region skipped", [region(label="")], "image", []),
    ("label in no control skipped", [region(label="zebra")], "image", []),
]


@pytest.mark.parametrize("regions, value_key, expected", [r[1:] for r in ROUTING], ids=[r[0] for r in ROUTING])
def test_regions_go_to_every_control_having_their_label(regions, value_key, expected):
    pred = prediction_from_result(result(*regions), CONFIG, "v", value_key=value_key)
    got = [(i["from_name"], i["value"][i["type"]][0]) for i in pred["result"]]
    assert got == expected


def test_size_falls_back_to_the_mask_size_and_empty_results_need_none():
    pred = prediction_from_result(result(region(), size_wh=(0, 0)), CONFIG, "v")
    assert {(i["original_width"], i["original_height"]) for i in pred["result"]} == {(W, H)}
    assert prediction_from_result(result(size_wh=(0, 0), score=0.9), CONFIG, "v") == {"result": [], "score": 0.9, "model_version": "v"}


def test_failed_job_gives_an_empty_prediction_with_score_zero():
    failed = result(region(), error=JobFailure("bad_image", "cannot decode"))
    assert prediction_from_result(failed, CONFIG, "v") == failed_prediction("v") == {"result": [], "score": 0.0, "model_version": "v"}
    assert interactive_result(failed, CONFIG.controls[0], "cat") == []


def test_interactive_result_uses_the_picked_label_in_the_given_control():
    brush = CONFIG.controls[1]
    items = interactive_result(result(region(label="")), brush, "cat")
    assert [(i["from_name"], i["type"], i["value"]["brushlabels"]) for i in items] == [("brush", "brushlabels", ["cat"])]
    assert interactive_result(result(region(label="")), brush, "") == []
    assert interactive_result(result(region(label="dog")), CONFIG.controls[0], "")[0]["value"]["polygonlabels"] == ["dog"]


def kp(x, y, positive=None, label="cat", w=200, h=100, to_name="img"):
    item = {"type": "keypointlabels", "from_name": "kp", "to_name": to_name, "original_width": w, "original_height": h,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label] if label else []}}
    if positive is not None:
        item["is_positive"] = positive
    return item


def rect(x, y, width, height, label="cat", w=200, h=100):
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "img", "original_width": w, "original_height": h,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [label]}}


CONTEXTS = [
    ("one positive point", [kp(50, 50, True)], Prompt(((100.0, 50.0),), (1,)), "cat", "poly"),
    ("points, one negative; flag missing counts as positive", [kp(10, 20, True), kp(90, 80, False), kp(50, 50)],
     Prompt(((20.0, 20.0), (180.0, 80.0), (100.0, 50.0)), (1, 0, 1)), "cat", "poly"),
    ("rectangle", [rect(10, 20, 50, 40)], Prompt(box_xyxy_px=(20.0, 20.0, 120.0, 60.0)), "cat", "poly"),
    ("rectangle and point", [rect(0, 0, 50, 50), kp(25, 25, True)], Prompt(((50.0, 25.0),), (1,), (0.0, 0.0, 100.0, 50.0)), "cat", "poly"),
    ("label only in a box control", [rect(0, 0, 10, 10, label="car")], Prompt(box_xyxy_px=(0.0, 0.0, 20.0, 10.0)), "car", "box"),
    ("dynamic keypoint label in value.labels", [{**kp(50, 50, True, label=None), "value": {"x": 50, "y": 50, "labels": ["dog"]}}],
     Prompt(((100.0, 50.0),), (1,)), "dog", "poly"),
    ("no label picked", [kp(50, 50, True, label=None)], Prompt(((100.0, 50.0),), (1,)), "", "poly"),
    ("point outside clamped", [kp(120, -5, True)], Prompt(((200.0, 0.0),), (1,)), "cat", "poly"),
    ("other image", [kp(50, 50, True, to_name="img2")], Prompt(((100.0, 50.0),), (1,)), "cat", "poly2"),
]


@pytest.mark.parametrize("items, prompt, label, control", [c[1:] for c in CONTEXTS], ids=[c[0] for c in CONTEXTS])
def test_interactive_context_to_prompt_in_pixels(items, prompt, label, control):
    got = parse_interactive_context({"result": items}, CONFIG)
    assert got is not None
    assert got[0] == prompt
    assert got[1] == label
    assert got[2].name == control


@pytest.mark.parametrize("context", [None, {}, {"result": []}, {"result": None}, "x",
                                     {"result": [{"type": "choices", "value": {"choices": ["a"]}}]}])
def test_no_prompt_in_context_is_none(context):
    assert parse_interactive_context(context, CONFIG) is None


@pytest.mark.parametrize("items, message", [
    ([kp(50, 50, label="zebra")], "no PolygonLabels, BrushLabels or RectangleLabels control with label 'zebra' on image 'img'"),
    ([{**kp(50, 50), "original_width": None}], "positive original_width and original_height"),
    ([{**kp(50, 50), "value": {"y": 3}}], "value.x as a number"),
    ([{**kp(50, 50), "value": None}], "'value' object"),
    ([rect(10, 10, 0, 5)], "positive width and height"),
    (["text"], "expected objects"),
])
def test_bad_interactive_context_names_the_problem(items, message):
    with pytest.raises(ContextError) as err:
        parse_interactive_context({"result": items}, CONFIG)
    assert message in str(err.value)
    assert err.value.code == "bad_context"


def test_items_carry_the_region_embedding_for_the_correction_log():
    from labelassist.plugin.corrections import region_extras

    embedding = (0.6, -0.8, 0.0)
    pred = prediction_from_result(result(region(embedding=embedding), image_sha256="ab" * 32), CONFIG, "la-1", value_key="image")
    assert pred["result"]
    for item in pred["result"]:
        extras = region_extras(item)
        assert extras.score == 0.875
        assert np.allclose(extras.embedding, embedding, atol=1e-3)  # kept as float16
        assert item["meta"]["labelassist"]["image_sha256"] == "ab" * 32
