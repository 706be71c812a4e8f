"""The reference backend: SDPA with the bias built for one chunk of query rows at a time.

Works for every config and device. Only a chunk's bias rows exist at once, so memory per call
stays below ``H x T x T`` (and a fixed budget for large grids); the layer-independent penalties of
each chunk are cached in the plan, so a layer only scales them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import head_penalties
from .plan import AttentionPlan, table_dtype

# Elements of one chunk's bias (H x rows x T). 2**24 floats = 64 MiB.
CHUNK_ELEMENTS = 1 << 24
# Grids whose whole penalty table (H x N x N) is at most this many elements keep it between calls.
CACHE_ELEMENTS = 1 << 24


def chunk_rows(num_heads: int, tokens: int, num_patches: int) -> int:
    return max(1, min(num_patches, CHUNK_ELEMENTS // max(1, num_heads * tokens)))


def dense_attention(q, k, v, plan: AttentionPlan, layer: int, grid: tuple[int, int], num_prefix_tokens: int,
                    dropout_p: float = 0.0) -> torch.Tensor:
    B, H, T, D = q.shape
    p, n = num_prefix_tokens, grid[0] * grid[1]
    cfg, pattern = plan.config, plan.layer_pattern[layer]
    work = table_dtype(q.dtype)
    scale = plan.layer_scales(layer, q.dtype).to(q.device)[:, None, None]
    parts = []
    if p:
        parts.append(F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p))
    rows = chunk_rows(H, T, n)
    keep = H * n * n <= CACHE_ELEMENTS
    for start in range(0, n, rows):
        stop = min(n, start + rows)

        def build(start=start, stop=stop):
            return head_penalties(plan.patterns[pattern], cfg.distance, cfg.fill_with, grid, slice(start, stop),
                                  dtype=work, device=q.device)

        pen, fov = plan.cached(("dense", pattern, grid, start, stop, q.device, work), build) if keep else build()
        bias = (-(scale * pen)).masked_fill(~fov, float("-inf"))
        if p:
            bias = F.pad(bias, (p, 0))
        # A 4D mask broadcast over the batch lets CPU SDPA take its fused kernel (5x faster than 3D).
        mask = bias.to(q.dtype).expand(B, -1, -1, -1)
        parts.append(F.scaled_dot_product_attention(q[:, :, p + start:p + stop], k, v, attn_mask=mask,
                                                    dropout_p=dropout_p))
    return torch.cat(parts, dim=2)


def sdpa_in_chunks(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """SDPA where no fused CPU kernel applies (PaPE: value heads narrower than the query's), whose
    math path builds all ``B x H x T x S`` scores: 51 GB for a batch of 64 on a 64x64 grid. Calls of
    whole (image, head) pairs, or of one pair's query rows when a pair alone is over the budget, keep
    each to ``CHUNK_ELEMENTS`` scores and read only their own keys (query rows across every pair
    re-read all keys per call: up to 2.2x slower, ``benchmarks/pape_chunks.py``)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    rows = min(T, max(1, CHUNK_ELEMENTS // S))
    pairs = max(1, CHUNK_ELEMENTS // (rows * S)) if rows == T else 1
    if rows == T and pairs >= B * H:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    out = q3.new_empty(B * H, T, v.shape[-1])
    for i in range(0, B * H, pairs):
        for j in range(0, T, rows):
            out[i:i + pairs, j:j + rows] = F.scaled_dot_product_attention(
                q3[i:i + pairs, j:j + rows], k3[i:i + pairs], v3[i:i + pairs], dropout_p=dropout_p, scale=scale)
    return out.view(B, H, T, -1)
