"""Our proposal generator against segment-anything's SamAutomaticMaskGenerator: same weights, same settings, same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelassist.workers.contract import ProposalSettings
from labelassist.workers.proposals import ProposalGenerator, SamEngine, stability_score

from scenes import synthetic_scene

# Random weights give tiny logits (std ~0.01): the stock offset of 1.0 would make every
# stability score 0. These keep a few dozen masks, the regime the stock filters see with trained SAM.
RANDOM_WEIGHT_SETTINGS = dict(pred_iou_thresh=0.09, stability_score_thresh=0.5, stability_score_offset=0.005)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return SamEngine(tiny_models.sam, tiny_models.device, tiny_models.dtype)


def _reference(sam, image, settings: ProposalSettings):
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=settings.points_per_side, points_per_batch=64, pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh, stability_score_offset=settings.stability_score_offset,
        box_nms_thresh=settings.box_nms_thresh, crop_n_layers=settings.crop_n_layers,
        crop_overlap_ratio=settings.crop_overlap_ratio, crop_n_points_downscale_factor=settings.crop_n_points_downscale_factor,
        min_mask_region_area=settings.min_mask_region_area, output_mode="binary_mask",
    )
    return gen.generate(image)


def _best_ious(ref_masks, ours):
    out = []
    for m in ref_masks:
        inter = (ours & torch.as_tensor(m)).flatten(1).sum(1).float()
        union = (ours | torch.as_tensor(m)).flatten(1).sum(1).float()
        out.append(float((inter / union.clamp(min=1)).max()) if len(ours) else 0.0)
    return out


@pytest.mark.parametrize("extra", [
    dict(points_per_side=8),
    dict(points_per_side=8, box_nms_thresh=0.95),
    dict(points_per_side=4, crop_n_layers=1),
    dict(points_per_side=8, min_mask_region_area=30),
], ids=["grid", "loose-nms", "crops", "small-regions"])
def test_same_masks_as_reference(tiny_models, engine, extra):
    image = synthetic_scene((192, 256), seed=1)
    settings = ProposalSettings(**RANDOM_WEIGHT_SETTINGS, points_per_batch=64, **extra)
    ref = _reference(tiny_models.sam, image, settings)
    ours = ProposalGenerator(engine).generate(image, settings)
    assert len(ref) > 0, "settings must keep some masks, or the comparison proves nothing"
    assert ours.masks.shape[1:] == image.shape[:2]
    assert len(ours) == len(ref)
    assert min(_best_ious([a["segmentation"] for a in ref], ours.masks)) > 0.99
    # Same quality figures for the same masks.
    assert sorted(round(a["predicted_iou"], 4) for a in ref) == sorted(round(float(v), 4) for v in ours.predicted_iou)


def test_filters_at_low_resolution_lose_nothing(engine):
    """The low-res stability estimate stays within the prefilter margin of the exact score."""
    from labelassist.workers.proposals import STABILITY_PREFILTER_MARGIN

    image = synthetic_scene((256, 256), seed=2)
    emb = engine.embed(image)
    pts = torch.tensor([[x, y] for x in range(16, 256, 48) for y in range(16, 256, 48)], dtype=torch.float32)
    low, _ = engine.decode_points(emb, pts)
    low = low.flatten(0, 1)
    exact = stability_score(engine.upsample(emb, low), 0.005)
    approx = stability_score(engine.low_res_valid(emb, low), 0.005)
    assert float((exact - approx).abs().max()) < STABILITY_PREFILTER_MARGIN


def test_batches_padded_for_a_fixed_decoder_size_give_the_same_result(engine):
    image = synthetic_scene((128, 128), seed=3)
    emb = engine.embed(image)
    pts = torch.rand(10, 2) * 128
    a, ia = engine.decode_points(emb, pts)
    engine.fixed_batch = 4  # chunks of 4, 4 and 2 padded to 4
    try:
        b, ib = engine.decode_points(emb, pts)
    finally:
        engine.fixed_batch = None
    assert b.shape == a.shape and torch.allclose(a, b, atol=1e-5) and torch.allclose(ia, ib, atol=1e-5)


def test_interactive_prompt_gives_one_mask(engine):
    from labelassist.workers.contract import Prompt

    image = synthetic_scene((128, 160), seed=4)
    emb = engine.embed(image)
    for prompt in (Prompt(points_xy_px=((40, 50),), point_labels=(1,)),
                   Prompt(points_xy_px=((40, 50), (90, 90)), point_labels=(1, 0)),
                   Prompt(box_xyxy_px=(10, 10, 100, 90))):
        mask, iou = engine.predict_prompt(emb, prompt)
        assert mask.shape == (128, 160) and mask.dtype == torch.bool and np.isfinite(iou)


@pytest.mark.parametrize("side, levels, sizes", [(4, 2, [4, 12]), (8, 3, [4, 12, 48]), (5, 3, [4, 5, 16]), (3, 1, [9])])
def test_coarse_to_fine_rounds_cover_the_grid_once(side, levels, sizes):
    from segment_anything.utils.amg import build_point_grid

    from labelassist.workers.proposals import _coarse_to_fine

    rounds = _coarse_to_fine(build_point_grid(side), levels)
    assert [len(r) for r in rounds] == sizes
    assert sorted(np.concatenate(rounds).tolist()) == list(range(side * side))
    assert 0 in rounds[0]  # the coarsest lattice starts at the grid's corner


def test_covered_points_are_skipped_and_results_stay_close(tiny_models, engine):
    image = synthetic_scene((192, 256), seed=1)
    full = ProposalSettings(**RANDOM_WEIGHT_SETTINGS, points_per_side=8, points_per_batch=64)
    fast = ProposalSettings(**RANDOM_WEIGHT_SETTINGS, points_per_side=8, points_per_batch=64, skip_covered_points=True)
    calls = []
    decode = engine.decode_points
    engine.decode_points = lambda emb, pts: calls.append(len(pts)) or decode(emb, pts)
    try:
        exact = ProposalGenerator(engine).generate(image, full)
        n_full = sum(calls)
        calls.clear()
        skipped = ProposalGenerator(engine).generate(image, fast)
        n_fast = sum(calls)
    finally:
        del engine.decode_points
    assert n_full == 64 and n_fast < n_full
    assert len(exact) > 0 and len(skipped) > 0
    assert np.mean(_best_ious(list(exact.masks.numpy()), skipped.masks)) > 0.8
