"""Attention in chunks of query rows under one memory budget, for any additive bias or score path.

LookHere's dense backend, the offset biases (FIRE, the learned relative table, 2D-ALiBi) and PaPE's
widened queries all build scores or biases whose full ``H x T x T`` size is what breaks at a large
grid; they share this budget and these two helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk's bias (H x rows x T). 2**24 floats = 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(num_heads: int, tokens: int, num_patches: int) -> int:
    """Query rows per chunk: as many as keep one chunk's ``heads x rows x tokens`` within the budget."""
    return max(1, min(num_patches, CHUNK_ELEMENTS // max(1, num_heads * tokens)))


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
