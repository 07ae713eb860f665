"""Automatic mask proposals on SAM's image encoder and mask decoder, built for speed.

Same settings and, where it matters, the same arithmetic as segment-anything's
``SamAutomaticMaskGenerator``, so results carry over; what differs is where the
work happens:

- prompts are decoded in large batches against one image embedding;
- masks are filtered *before* upsampling: the predicted IoU is independent of
  resolution, so that filter is exact at 256x256; the stability score is
  estimated at 256x256 and only masks within ``STABILITY_PREFILTER_MARGIN`` of
  the threshold are upsampled, where the exact full-resolution score decides;
- boxes, NMS and de-duplication run on the device, and masks reach the host once.

The stock generator upsamples all ``3 * points_per_side**2`` masks to full
resolution in fp32 and builds RLE mask by mask; at 1024x1024 that is ~3 billion
interpolated values per image, most of them thrown away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops.boxes import batched_nms

from labelassist.workers.contract import Prompt, ProposalSettings
from labelassist.workers.sam_decoder import decode_masks

log = logging.getLogger(__name__)

# Masks whose low-resolution stability is this far below the threshold are still
# upsampled and checked exactly; measured on random and real-shaped logits, the
# 256 -> 1024 estimate errs by well under this (bench/pipeline.py reports parity).
STABILITY_PREFILTER_MARGIN = 0.05
# Duplicates are first dropped by NMS on low-res boxes at this much looser an IoU,
# then NMS runs again, exactly, on full-resolution boxes of what is left.
NMS_PREFILTER_SLACK = 0.1
COARSE_TO_FINE_LEVELS = 3  # skip_covered_points: grid strides 4, 2, 1
UPSAMPLE_CHUNK = 64
# The compiled decoder's one batch size: per-prompt cost is flat from 32 to 256 on a
# CPU, and a small batch wastes little padding on the short coarse-to-fine rounds.
COMPILED_DECODER_BATCH = 64  # masks upsampled at once: 64 x 1024 x 1024 fp32 is 256 MB
LOW_RES_SCALE = 4  # the mask decoder's logits are at 1/4 of the encoder's input size
MASK_THRESHOLD = 0.0  # SAM's logit threshold for a pixel to be in the mask
CROP_EDGE_ATOL_PX = 20.0  # as segment-anything: a box this close to an inner crop edge is cut off


@dataclass
class ImageEmbedding:
    """SAM's image embedding plus the sizes needed to map masks back.

    ``features``: (1, C, 64, 64) on the model's device. ``input_size``: (h, w) of
    the image after resizing its longest side to the encoder size.
    ``original_size``: (h, w) of the image (or crop) that was embedded.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class Proposals:
    """Masks kept by the generator, best first.

    ``masks``: (N, H, W) bool on the device, at the original image size.
    ``boxes_xyxy_px``: (N, 4) float. ``predicted_iou``, ``stability_score``: (N,).
    ``points_xy_px``: (N, 2), the prompt that produced each mask.
    """

    masks: torch.Tensor
    boxes_xyxy_px: torch.Tensor
    predicted_iou: torch.Tensor
    stability_score: torch.Tensor
    points_xy_px: torch.Tensor

    def __len__(self) -> int:
        return int(self.masks.shape[0])


