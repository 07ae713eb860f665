"""The fine-tuning exports (JSONL, COCO) and the ``corrections export`` / ``report`` commands."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from labelassist.backend import store as st
from labelassist.backend.cli import cli
from labelassist.plugin import corrections as c
from test_corrections import brush, poly, rect, square

PREDICTION = {
    "id": 41, "model_version": "v1",
    "result": [poly("p-cat", square(2, 2, 6, 6), label="cat", score=0.9, meta=c.prediction_meta([0.5, 0.5])),
               rect("p-dog", 12, 1, 4, 4, label="dog", score=0.3),
               brush("p-sky", 0, 0, 20, 1, label="sky", score=0.6)],
}


def annotation(aid, result, project=3, updated="2025-05-02T10:00:00Z"):
    return {"id": aid, "task": 100 + aid, "project": project, "updated_at": updated, "lead_time": 30.0,
            "parent_prediction": 41, "result": result}


FINAL = [
    poly("p-cat", square(2, 2, 6, 6), label="cat", origin="prediction"),
    rect("p-dog", 12, 1, 4, 4, label="cat", origin="prediction-changed"),
    brush("m-sky", 0, 5, 20, 7, label="sky", origin="manual"),  # apart from the proposal: an addition
]
TASK = {"id": 101, "data": {"image": "s3://bucket/pets/1.jpg"}}


@pytest.fixture
def diffed():
    return c.diff_annotation(annotation(1, FINAL), PREDICTION, task=TASK)


# (mask rows, expected COCO counts): column-major, first run of zeros
RLE_CASES = [
    ([[0, 0], [0, 0]], [4]),
    ([[1, 1], [1, 1]], [0, 4]),
    ([[0, 1], [0, 1]], [2, 2]),
    ([[1, 0], [0, 0]], [0, 1, 3]),
    ([[0, 0, 1], [1, 0, 1]], [1, 1, 2, 2]),
]


@pytest.mark.parametrize("rows,counts", RLE_CASES)
def test_mask_to_coco_rle(rows, counts):
    mask = np.array(rows, bool)
    rle = c.mask_to_coco_rle(mask)
    assert rle == {"size": list(mask.shape), "counts": counts}
    # decode by the definition and compare
    flat = np.concatenate([np.full(n, i % 2, bool) for i, n in enumerate(rle["counts"])])
    assert np.array_equal(flat.reshape(mask.shape, order="F"), mask)


def test_jsonl_record(diffed):
    rec = c.correction_record(diffed)
    assert (rec["annotation_id"], rec["task_id"], rec["image"], rec["model_version"]) == (1, 101, "s3://bucket/pets/1.jpg", "v1")
    by_kind = {(r["kind"], r["pred_region_id"] or r["final_region_id"]): r for r in rec["regions"]}
    cat = by_kind[("accepted", "p-cat")]
    assert cat["polygon_px"] == [[2, 2], [6, 2], [6, 6], [2, 6]] and cat["bbox_xywh_px"] == [2, 2, 4, 4] and cat["area_px"] == 25
    dog = by_kind[("relabeled", "p-dog")]
    assert (dog["label_from"], dog["label"], dog["iou"]) == ("dog", "cat", 1.0)
    assert len(dog["polygon_px"]) == 4  # rectangle corners
    assert by_kind[("deleted", "p-sky")]["polygon_px"] is None and by_kind[("deleted", "p-sky")]["label"] is None
    sky = by_kind[("added", "m-sky")]
    assert sky["rle"]["size"] == [10, 20] and sky["area_px"] == 40 and sky["bbox_xywh_px"] == [0, 5, 20, 2]
    assert "pred_embedding" not in cat
    assert c.correction_record(diffed, with_embeddings=True)["regions"][0]["pred_embedding"] == pytest.approx([0.5, 0.5], abs=1e-3)
    json.dumps(rec)  # plain JSON


def test_coco_document(diffed):
    other = c.diff_annotation(annotation(2, [poly("m1", square(1, 1, 3, 3), label="bird", origin="manual")]), None)
    doc = c.corrections_to_coco([diffed, other])
    assert [cat["name"] for cat in doc["categories"]] == ["bird", "cat", "sky"]
    assert [(im["id"], im["width"], im["height"]) for im in doc["images"]] == [(1, 20, 10), (2, 20, 10)]
    anns = doc["annotations"]
    assert len(anns) == 4  # the deleted proposal is not an object
    names = {cat["id"]: cat["name"] for cat in doc["categories"]}
    assert sorted((names[a["category_id"]], a["labelassist"]["kind"]) for a in anns) == [
        ("bird", "added"), ("cat", "accepted"), ("cat", "relabeled"), ("sky", "added")]
    poly_ann = next(a for a in anns if a["labelassist"]["final_region_id"] == "p-cat")
    assert poly_ann["segmentation"] == [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]] and poly_ann["bbox"] == [2, 2, 4, 4]
    brush_ann = next(a for a in anns if a["labelassist"]["final_region_id"] == "m-sky")
    assert brush_ann["segmentation"]["size"] == [10, 20] and sum(brush_ann["segmentation"]["counts"]) == 200
    json.dumps(doc)


@pytest.fixture
def data_dir(tmp_path, diffed):
    d = tmp_path / "data"
    with st.open_store(None, d / st.DEFAULT_DB_FILENAME) as s:
        s.add_correction(diffed)
        s.add_correction(c.diff_annotation(annotation(2, [], project=4), PREDICTION))
    return d


def test_cli_export_jsonl_and_coco(data_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "set.jsonl"
    res = runner.invoke(cli, ["corrections", "export", "--format", "jsonl", "--out", str(out), "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["annotation_id"] for r in lines] == [1, 2]
    res = runner.invoke(cli, ["corrections", "export", "--format", "coco", "--out", str(tmp_path / "c.json"), "--project", "3"],
                        env={"LABELASSIST_DATA_DIR": str(data_dir)})
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert [im["id"] for im in doc["images"]] == [1] and len(doc["annotations"]) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_report(data_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["report", "--project", "3", "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    assert "project 3" in res.output and "v1" in res.output and "dog -> cat: 1" in res.output
    res = runner.invoke(cli, ["report", "--json", "--data-dir", str(data_dir)])
    numbers = json.loads(res.output)
    assert numbers["total"]["annotations"] == 2 and numbers["total"]["deleted"] == 1 + 3
    png = tmp_path / "report.png"
    res = runner.invoke(cli, ["report", "--data-dir", str(data_dir), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_cli_reports_a_bad_store_url(tmp_path):
    res = CliRunner().invoke(cli, ["report", "--corrections-url", "mysql://x/y", "--data-dir", str(tmp_path)])
    assert res.exit_code != 0 and "expected postgresql://" in res.output
