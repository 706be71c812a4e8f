"""Attention in chunks of query rows under one memory budget, for any additive bias.

LookHere's dense backend and the offset biases (FIRE, the learned relative table, 2D-ALiBi) build
biases whose full ``H x T x T`` size is what breaks at a large grid; they share this budget.
"""

from __future__ import annotations

# Elements of one chunk's bias (H x rows x T). 2**24 floats = 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(num_heads: int, tokens: int, num_patches: int) -> int:
    """Query rows per chunk: as many as keep one chunk's ``heads x rows x tokens`` within the budget."""
    return max(1, min(num_patches, CHUNK_ELEMENTS // max(1, num_heads * tokens)))