class SamEngine:
    """Thin, stateless operations over one resident SAM model.

    Unlike ``SamPredictor`` it holds no per-image state, so one engine serves
    every job and embeddings can be cached outside it.
    """

    def __init__(self, sam, device: torch.device, dtype: torch.dtype):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam
        self.device = device
        self.dtype = dtype
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        # Set by compile(): the decoder then runs at one batch size, so short
        # batches are padded rather than compiled again.
        self.fixed_batch: int | None = None
        self._compiled_decoder = None

    def compile(self, batch: int = COMPILED_DECODER_BATCH) -> None:
        """Compile the mask decoder for prompt batches of ``batch``.

        On a CPU the decoder is memory-bound: fusing its element-wise chains cuts
        its time several-fold (see bench/pipeline.py). Worth it only in a
        resident worker; the first batches pay the compilation.
        """
        self._compiled_decoder = torch.compile(decode_masks, dynamic=False)
        self.fixed_batch = batch

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled)

    @torch.inference_mode()
    def embed(self, image_rgb: np.ndarray) -> ImageEmbedding:
        """Embed an RGB uint8 (H, W, 3) image."""
        resized = self.transform.apply_image(image_rgb)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        x = self.sam.preprocess(x.float())
        with self._autocast():
            features = self.sam.image_encoder(x)
        return ImageEmbedding(features.float(), tuple(resized.shape[:2]), tuple(image_rgb.shape[:2]))

    @torch.inference_mode()
    def decode(self, emb: ImageEmbedding, points_xy_px: torch.Tensor | None, point_labels: torch.Tensor | None,
               box_xyxy_px: torch.Tensor | None = None, multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode prompts; return (low-res logits (B, M, 256, 256) fp32, predicted IoU (B, M)).

        ``points_xy_px``: (B, P, 2) in pixels of the embedded image; ``point_labels``: (B, P).
        ``box_xyxy_px``: (B, 4). M is 3 with ``multimask`` else 1.
        """
        points = None
        if points_xy_px is not None:
            coords = self.transform.apply_coords_torch(points_xy_px.to(self.device, torch.float32), emb.original_size)
            points = (coords, point_labels.to(self.device))
        boxes = None
        if box_xyxy_px is not None:
            boxes = self.transform.apply_boxes_torch(box_xyxy_px.to(self.device, torch.float32), emb.original_size)
        with self._autocast():
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            # Without a mask prompt the dense embedding is the same for every prompt: pass one.
            inputs = (self.sam.mask_decoder, emb.features, self.sam.prompt_encoder.get_dense_pe(), sparse, dense[:1], multimask)
            low_res = None
            if self._compiled_decoder is not None and multimask and len(sparse) == self.fixed_batch:
                try:
                    low_res, iou = self._compiled_decoder(*inputs)
                except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager decoder gives the same masks
                    log.warning("compiled mask decoder failed (%s: %s); decoding eagerly from now on", type(exc).__name__, exc)
                    self._compiled_decoder = None
                    self.fixed_batch = None
            if low_res is None:
                low_res, iou = decode_masks(*inputs)
        return low_res.float(), iou.float()

    def decode_points(self, emb: ImageEmbedding, points_xy_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One positive point per prompt, (B, 2) px -> three candidate masks each, as ``decode``.

        With a compiled decoder the prompts go in chunks of its one batch size, the last padded.
        """
        step = self.fixed_batch or max(len(points_xy_px), 1)
        lows, ious = [], []
        for start in range(0, len(points_xy_px), step):
            chunk = points_xy_px[start : start + step]
            n = len(chunk)
            if n < step:
                chunk = torch.cat([chunk, chunk[-1:].expand(step - n, 2)])
            low_res, iou = self.decode(emb, chunk[:, None, :], torch.ones(len(chunk), 1, dtype=torch.int64))
            lows.append(low_res[:n])
            ious.append(iou[:n])
        if not lows:
            return self.decode(emb, points_xy_px[:, None, :], torch.ones(0, 1, dtype=torch.int64))
        return torch.cat(lows), torch.cat(ious)

    def upsample(self, emb: ImageEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, 256, 256) -> logits (N, H, W) at the original size, as SAM's postprocess_masks."""
        size = self.sam.image_encoder.img_size
        x = F.interpolate(low_res[:, None], (size, size), mode="bilinear", align_corners=False)
        x = x[..., : emb.input_size[0], : emb.input_size[1]]
        if tuple(emb.input_size) != tuple(emb.original_size):  # same size: bilinear would copy
            x = F.interpolate(x, emb.original_size, mode="bilinear", align_corners=False)
        return x[:, 0]

    def upsample_valid(self, emb: ImageEmbedding, low_valid: torch.Tensor) -> torch.Tensor:
        """``upsample`` for logits cut by ``low_res_valid(margin=1)``: the same values, as the rows
        and columns beyond never reach a pixel of the image."""
        low_size = self.sam.image_encoder.img_size // LOW_RES_SCALE
        pad_h, pad_w = low_size - low_valid.shape[-2], low_size - low_valid.shape[-1]
        return self.upsample(emb, F.pad(low_valid, (0, pad_w, 0, pad_h)) if pad_h or pad_w else low_valid)

    def low_res_valid(self, emb: ImageEmbedding, low_res: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """The part of the low-res logits that covers the image (plus ``margin`` rows and columns), not the padding."""
        size = low_res.shape[-1]
        scale = size / self.sam.image_encoder.img_size
        h = min(size, int(np.ceil(emb.input_size[0] * scale)) + margin)
        w = min(size, int(np.ceil(emb.input_size[1] * scale)) + margin)
        return low_res[..., :h, :w]

    @torch.inference_mode()
    def predict_prompt(self, emb: ImageEmbedding, prompt: Prompt) -> tuple[torch.Tensor, float]:
        """One interactive prompt -> (mask (H, W) bool, predicted IoU) of the best of SAM's candidates."""
        points = labels = box = None
        if prompt.points_xy_px:
            points = torch.tensor(prompt.points_xy_px, dtype=torch.float32)[None]
            labels = torch.tensor(prompt.point_labels, dtype=torch.int64)[None]
        if prompt.box_xyxy_px is not None:
            box = torch.tensor(prompt.box_xyxy_px, dtype=torch.float32)[None]
        # One point is ambiguous (part or whole?): ask for three and take the best.
        multimask = box is None and len(prompt.points_xy_px) == 1
        low_res, iou = self.decode(emb, points, labels, box, multimask=multimask)
        best = int(torch.argmax(iou[0]))
        logits = self.upsample(emb, low_res[0, best : best + 1])
        return logits[0] > MASK_THRESHOLD, float(iou[0, best])


def stability_score(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at +offset and -offset (segment-anything's definition). (N, H, W) -> (N,)."""
    high = (logits > MASK_THRESHOLD + offset).flatten(1).sum(1, dtype=torch.int32)
    low = (logits > MASK_THRESHOLD - offset).flatten(1).sum(1, dtype=torch.int32)
    return high / low.clamp(min=1)


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) int boxes, inclusive max (as segment-anything); empty masks give zeros."""
    from segment_anything.utils.amg import batched_mask_to_box

    return batched_mask_to_box(masks)


class ProposalGenerator:
    """SAM automatic proposals for one image, over its crops."""

    def __init__(self, engine: SamEngine):
        self.engine = engine

    def generate(self, image_rgb: np.ndarray, settings: ProposalSettings, embed=None) -> Proposals:
        """Proposals for an RGB uint8 (H, W, 3) image.

        ``embed(image_rgb, crop_box_xyxy) -> ImageEmbedding`` lets the caller cache
        embeddings; by default every crop is embedded afresh.
        """
        from segment_anything.utils.amg import build_all_layer_point_grids, generate_crop_boxes

        embed = embed or (lambda img, box: self.engine.embed(img))
        h, w = image_rgb.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes((h, w), settings.crop_n_layers, settings.crop_overlap_ratio)
        grids = build_all_layer_point_grids(settings.points_per_side, settings.crop_n_layers, settings.crop_n_points_downscale_factor)
        parts = []
        for crop_box, layer in zip(crop_boxes, layer_idxs):
            x0, y0, x1, y1 = crop_box
            crop = image_rgb[y0:y1, x0:x1]
            emb = embed(crop, tuple(crop_box))
            part = self._crop_proposals(emb, grids[layer], crop_box, (h, w), settings)
            parts.append((part, crop_box))
        if len(parts) == 1:
            return self._finish(parts[0][0], settings)
        merged = _cat([p for p, _ in parts])
        # Prefer masks from smaller crops, as segment-anything does.
        crop_area = torch.cat([
            torch.full((len(p),), float((b[2] - b[0]) * (b[3] - b[1])), device=merged.masks.device) for p, b in parts
        ])
        keep = batched_nms(merged.boxes_xyxy_px.float(), 1.0 / crop_area, torch.zeros_like(crop_area), settings.crop_nms_thresh)
        return self._finish(_select(merged, keep), settings)

    def _crop_proposals(self, emb: ImageEmbedding, grid: np.ndarray, crop_box: list[int], image_hw: tuple[int, int],
                        s: ProposalSettings) -> Proposals:
        eng = self.engine
        crop_h, crop_w = emb.original_size
        points = torch.as_tensor(grid * np.array([crop_w, crop_h]), dtype=torch.float32)
        whole_image = tuple(crop_box) == (0, 0, image_hw[1], image_hw[0])

        # 1. Decode the prompts; keep the masks that pass both quality filters, at low resolution.
        lows, ious, pts = [], [], []
        rounds = [points[r] for r in _coarse_to_fine(grid)] if s.skip_covered_points else [points]
        for n_round, round_points in enumerate(rounds):
            if n_round and lows:
                round_points = round_points[~self._covered(emb, torch.cat(lows), round_points)]
            for start in range(0, len(round_points), s.points_per_batch):
                batch = round_points[start : start + s.points_per_batch]
                low_res, iou = eng.decode_points(emb, batch)
                m = low_res.shape[1]
                # One row and column past the image: bilinear upsampling of the last image rows reads them.
                low_res = eng.low_res_valid(emb, low_res.flatten(0, 1), margin=1)
                iou = iou.flatten(0, 1)
                # Exact: the predicted IoU does not depend on resolution.
                keep = iou > s.pred_iou_thresh if s.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
                if s.stability_score_thresh > 0:
                    keep &= self._stable(emb, low_res, keep, s)
                idx = keep.nonzero()[:, 0]
                lows.append(low_res[idx])
                ious.append(iou[idx])
                pts.append(batch.to(iou.device).repeat_interleave(m, dim=0)[idx])
        if not lows:
            return _empty(image_hw, emb.features.device)
        low_res, iou, pts = torch.cat(lows), torch.cat(ious), torch.cat(pts)
        if len(iou) == 0:
            return _empty(image_hw, emb.features.device)

        # 2. Most survivors are duplicates NMS will drop: find them on low-res boxes
        # first, with slack, so only likely keepers are upsampled. Inner crops skip
        # this: their edge filter must see exact boxes before NMS does.
        if whole_image and s.box_nms_thresh < 1.0:
            approx_boxes = self._low_res_boxes(emb, eng.low_res_valid(emb, low_res) > MASK_THRESHOLD)
            pre = batched_nms(approx_boxes, iou, torch.zeros_like(iou), min(1.0, s.box_nms_thresh + NMS_PREFILTER_SLACK))
            low_res, iou, pts = low_res[pre], iou[pre], pts[pre]

        # 3. Full resolution for what is left: exact masks, stability and boxes.
        parts = []
        for start in range(0, len(iou), UPSAMPLE_CHUNK):
            sl = slice(start, start + UPSAMPLE_CHUNK)
            logits = eng.upsample_valid(emb, low_res[sl])
            stab = stability_score(logits, s.stability_score_offset)
            masks = logits > MASK_THRESHOLD
            del logits
            part = Proposals(masks, masks_to_boxes_xyxy(masks), iou[sl], stab, pts[sl])
            if s.stability_score_thresh > 0:
                part = _select(part, stab >= s.stability_score_thresh)
            if not whole_image:
                from segment_anything.utils.amg import is_box_near_crop_edge

                inner = ~is_box_near_crop_edge(part.boxes_xyxy_px, crop_box, [0, 0, image_hw[1], image_hw[0]], atol=CROP_EDGE_ATOL_PX)
                part = _select(part, inner)
            parts.append(part)
        part = _cat(parts)
        keep = batched_nms(part.boxes_xyxy_px.float(), part.predicted_iou, torch.zeros_like(part.predicted_iou), s.box_nms_thresh)
        return _uncrop(_select(part, keep), crop_box, image_hw)

    def _covered(self, emb: ImageEmbedding, low_res: torch.Tensor, points_xy_px: torch.Tensor) -> torch.Tensor:
        """Which points (N, 2) in px of the embedded image lie inside any of the low-res masks. (N,) bool."""
        union = (self.engine.low_res_valid(emb, low_res) > MASK_THRESHOLD).any(dim=0)
        coords = self.engine.transform.apply_coords_torch(points_xy_px.to(union.device), emb.original_size)
        ij = (coords / LOW_RES_SCALE).long()
        x = ij[:, 0].clamp(0, union.shape[1] - 1)
        y = ij[:, 1].clamp(0, union.shape[0] - 1)
        return union[y, x]

    def _stable(self, emb: ImageEmbedding, low_res: torch.Tensor, candidates: torch.Tensor, s: ProposalSettings) -> torch.Tensor:
        """Which masks pass the stability threshold, upsampling only those too close to call at low resolution."""
        approx = stability_score(self.engine.low_res_valid(emb, low_res), s.stability_score_offset)
        passed = approx >= s.stability_score_thresh + STABILITY_PREFILTER_MARGIN
        unsure = (candidates & ~passed & (approx >= s.stability_score_thresh - STABILITY_PREFILTER_MARGIN)).nonzero()[:, 0]
        for start in range(0, len(unsure), UPSAMPLE_CHUNK):
            idx = unsure[start : start + UPSAMPLE_CHUNK]
            exact = stability_score(self.engine.upsample_valid(emb, low_res[idx]), s.stability_score_offset)
            passed[idx] = exact >= s.stability_score_thresh
        return passed

    def _low_res_boxes(self, emb: ImageEmbedding, low_masks: torch.Tensor) -> torch.Tensor:
        """Boxes of low-res masks in original-image px (approximate to a few px), (N, 4) float."""
        boxes = masks_to_boxes_xyxy(low_masks).float()
        h_in, w_in = emb.input_size
        h, w = emb.original_size
        lr_h, lr_w = low_masks.shape[-2:]
        sx = (w_in / lr_w) * (w / w_in) if lr_w else 1.0
        sy = (h_in / lr_h) * (h / h_in) if lr_h else 1.0
        boxes[:, 0::2] = boxes[:, 0::2] * sx + torch.tensor([0.0, sx - 1], device=boxes.device)
        boxes[:, 1::2] = boxes[:, 1::2] * sy + torch.tensor([0.0, sy - 1], device=boxes.device)
        return boxes

    def _finish(self, p: Proposals, s: ProposalSettings) -> Proposals:
        if s.min_mask_region_area > 0 and len(p):
            p = _remove_small_regions(p, s.min_mask_region_area, s.box_nms_thresh)
        return p


def _coarse_to_fine(grid: np.ndarray, levels: int = COARSE_TO_FINE_LEVELS) -> list[np.ndarray]:
    """Indices of a square point grid (N, 2) in rounds: every 2**(levels-1)-th row and column
    first, then each finer lattice's new points. Together they are every index once."""
    side = int(round(np.sqrt(len(grid))))
    if side * side != len(grid):
        return [np.arange(len(grid))]
    row, col = np.divmod(np.arange(len(grid)), side)
    rounds, taken = [], np.zeros(len(grid), dtype=bool)
    for level in reversed(range(levels)):
        stride = 2**level
        on_lattice = (row % stride == 0) & (col % stride == 0) & ~taken
        rounds.append(np.flatnonzero(on_lattice))
        taken |= on_lattice
    return [r for r in rounds if len(r)]


def _select(p: Proposals, idx: torch.Tensor) -> Proposals:
    return Proposals(p.masks[idx], p.boxes_xyxy_px[idx], p.predicted_iou[idx], p.stability_score[idx], p.points_xy_px[idx])


def _cat(parts: list[Proposals]) -> Proposals:
    return Proposals(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("masks", "boxes_xyxy_px", "predicted_iou", "stability_score", "points_xy_px")))


def _empty(image_hw: tuple[int, int], device) -> Proposals:
    h, w = image_hw
    return Proposals(torch.zeros((0, h, w), dtype=torch.bool, device=device), torch.zeros((0, 4), device=device),
                     torch.zeros(0, device=device), torch.zeros(0, device=device), torch.zeros((0, 2), device=device))


def _uncrop(p: Proposals, crop_box: list[int], image_hw: tuple[int, int]) -> Proposals:
    x0, y0, x1, y1 = crop_box
    h, w = image_hw
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return p
    masks = F.pad(p.masks, (x0, w - x1, y0, h - y1), value=False)
    offset = torch.tensor([x0, y0, x0, y0], device=p.boxes_xyxy_px.device, dtype=p.boxes_xyxy_px.dtype)
    pts = p.points_xy_px + torch.tensor([x0, y0], device=p.points_xy_px.device, dtype=p.points_xy_px.dtype)
    return Proposals(masks, p.boxes_xyxy_px + offset, p.predicted_iou, p.stability_score, pts)


def _remove_small_regions(p: Proposals, min_area: int, nms_thresh: float) -> Proposals:
    """Drop small islands and fill small holes (segment-anything's post-processing), then NMS again."""
    from segment_anything.utils.amg import remove_small_regions

    masks_np = p.masks.cpu().numpy()
    fixed, scores = [], []
    for mask in masks_np:
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        fixed.append(mask)
        # Unchanged masks win NMS ties, as in segment-anything.
        scores.append(float(unchanged))
    masks = torch.as_tensor(np.stack(fixed), device=p.masks.device)
    boxes = masks_to_boxes_xyxy(masks)
    keep = batched_nms(boxes.float(), torch.tensor(scores, device=boxes.device), torch.zeros(len(boxes), device=boxes.device), nms_thresh)
    out = Proposals(masks, boxes, p.predicted_iou, p.stability_score, p.points_xy_px)
    return _select(out, keep)

