"""Row-slab LookHere attention for the CPU: masked keys are skipped and no bias is computed per call.

Most LookHere heads look to one side: their FOV lies in the half-plane above (or below, left of,
right of) the query. Reordering the patches (flip rows for "below", transpose for "left", both for
"right") turns every such head into an "above" head, for which a row of queries sees exactly the
rows up to its own: a contiguous prefix of the keys, CLS first. And since the bias depends on the
offset alone, the bias of a query row against rows ``0..r`` is a slice of one per-layer table
``(heads, gx, rows, gx)``: a view, not a computation. Each query row then runs one SDPA call on its
key prefix, so the masked half of the keys is never touched. Heads without a side run on all keys
with the same table trick.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .config import LookHereConfig
from .masks import HeadSpec, fov_from_tables, head_tables

Tensor = torch.Tensor

# The side a head's FOV lies on; "all" for heads that see both sides.
ORIENTATIONS = ("up", "down", "left", "right", "all")


def _original_offsets(o: str, dyn: Tensor, dxn: Tensor) -> tuple[Tensor, Tensor]:
    if o in ("up", "all"):
        return dyn, dxn
    if o == "down":
        return -dyn, dxn
    if o == "left":
        return dxn, dyn
    return dxn, -dyn  # right


def _layout(o: str, gy: int, gx: int, device) -> tuple[tuple[int, int], Tensor]:
    """The new grid shape and, for each new position (row-major), the original patch index."""
    y = torch.arange(gy, device=device)[:, None]
    x = torch.arange(gx, device=device)[None, :]
    orig = y * gx + x  # (gy, gx)
    if o == "down":
        orig = orig.flip(0)
    elif o == "left":
        orig = orig.t()
    elif o == "right":
        orig = orig.t().flip(0)
    return tuple(orig.shape), orig.reshape(-1)


@lru_cache(maxsize=64)
def head_groups(heads: tuple[HeadSpec, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Heads by orientation: the side their whole FOV lies on (checked on offsets up to 64)."""
    tables = head_tables(heads)
    r = torch.arange(-64, 65)
    fov = fov_from_tables(tables.coef, r[:, None], r[None, :])  # (H, 129, 129) over (dy, dx)
    dy, dx = r[:, None], r[None, :]
    sides = {"up": dy <= 0, "down": dy >= 0, "left": dx <= 0, "right": dx >= 0}
    groups: dict[str, list[int]] = {o: [] for o in ORIENTATIONS}
    for h in range(len(heads)):
        side = next((o for o, half in sides.items() if not (fov[h] & ~half).any()), "all")
        groups[side].append(h)
    return tuple((o, tuple(hs)) for o, hs in groups.items() if hs)


def supported(config: LookHereConfig, heads: tuple[HeadSpec, ...]) -> bool:
    """Translation-equivariant biases only: masks with -inf fill and no ``center`` heads."""
    return config.fill_with == "inf" and all(h.penalty != "center" for h in heads)


@lru_cache(maxsize=32)
def _unscaled_table(config: LookHereConfig, heads: tuple[HeadSpec, ...], o: str, grid: tuple[int, int],
                    device: str, rows_below: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Layer-independent parts of a group's bias table over (query column, key row offset, key
    column): the distance ``(gx', M, gx')`` shared by all heads, each head's FOV ``(G, gx', M, gx')``,
    which heads carry the distance penalty, and the layout permutation. Key row offsets run from
    ``-(gy'-1)`` to ``rows_below`` (one-sided heads never need more)."""
    gy, gx = grid
    (ny, nx), perm = _layout(o, gy, gx, device)
    group = dict(head_groups(heads))[o]
    tables = head_tables(tuple(heads[h] for h in group), device)
    xq = torch.arange(nx, device=device)[:, None, None]
    dyn = torch.arange(-(ny - 1), rows_below + 1, device=device)[None, :, None]
    dxn = torch.arange(nx, device=device)[None, None, :] - xq
    dy, dx = _original_offsets(o, dyn.expand(nx, -1, nx), dxn.expand(-1, dyn.shape[1], -1))
    fov = fov_from_tables(tables.coef, dy, dx)
    d2 = (dy * dy + dx * dx).float()
    dist = d2 if config.distance == "square" else d2.sqrt() if config.distance == "linear" else d2.sqrt().sqrt()
    return dist, fov, (tables.kind == 0), perm


def slab_attention(q: Tensor, k: Tensor, v: Tensor, *, config: LookHereConfig, heads: tuple[HeadSpec, ...],
                   scales: list[float], grid: tuple[int, int], num_prefix_tokens: int,
                   rows_per_call: int = 4, dropout_p: float = 0.0) -> Tensor:
    """LookHere attention for configs that :func:`supported` accepts."""
    gy, gx = grid
    p = num_prefix_tokens
    B, H, T, D = q.shape
    device = str(q.device)
    out = torch.empty_like(q)
    if p:
        out[:, :, :p] = F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p)
    for o, group in head_groups(heads):
        G = len(group)
        ny, nx = (gy, gx) if o in ("up", "down", "all") else (gx, gy)
        rows_below = ny - 1 if o == "all" else min(ny - 1, rows_per_call - 1)
        dist, fov, has_distance, perm = _unscaled_table(config, heads, o, grid, device, rows_below)
        scale = torch.tensor([scales[h] for h in group], dtype=torch.float32, device=q.device) * has_distance
        # This layer's table: -slope * distance inside the FOV, -inf outside; a row per head.
        table = (-(scale[:, None, None, None] * dist[None])).masked_fill_(~fov, float("-inf")).to(q.dtype)
        hs = torch.tensor(group, device=q.device)
        tokens = torch.cat([torch.arange(p, device=q.device), p + perm])
        qo = q.index_select(1, hs).index_select(2, tokens)
        ko = k.index_select(1, hs).index_select(2, tokens)
        vo = v.index_select(1, hs).index_select(2, tokens)
        res = torch.empty(B, G, ny * nx, D, dtype=q.dtype, device=q.device)
        for r0 in range(0, ny, rows_per_call):
            r1 = min(ny, r0 + rows_per_call) - 1
            key_rows = r1 + 1 if o != "all" else ny
            # Each query row's bias against key rows 0..key_rows-1 is a slice of the table.
            mask = torch.zeros(G, (r1 - r0 + 1) * nx, p + key_rows * nx, dtype=q.dtype, device=q.device)
            for r in range(r0, r1 + 1):
                top = ny - 1 - r  # table row of offset dy' = -r, i.e. key row 0
                mask[:, (r - r0) * nx:(r - r0 + 1) * nx, p:] = table[:, :, top: top + key_rows].flatten(2)
            end = p + key_rows * nx
            res[:, :, r0 * nx:(r1 + 1) * nx] = F.scaled_dot_product_attention(
                qo[:, :, p + r0 * nx: p + (r1 + 1) * nx], ko[:, :, :end], vo[:, :, :end],
                attn_mask=mask[None].expand(B, -1, -1, -1), dropout_p=dropout_p)
        full = torch.empty(B, G, gy * gx, D, dtype=q.dtype, device=q.device)
        full[:, :, perm] = res
        out[:, hs, p:] = full
    return out
