"""The learning-loop benchmark runs end to end (a short loop): webhook, store, train queue, head, new version."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_short_loop_trains_a_head_and_reports_before_and_after(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import assist_loop

    out_json = tmp_path / "loop.json"
    assert assist_loop.main(["--rounds", "1", "--tasks", "8", "--seed", "3", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"acceptance: \d+\.\d% -> \d+\.\d% edits_per_task: \d+\.\d\d -> \d+\.\d\d", lines[-1]), lines[-1]
    assert "label studio was told versions: 1" in lines[-2]
    rounds = json.loads(out_json.read_text())["rounds"]
    zero_shot, trained = rounds
    assert zero_shot["head"] is None and re.fullmatch(r"h[0-9a-f]{12}", trained["head"])
    assert trained["model_version"] == f"{zero_shot['model_version']}+{trained['head']}"
    # Every task was annotated and logged under its round's version.
    assert zero_shot["tasks"] == trained["tasks"] == 8
    report = trained["head_report"]
    assert 0 < report["examples"] <= zero_shot["predicted_regions"]  # judged predictions only, never hand-drawn regions
    assert report["label_accuracy_out_of_fold"] > report["label_accuracy_zero_shot"]
    sys.modules.pop("assist_loop", None)
