"""LookHere as FlexAttention ``mask_mod`` / ``score_mod`` functions (attention-gym style).

The mask and the penalty are computed on the fly from each head's half-planes, penalty kind and
slope; the block mask (which tiles of the attention matrix hold any visible key) is cached per
(grid, heads, prefix tokens, device) and shared by all layers, which differ only by a scalar
slope. On a GPU the kernel is compiled; on the CPU this path runs eagerly, for tests.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .config import LookHereConfig
from .masks import HeadSpec, head_tables

Tensor = torch.Tensor


def _token_coords(grid: tuple[int, int], p: int, device) -> tuple[Tensor, Tensor]:
    gy, gx = grid
    idx = (torch.arange(p + gy * gx, device=device) - p).clamp(min=0)
    return idx // gx, idx % gx


def lookhere_mask_mod(coef: Tensor, ys: Tensor, xs: Tensor, p: int):
    """``mask_mod(b, h, q, kv)``: prefix tokens are always visible; otherwise all half-planes hold."""

    def mask_mod(b, h, q_idx, kv_idx):
        dy = ys[kv_idx] - ys[q_idx]
        dx = xs[kv_idx] - xs[q_idx]
        seen = (q_idx < p) | (kv_idx < p)
        ok = seen | (q_idx >= 0)  # all True, with the right shape
        for c in range(coef.shape[1]):
            ok = ok & (seen | (coef[h, c, 0] * dy + coef[h, c, 1] * dx >= 0))
        return ok

    return mask_mod


def lookhere_score_mod(config: LookHereConfig, coef: Tensor, kind: Tensor, scale: Tensor, ys: Tensor,
                       xs: Tensor, grid: tuple[int, int], p: int):
    """``score_mod``: minus the head's scaled penalty (distance, 0, or the key's centre distance)."""
    gy, gx = grid
    cy, cx = (gy - 1) / 2, (gx - 1) / 2
    max_d2 = float((gy - 1) ** 2 + (gx - 1) ** 2)
    fill = config.fill_with

    def transform(d2):
        if config.distance == "square":
            return d2
        d = torch.sqrt(d2)
        return torch.sqrt(d) if config.distance == "sqrt" else d

    def score_mod(score, b, h, q_idx, kv_idx):
        ky, kx = ys[kv_idx], xs[kv_idx]
        dy, dx = ky - ys[q_idx], kx - xs[q_idx]
        dist = transform((dy * dy + dx * dx).to(torch.float32))
        centre = torch.sqrt((ky - cy) ** 2 + (kx - cx) ** 2)
        k = kind[h]
        pen = torch.where(k == 0, dist, torch.where(k == 2, centre, torch.zeros_like(dist)))
        if fill != "inf":
            seen = dy >= dy  # all True, with the right shape
            for c in range(coef.shape[1]):
                seen = seen & (coef[h, c, 0] * dy + coef[h, c, 1] * dx >= 0)
            if fill == "zero":
                pen = torch.where(seen, pen, torch.zeros_like(pen))
            else:
                top_dist = transform(torch.tensor(max_d2, device=dist.device))
                top = torch.where(k == 0, top_dist, torch.where(k == 2, torch.tensor(
                    (cy * cy + cx * cx) ** 0.5, device=dist.device), torch.zeros_like(top_dist)))
                pen = torch.where(seen, pen, top)
        prefix = (q_idx < p) | (kv_idx < p)
        return score - torch.where(prefix, torch.zeros_like(pen), scale[h] * pen)

    return score_mod


@lru_cache(maxsize=32)
def _block_mask(heads: tuple[HeadSpec, ...], grid: tuple[int, int], p: int, device: str, block: int):
    coef = head_tables(heads, device).coef
    ys, xs = _token_coords(grid, p, device)
    T = p + grid[0] * grid[1]
    return create_block_mask(lookhere_mask_mod(coef, ys, xs, p), None, len(heads), T, T, device=device,
                             BLOCK_SIZE=block)


_compiled = None


def _kernel(device: torch.device):
    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_lookhere_attention(q: Tensor, k: Tensor, v: Tensor, *, config: LookHereConfig,
                            heads: tuple[HeadSpec, ...], scales: list[float], grid: tuple[int, int],
                            num_prefix_tokens: int, block: int = 128) -> Tensor:
    device = q.device
    tables = head_tables(heads, device)
    ys, xs = _token_coords(grid, num_prefix_tokens, device)
    scale = torch.tensor(scales, dtype=torch.float32, device=device)
    score_mod = lookhere_score_mod(config, tables.coef, tables.kind, scale, ys, xs, grid, num_prefix_tokens)
    block_mask = None
    if config.fill_with == "inf":
        block_mask = _block_mask(heads, grid, num_prefix_tokens, str(device), block)
    with warnings.catch_warnings():
        # Eager flex on the CPU warns that it is slow; it is only used so for tests.
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        return _kernel(device)(q, k, v, score_mod=score_mod, block_mask=block_mask)
