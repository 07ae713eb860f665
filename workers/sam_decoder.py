"""SAM's mask decoder for many prompts on one image, without repeating the image per prompt.

segment-anything's ``MaskDecoder`` copies the image embedding once per prompt
and runs the first transformer block's image-side projections on every copy,
though they are the same for all prompts until the first image-to-token
attention mixes prompt tokens in. This forward keeps the image side at batch 1
until then (broadcasting instead of copying), and computes only the masks the
caller keeps. Same weights, same arithmetic up to float rounding; the tests
compare it with the stock module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _attention(attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """segment-anything's ``Attention.forward``, with k and v allowed a batch of 1 that broadcasts."""
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    heads = attn.num_heads

    def split(x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ v
    b, h, n, d = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _block(layer, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
    if layer.skip_first_layer_pe:
        queries = _attention(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + _attention(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)
    k = keys + key_pe
    queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    # Image to token: the image side (q) may still be batch 1; the result is per prompt.
    attn_out = _attention(layer.cross_attn_image_to_token, k, queries + query_pe, queries)
    keys = layer.norm4(keys + attn_out)
    return queries, keys


def decode_masks(decoder, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                 multimask: bool) -> tuple[Tensor, Tensor]:
    """Masks and IoU predictions for B prompts on one image, as ``MaskDecoder.forward``.

    ``image_embeddings``, ``image_pe``: (1, C, h, w). ``sparse``: (B, T, C) prompt tokens.
    ``dense``: (1 or B, C, h, w) dense prompt embeddings; batch 1 when no mask prompts
    (then it is the same "no mask" embedding for every prompt). Returns low-res logits
    (B, M, 4h, 4w) and IoU predictions (B, M), M = 3 with ``multimask`` else 1.
    """
    b = sparse.shape[0]
    _, c, h, w = image_embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)

    keys = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (1 or B, hw, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    transformer = decoder.transformer
    for layer in transformer.layers:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    attn_out = _attention(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    queries = transformer.norm_final_attn(queries + attn_out)

    keys = keys.expand(b, -1, -1) if keys.shape[0] != b else keys
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    # Only the mask tokens the caller keeps: 1..3 for multimask, 0 otherwise.
    wanted = range(1, decoder.num_mask_tokens) if multimask else range(0, 1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in wanted], dim=1)
    _, uc, uh, uw = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, uc, uh * uw)).reshape(b, -1, uh, uw)
    iou = decoder.iou_prediction_head(queries[:, 0, :])
    iou = iou[:, 1:] if multimask else iou[:, :1]
    return masks, iou
