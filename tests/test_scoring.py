"""Concept scoring: the label decision table, and the CLIP path on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelassist.workers.contract import Concept, ScoringSettings
from labelassist.workers.errors import ConceptError
from labelassist.workers.scoring import ConceptScorer, assign_labels

from scenes import synthetic_scene

CAT_DOG = (Concept("cat"), Concept("dog", threshold=0.6))
ALL_PRESENT = torch.tensor([True, True])

# probs rows are (cat, dog, background); expected (label, score, margin)
ASSIGN_CASES = [
    ("clear cat", [0.8, 0.1, 0.1], ALL_PRESENT, {}, ("cat", 0.8, 0.7)),
    ("background wins", [0.2, 0.1, 0.7], ALL_PRESENT, {}, ("", 0.2, 0.0)),
    ("under label threshold", [0.25, 0.2, 0.15], ALL_PRESENT, {"label_threshold": 0.3}, ("", 0.25, 0.05)),
    ("dog under its own threshold", [0.1, 0.55, 0.35], ALL_PRESENT, {}, ("", 0.55, 0.2)),
    ("dog over its own threshold", [0.1, 0.65, 0.25], ALL_PRESENT, {}, ("dog", 0.65, 0.4)),
    ("margin too small", [0.45, 0.43, 0.12], ALL_PRESENT, {"min_margin": 0.05}, ("", 0.45, 0.02)),
    ("gated concept cannot win", [0.8, 0.15, 0.05], torch.tensor([False, True]),
     {"label_threshold": 0.1, "min_margin": 0.0, "concepts": (Concept("cat"), Concept("dog"))}, ("dog", 0.15, 0.0)),
    ("gated runner-up still counts for the margin", [0.15, 0.8, 0.05], torch.tensor([True, False]), {"label_threshold": 0.1},
     ("", 0.15, 0.0)),
]


@pytest.mark.parametrize("name, row, present, overrides, expected", ASSIGN_CASES, ids=[c[0] for c in ASSIGN_CASES])
def test_assign_labels(name, row, present, overrides, expected):
    overrides = dict(overrides)
    concepts = overrides.pop("concepts", CAT_DOG)
    settings = ScoringSettings(**{"label_threshold": 0.3, "min_margin": 0.05, **overrides})
    labels, scores, margins = assign_labels(torch.tensor([row]), present, concepts, settings)
    assert labels[0] == expected[0]
    assert scores[0] == pytest.approx(expected[1], abs=1e-6)
    assert margins[0] == pytest.approx(expected[2], abs=1e-6)


def test_assign_labels_empty():
    labels, scores, margins = assign_labels(torch.zeros((0, 3)), ALL_PRESENT, CAT_DOG, ScoringSettings())
    assert labels == [] and scores.shape == (0,) and margins.shape == (0,)


@pytest.fixture(scope="module")
def scorer(tiny_models):
    return ConceptScorer(tiny_models.clip, tiny_models.device, tiny_models.dtype)


def test_text_bank_cached_per_concept_set(scorer):
    a = scorer.text_bank(CAT_DOG, ("background",))
    assert scorer.text_bank(CAT_DOG, ("background",)) is a
    assert a.embeddings.shape[0] == 3
    assert torch.allclose(a.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    synonyms = scorer.text_bank((Concept("cat", ("cat", "kitten")), Concept("dog")), ("background",))
    assert synonyms is not a and not torch.allclose(synonyms.embeddings[0], a.embeddings[0])
    with pytest.raises(ConceptError, match="at least one label"):
        scorer.text_bank((), ("background",))


def test_score_masks_on_an_image(scorer):
    image = synthetic_scene((96, 128), seed=5)
    masks = torch.zeros((3, 96, 128), dtype=torch.bool)
    masks[0, 10:40, 10:50] = True
    masks[1, 50:90, 60:120] = True
    masks[2, 0:5, 0:5] = True
    boxes = torch.tensor([[10, 10, 49, 39], [60, 50, 119, 89], [0, 0, 4, 4]], dtype=torch.float32)
    out = scorer.score(image, masks, boxes, CAT_DOG, ScoringSettings(label_threshold=0.0, min_margin=0.0))
    assert len(out.labels) == 3 and out.probs.shape == (3, 3)
    assert np.allclose(out.probs.sum(1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-4)
    assert set(out.image_probs) == {"cat", "dog"}
    # Masked crops differ from plain box crops: the outside of the mask is greyed.
    img = torch.as_tensor(image).permute(2, 0, 1).float() / 255
    half = masks.clone()
    half[0, :, 30:] = False
    plain = scorer.encode_crops(img, boxes[:1], None, 0.1)
    masked = scorer.encode_crops(img, boxes[:1], half[:1], 0.1)
    assert not torch.allclose(plain, masked)
    # No background prompts: no background class, and still finite probabilities.
    open_set = scorer.score(image, masks, boxes, (Concept("cat"), Concept("dog")), ScoringSettings(background_prompts=(), label_threshold=0.0, min_margin=0.0))
    assert np.isfinite(open_set.probs).all() and np.allclose(open_set.probs[:, -1], 0.0)
    assert all(label in ("cat", "dog") for label in open_set.labels)
    none = scorer.score(image, masks[:0], boxes[:0], CAT_DOG, ScoringSettings())
    assert none.labels == [] and none.embeddings.shape[0] == 0
