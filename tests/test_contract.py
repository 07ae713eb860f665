"""The job contract: validation on construction and lossless JSON round trips."""

import json

import pytest

from labelassist.workers.contract import (
    Concept,
    ImageSource,
    JobFailure,
    PredictRequest,
    PredictResult,
    Prompt,
    ProposalSettings,
    Region,
)
from labelassist.workers.errors import ContractError

IMG = ImageSource(uri="http://127.0.0.1/a.png", headers={"Authorization": "Token x"})


def _request(**kw):
    base = dict(task_id=7, image=IMG, concepts=(Concept("cat", ("cat", "kitten")), Concept("dog")), model_version="v1")
    base.update(kw)
    return PredictRequest(**base)


def test_request_round_trip_through_json_text():
    req = _request(prompt=Prompt(points_xy_px=((1, 2),), point_labels=(1,)), prompt_label="cat")
    back = PredictRequest.from_json(json.loads(json.dumps(req.to_json())))
    assert back == req
    assert back.task_id == "7"
    assert back.concepts[1].prompts == ("dog",)


def test_job_id_is_deterministic_and_tracks_inputs():
    assert _request().job_id() == _request().job_id()
    assert _request().job_id() != _request(model_version="v2").job_id()
    assert _request().job_id() != _request(image=ImageSource(uri="http://127.0.0.1/b.png")).job_id()
    assert _request().job_id().startswith("la-predict-7-")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _request(concepts=()), "at least one concept"),
        (lambda: _request(concepts=(Concept("a"), Concept("a"))), "duplicate"),
        (lambda: Concept(""), "non-empty"),
        (lambda: Concept("a", threshold=1.5), "<= 1.0"),
        (lambda: ProposalSettings(points_per_side=0), "points_per_side"),
        (lambda: ProposalSettings(pred_iou_thresh=float("nan")), "finite"),
        (lambda: Prompt(), "at least one point or a box"),
        (lambda: Prompt(points_xy_px=((1, 2),), point_labels=(2,)), "0 or 1"),
        (lambda: Prompt(box_xyxy_px=(5, 5, 1, 1)), "x1 > x0"),
        (lambda: PredictRequest.from_json({"task_id": 1, "image": {"uri": "x"}, "concepts": [{"name": "a"}], "bogus": 1}), "unknown field"),
        (lambda: PredictRequest.from_json({"task_id": 1, "concepts": [{"name": "a"}]}), "image"),
        (lambda: PredictRequest.from_json({"contract": 99, "task_id": 1}), "contract version"),
    ],
)
def test_bad_input_names_the_problem(build, message):
    with pytest.raises(ContractError, match=message):
        build()


def test_result_round_trip_with_region_and_failure():
    region = Region(
        id="r" * 20, label="cat", score=0.9, margin=0.3, polygons_pct=(((1.0, 2.0), (3.0, 4.0), (5.0, 1.0)),),
        rle={"size": [4, 4], "counts": [0, 16]}, bbox_xywh_px=(0, 0, 4, 4), area_px=16, predicted_iou=0.9,
        stability_score=0.97, polygon_iou=0.95, embedding=(0.1, 0.2), label_scores={"cat": 0.9},
    )
    res = PredictResult(task_id="7", model_version="v1", size_wh=(4, 4), regions=(region,), score=0.8)
    assert PredictResult.from_json(json.loads(json.dumps(res.to_json()))) == res
    failed = PredictResult(task_id="8", model_version="v1", error=JobFailure("bad_image", "cannot decode"))
    back = PredictResult.from_json(json.loads(json.dumps(failed.to_json())))
    assert not back.ok and back.error.code == "bad_image"
