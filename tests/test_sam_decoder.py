"""Our many-prompt mask decoder against segment-anything's MaskDecoder, same weights."""

from __future__ import annotations

import pytest
import torch

from labelassist.workers.sam_decoder import decode_masks


@pytest.mark.parametrize("prompt", ["points", "points+negative", "box", "box+point"])
@pytest.mark.parametrize("multimask", [True, False])
def test_same_output_as_the_stock_decoder(tiny_models, prompt, multimask):
    sam = tiny_models.sam
    gen = torch.Generator().manual_seed(0)
    b = 5
    features = torch.randn(1, sam.prompt_encoder.embed_dim, 64, 64, generator=gen)
    points = torch.rand(b, 2, 2, generator=gen) * 1024
    labels = torch.tensor([[1, 0]] * b) if "negative" in prompt else torch.ones(b, 2, dtype=torch.int64)
    boxes = torch.tensor([[100.0, 200.0, 600.0, 700.0]]).expand(b, 4)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(points, labels) if "point" in prompt else None,
                                           boxes=boxes if "box" in prompt else None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        stock, stock_iou = sam.mask_decoder(image_embeddings=features, image_pe=pe, sparse_prompt_embeddings=sparse,
                                            dense_prompt_embeddings=dense, multimask_output=multimask)
        ours, ours_iou = decode_masks(sam.mask_decoder, features, pe, sparse, dense[:1], multimask)
    assert ours.shape == stock.shape == (b, 3 if multimask else 1, 256, 256)
    assert torch.allclose(ours, stock, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours_iou, stock_iou, atol=1e-6)
