"""The reference backend: SDPA with the bias built for one chunk of query rows at a time.

Works for every config and device. Only a chunk's bias rows exist at once, so memory per call
stays below ``H x T x T`` (and a fixed budget for large grids); the layer-independent penalties of
each chunk are cached in the plan, so a layer only scales them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import chunk_rows
from .geometry import head_penalties
from .plan import AttentionPlan, table_dtype

# Grids whose whole penalty table (H x N x N) is at most this many elements keep it between calls.
CACHE_ELEMENTS = 1 << 24


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
