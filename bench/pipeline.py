"""Benchmark: labelassist's pipeline against the straightforward reference, same weights, images and settings.

Reference: segment-anything's ``SamAutomaticMaskGenerator``, then for each mask a
box crop through the CLIP model's own preprocessing and one CLIP forward per
crop (batch size 1), then ``cv2.findContours`` + ``approxPolyDP`` per mask.
Ours: ``labelassist.workers.pipeline.Pipeline.run`` end to end (image file in,
regions with polygons, RLE and CLIP embeddings out).

Both run in one process, alternating, on the same synthetic scenes. Each timed
run of ours starts with an empty embedding cache, so the encoder is paid every
time. Ours runs with the compiled mask decoder, as a resident worker does; the
compilation happens in an untimed warm-up run.

With random weights (``--models tiny-random``, the only weights this machine
has), SAM's logits are tiny (std ~0.03) and its predicted IoUs near 0, so the
stock thresholds reject every mask. Random masks also barely depend on the
prompt, so box NMS would keep one of them. The benchmark therefore uses
thresholds at which both implementations keep tens to ~150 masks per image, the
count trained SAM keeps at stock settings, with box NMS off (``BENCH_*`` below),
and says so in its output. Figures measure these random-weight models, not SAM or CLIP as trained.

Ours runs twice per round: "exact", with the reference's settings, and "fast",
the same plus ``skip_covered_points`` (decode a coarse grid first, then only the
points no kept mask covers). The last two lines give both; the very last is "fast":
``speedup_vs_reference: <ratio> mask_parity: <mean best IoU of reference masks to ours>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

BENCH_PRED_IOU_THRESH = 0.09
BENCH_STABILITY_SCORE_THRESH = 0.5
BENCH_STABILITY_SCORE_OFFSET = 0.005
BENCH_BOX_NMS_THRESH = 1.0  # random masks are near-duplicates of each other: NMS would keep one
CONCEPTS = ("cat", "dog", "car", "tree")
MAX_VERTICES = 64

log = logging.getLogger("bench.pipeline")


def synthetic_scene(size: int, seed: int) -> np.ndarray:
    """A flat background with overlapping discs, boxes and a ring: (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(10):
        cx, cy = rng.integers(0, size, 2)
        r = rng.integers(size // 30, size // 6)
        colour = rng.integers(0, 256, 3)
        kind = rng.integers(0, 3)
        if kind == 0:
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
        elif kind == 1:
            img[(abs(xx - cx) < r) & (abs(yy - cy) < r // 2)] = colour
        else:
            d = (xx - cx) ** 2 + (yy - cy) ** 2
            img[(d < r * r) & (d > (r // 2) ** 2)] = colour
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


class Reference:
    """The straightforward implementation a user would write first."""

    def __init__(self, models, settings, concepts):
        import torch
        from segment_anything import SamAutomaticMaskGenerator

        self.torch = torch
        self.models = models
        self.generator = SamAutomaticMaskGenerator(
            models.sam,
            points_per_side=settings.points_per_side,
            pred_iou_thresh=settings.pred_iou_thresh,
            stability_score_thresh=settings.stability_score_thresh,
            stability_score_offset=settings.stability_score_offset,
            box_nms_thresh=settings.box_nms_thresh,
            output_mode="binary_mask",
        )
        clip = models.clip
        with torch.inference_mode():
            tokens = clip.tokenizer([f"a photo of a {c}." for c in concepts]).to(models.device)
            text = clip.model.encode_text(tokens).float()
            self.text = text / text.norm(dim=-1, keepdim=True)

    def run(self, image: np.ndarray) -> list[dict]:
        import cv2
        from PIL import Image

        torch = self.torch
        clip = self.models.clip
        anns = self.generator.generate(image)
        out = []
        for ann in anns:
            mask = ann["segmentation"]
            x, y, w, h = (int(v) for v in ann["bbox"])
            crop = Image.fromarray(image[y : y + max(h, 1), x : x + max(w, 1)])
            with torch.inference_mode():
                emb = clip.model.encode_image(clip.preprocess(crop)[None].to(self.models.device)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            probs = torch.softmax(100.0 * emb @ self.text.T, dim=-1)[0]
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polys = [cv2.approxPolyDP(c, 1.0, True)[:, 0, :] for c in contours if len(c) >= 3]
            out.append({"mask": mask, "label": int(probs.argmax()), "polygons": polys})
        return out


def mask_parity(ref_masks: list[np.ndarray], our_masks: list[np.ndarray]) -> float:
    """Mean over reference masks of the best IoU with any of ours (1.0 when the reference has none)."""
    if not ref_masks:
        return 1.0
    if not our_masks:
        return 0.0
    ours = np.stack([m.reshape(-1) for m in our_masks]).astype(np.float32)
    best = []
    for m in ref_masks:
        r = m.reshape(-1).astype(np.float32)
        inter = ours @ r
        union = ours.sum(1) + r.sum() - inter
        best.append(float(np.max(inter / np.maximum(union, 1))))
    return float(np.mean(best))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny-random models, 1024x1024, points_per_side 32, 3 timed rounds")
    ap.add_argument("--models", default="tiny-random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, each one image through both")
    ap.add_argument("--no-compile", action="store_true", help="run our mask decoder eagerly")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.size, args.points_per_side, args.rounds = "tiny-random", 1024, 32, 3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from PIL import Image

    from labelassist.workers import geometry
    from labelassist.workers.contract import (
        Concept, GeometrySettings, ImageSource, PredictRequest, ProposalSettings, ScoringSettings,
    )
    from labelassist.workers.models import ModelSpec, load_models
    from labelassist.workers.pipeline import EmbeddingCache, Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(ModelSpec.preset(args.models), device=args.device)
    random_weights = bool(models.provenance.get("random_weights"))
    proposals = ProposalSettings(
        points_per_side=args.points_per_side,
        pred_iou_thresh=BENCH_PRED_IOU_THRESH if random_weights else 0.88,
        stability_score_thresh=BENCH_STABILITY_SCORE_THRESH if random_weights else 0.95,
        stability_score_offset=BENCH_STABILITY_SCORE_OFFSET if random_weights else 1.0,
        box_nms_thresh=BENCH_BOX_NMS_THRESH if random_weights else 0.7,
    )
    # Keep every proposal, labelled or not, so both sides return the same mask set.
    scoring = ScoringSettings(label_threshold=0.0, min_margin=0.0, keep_unlabeled=True)
    concepts = tuple(Concept(c) for c in CONCEPTS)
    ours = Pipeline(models, compile_decoder=not args.no_compile)
    ref = Reference(models, proposals, CONCEPTS)

    tmp = Path(tempfile.mkdtemp(prefix="labelassist-bench-"))

    def request(i: int) -> PredictRequest:
        path = tmp / f"scene{i}.png"
        if not path.exists():
            Image.fromarray(synthetic_scene(args.size, i)).save(path)
        return PredictRequest(task_id=i, image=ImageSource(str(path)), concepts=concepts, model_version=models.version,
                              proposals=proposals, scoring=scoring, geometry=GeometrySettings(max_vertices=MAX_VERTICES))

    log.info("models %s on %s; random weights: %s", models.version, models.device, random_weights)
    if random_weights:
        log.info("random weights: thresholds set so both keep masks: pred_iou_thresh=%s stability_score_thresh=%s "
                 "stability_score_offset=%s box_nms_thresh=%s", proposals.pred_iou_thresh, proposals.stability_score_thresh,
                 proposals.stability_score_offset, proposals.box_nms_thresh)
    t = time.perf_counter()
    warm = ours.run(request(1000))
    log.info("warm-up of ours (decoder compilation, untimed): %.1f s, %d regions", time.perf_counter() - t, len(warm.regions))

    fast = replace(proposals, skip_covered_points=True)
    variants = {"exact": proposals, "fast": fast}
    times: dict[str, list[float]] = {"reference": [], "exact": [], "fast": []}
    parity: dict[str, list[float]] = {"exact": [], "fast": []}
    counts: list[dict[str, int]] = []
    for r in range(args.rounds):
        req = request(r)
        image = np.array(Image.open(req.image.uri).convert("RGB"))
        order = ["reference", "exact", "fast"]
        order = order[r % 3:] + order[: r % 3]  # rotate which goes first
        out = {}
        for name in order:
            if name == "reference":
                fn = lambda: ref.run(image)  # noqa: E731
            else:
                ours.embeddings = EmbeddingCache(ours.limits.embedding_cache_size)
                fn = lambda name=name: ours.run(replace(req, proposals=variants[name]))  # noqa: E731
            t = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t)
        ref_masks = [a["mask"] for a in out["reference"]]
        counts.append({"reference": len(ref_masks)})
        for name in variants:
            result = out[name]
            if result.error is not None:
                raise SystemExit(f"our pipeline ({name}) failed: {result.error}")
            our_masks = [geometry.rle_to_mask(reg.rle) for reg in result.regions]
            parity[name].append(mask_parity(ref_masks, our_masks))
            counts[-1][name] = len(our_masks)
            log.info("round %d %s: %.2f s (%d regions; %s), parity %.4f", r, name, times[name][-1], len(our_masks),
                     ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s.items()), parity[name][-1])
        log.info("round %d reference: %.2f s (%d masks)", r, times["reference"][-1], len(ref_masks))

    med = {k: statistics.median(v) for k, v in times.items()}
    figures = {
        "models": models.version, "random_weights": random_weights, "device": str(models.device),
        "torch_threads": torch.get_num_threads(), "size": args.size, "points_per_side": args.points_per_side,
        "settings": {"pred_iou_thresh": proposals.pred_iou_thresh, "stability_score_thresh": proposals.stability_score_thresh,
                     "stability_score_offset": proposals.stability_score_offset, "box_nms_thresh": proposals.box_nms_thresh},
        "seconds": times, "mask_counts": counts, "parity": parity, "compiled_decoder": not args.no_compile,
        "images_per_s": {k: 1.0 / v for k, v in med.items()},
        "speedup": {k: med["reference"] / med[k] for k in variants},
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    print(f"exact (same settings as the reference): speedup_vs_reference: {figures['speedup']['exact']:.2f} "
          f"mask_parity: {np.mean(parity['exact']):.4f}")
    print(f"speedup_vs_reference: {figures['speedup']['fast']:.2f} mask_parity: {np.mean(parity['fast']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
