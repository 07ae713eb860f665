"""The pipeline end to end on tiny random models: valid regions, interactive prompts, cache reuse, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from labelassist.workers import geometry
from labelassist.workers.contract import (
    Concept, GeometrySettings, ImageSource, PredictRequest, PredictResult, Prompt, ProposalSettings, ScoringSettings,
)
from labelassist.workers.pipeline import Pipeline, PipelineLimits

from scenes import synthetic_scene

CONCEPTS = (Concept("cat", ("cat", "kitten")), Concept("dog"))
# Random weights: thresholds low enough that masks survive and every region is kept.
PROPOSALS = ProposalSettings(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.09,
                             stability_score_thresh=0.5, stability_score_offset=0.005)
KEEP_ALL = ScoringSettings(label_threshold=0.0, min_margin=0.0, keep_unlabeled=True)


@pytest.fixture(scope="module")
def pipeline(tiny_models):
    return Pipeline(tiny_models, PipelineLimits(max_image_bytes=5_000_000, max_image_pixels=4_000_000))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(synthetic_scene((192, 256), seed=1)).save(path)
    return path


def _request(path, **kw) -> PredictRequest:
    base = dict(task_id=1, image=ImageSource(str(path)), concepts=CONCEPTS, proposals=PROPOSALS, scoring=KEEP_ALL,
                geometry=GeometrySettings(max_vertices=32))
    base.update(kw)
    return PredictRequest(**base)


def test_regions_are_complete_and_consistent(pipeline, image_path):
    result = pipeline.run(_request(image_path))
    assert result.ok, result.error
    assert result.size_wh == (256, 192) and len(result.image_sha256) == 64
    assert result.model_version == pipeline.version and "random" in result.model_version
    assert len(result.regions) > 0
    assert {"load_s", "proposals_s", "scoring_s", "geometry_s", "total_s"} <= set(result.timings_s)
    assert result.provenance["random_weights"] is True and result.provenance["concept_prompts"]["cat"] == ["cat", "kitten"]
    ids = [r.id for r in result.regions]
    assert len(set(ids)) == len(ids)
    for region in result.regions:
        mask = geometry.rle_to_mask(region.rle)
        assert mask.shape == (192, 256) and mask.sum() == region.area_px
        assert region.bbox_xywh_px == geometry.bbox_xywh_px(mask)
        assert all(len(poly) <= 32 for poly in region.polygons_pct)
        assert all(0 <= x <= 100 and 0 <= y <= 100 for poly in region.polygons_pct for x, y in poly)
        polys_px = [geometry.polygon_pct_to_px(p, (256, 192)) for p in region.polygons_pct]
        assert geometry.polygons_iou(polys_px, mask) == pytest.approx(region.polygon_iou, abs=0.02)
        assert len(region.embedding) > 0 and np.linalg.norm(region.embedding) == pytest.approx(1.0, abs=1e-3)
        assert set(region.label_scores) == {"cat", "dog", "background"}
    # The result survives the queue's JSON round trip unchanged.
    assert PredictResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_same_request_twice_is_identical_and_reuses_the_embedding(pipeline, image_path):
    first = pipeline.run(_request(image_path))
    hits = pipeline.embeddings.hits
    second = pipeline.run(_request(image_path))
    assert pipeline.embeddings.hits == hits + 1
    assert [r.id for r in first.regions] == [r.id for r in second.regions]
    assert [r.rle for r in first.regions] == [r.rle for r in second.regions]


def test_strict_thresholds_reject_regions_rather_than_mislabel(pipeline, image_path):
    strict = ScoringSettings(label_threshold=0.99, min_margin=0.5)
    result = pipeline.run(_request(image_path, scoring=strict))
    assert result.ok and result.regions == () and result.score == 0.0


def test_interactive_prompt_returns_the_chosen_label(pipeline, image_path):
    req = _request(image_path, prompt=Prompt(points_xy_px=((60, 60),), point_labels=(1,)), prompt_label="dog")
    result = pipeline.run(req)
    assert result.ok
    assert len(result.regions) == 1 and result.regions[0].label == "dog"
    assert req.job_id().startswith("la-interactive-")


@pytest.mark.parametrize("make, code", [
    (lambda p: ImageSource(str(p.parent / "missing.png")), "image_unavailable"),
    (lambda p: ImageSource("ftp://host/a.png"), "image_unavailable"),
], ids=["missing file", "bad scheme"])
def test_bad_images_become_task_errors(pipeline, image_path, make, code):
    result = pipeline.run(_request(image_path, image=make(image_path)))
    assert not result.ok and result.error.code == code and result.regions == ()


@pytest.mark.parametrize("content, code, fragment", [
    (b"not an image", "bad_image", "not a decodable image"),
    (b"", "bad_image", "empty"),
], ids=["garbage", "empty"])
def test_undecodable_files_become_task_errors(pipeline, tmp_path, content, code, fragment):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    result = pipeline.run(_request(path))
    assert result.error.code == code and fragment in result.error.message


def test_huge_image_refused_before_decoding(tiny_models, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)
    small = Pipeline(tiny_models, PipelineLimits(max_image_pixels=1_000_000))
    result = small.run(_request(path))
    assert result.error.code == "bad_image" and "6000000 pixels" in result.error.message


def test_grayscale_and_rgba_images_work(pipeline, tmp_path):
    scene = synthetic_scene((96, 128), seed=2)
    for mode in ("L", "RGBA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(scene).convert(mode).save(path)
        result = pipeline.run(_request(path))
        assert result.ok and result.size_wh == (128, 96)


def test_job_function_turns_a_bad_payload_into_a_failed_result(pipeline):
    from labelassist.workers import jobs

    jobs.install(pipeline)
    out = PredictResult.from_json(jobs.predict({"task_id": 9, "image": {"uri": "/x.png"}, "concepts": []}))
    assert out.task_id == "9" and out.error.code == "bad_request" and "at least one concept" in out.error.message


def test_interactive_prompt_without_concepts_still_labels_the_region(pipeline, image_path):
    req = _request(image_path, concepts=(), prompt=Prompt(box_xyxy_px=(20, 20, 120, 100)), prompt_label="cat")
    result = pipeline.run(req)
    assert result.ok and [r.label for r in result.regions] == ["cat"] and result.regions[0].embedding == ()
