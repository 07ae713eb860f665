"""Active-learning ranking of Label Studio tasks by our predictions' task scores."""

import pytest

from labelassist.backend.ranking import RankedTask, format_ranking, rank_tasks

V = "la-v1"


def task(tid, *preds, annotations=0):
    return {"id": tid, "total_annotations": annotations, "predictions": [
        {"id": i, "model_version": v, "score": s, "result": [{}] * n, "created_at": f"2026-01-0{i + 1}"}
        for i, (v, s, n) in enumerate(preds)]}


@pytest.mark.parametrize("tasks, include_annotated, expected", [
    ([task(1, (V, 0.9, 2)), task(2, (V, 0.1, 5)), task(3, (V, 0.5, 1))], False,
     [RankedTask(2, 0.1, 5, False), RankedTask(3, 0.5, 1, False), RankedTask(1, 0.9, 2, False)]),
    ([task(1, ("other", 0.0, 1)), task(2, (V, 0.7, 1))], False,
     [RankedTask(2, 0.7, 1, False), RankedTask(1, None, 0, False)]),
    ([task(1, (V, 0.2, 1), annotations=1), task(2, (V, 0.3, 1))], False, [RankedTask(2, 0.3, 1, False)]),
    ([task(1, (V, 0.2, 1), annotations=1), task(2, (V, 0.3, 1))], True,
     [RankedTask(1, 0.2, 1, True), RankedTask(2, 0.3, 1, False)]),
    ([task(5, (V, 0.4, 1), (V, 0.8, 3))], False, [RankedTask(5, 0.8, 3, False)]),  # the latest prediction counts
    ([task(2, (V, 0.4, 1)), task(1, (V, 0.4, 1))], False, [RankedTask(1, 0.4, 1, False), RankedTask(2, 0.4, 1, False)]),
    ([task(1, (V, None, 0))], False, [RankedTask(1, 0.0, 0, False)]),
    ([], False, []),
], ids=["by-score", "other-version-unscored", "annotated-skipped", "annotated-included", "latest", "ties-by-id",
        "missing-score", "empty"])
def test_rank_tasks(tasks, include_annotated, expected):
    assert rank_tasks(tasks, V, include_annotated) == expected


def test_format_ranking_marks_unscored():
    text = format_ranking([RankedTask(2, 0.125, 3, False), RankedTask(1, None, 0, False)], V)
    assert "1 scored, 1 unscored" in text
    rows = text.splitlines()[2:]
    assert rows[0].split() == ["2", "0.1250", "3", "no"] and rows[1].split() == ["1", "-", "0", "no"]
