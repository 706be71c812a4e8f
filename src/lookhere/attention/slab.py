"""The CPU fast path: masked keys are skipped and no bias is computed per call.

Heads whose FOV is a wedge, a quadrant, a cone or a turned half-plane run tile by tile: a tile of
query patches attends only to the keys some of its queries can see (in every key row one contiguous
range of columns), with its bias block built once per grid (minus the unscaled penalty, ``-inf``
outside each query's FOV) and only scaled per layer. With the released presets this does a third
to a quarter of the unmasked work for such heads.

Heads whose FOV is an axis-aligned half-plane, and unmasked heads, run in row slabs: reordering the
patches (flip rows for "below", transpose for "left", both for "right") turns every one-sided head
into an "above" head, for which a row of queries sees exactly the rows up to its own: a contiguous
prefix of the keys, CLS first. Since the bias depends on the offset alone, the bias of a query row
against rows ``0..r`` is a slice of one per-layer table ``(heads, gx, rows, gx)``. Unmasked heads
run on all keys with the same table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import field_of_view, patch_coords, transform_distance
from .plan import SIDES, AttentionPlan, table_dtype

Tensor = torch.Tensor


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


def side_groups(sides: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Head indices by the side their FOV lies on, in the order of :data:`SIDES`."""
    return tuple((o, tuple(h for h, s in enumerate(sides) if s == o)) for o in SIDES if o in sides)


def _unscaled_table(plan: AttentionPlan, pattern: int, o: str, group: tuple[int, ...], grid: tuple[int, int],
                    device, rows_below: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Layer-independent parts of a group's bias table over (query column, key row offset, key
    column): the distance ``(gx', M, gx')`` shared by all heads, each head's FOV ``(G, gx', M, gx')``,
    which heads carry the distance penalty, and the layout permutation. Key row offsets run from
    ``-(gy'-1)`` to ``rows_below`` (one-sided heads never need more)."""
    gy, gx = grid
    (ny, nx), perm = _layout(o, gy, gx, device)
    idx = torch.tensor(group, device=plan.coef.device)
    coef, kind = plan.coef[pattern, idx].to(device), plan.kind[pattern, idx].to(device)
    xq = torch.arange(nx, device=device)[:, None, None]
    dyn = torch.arange(-(ny - 1), rows_below + 1, device=device)[None, :, None]
    dxn = torch.arange(nx, device=device)[None, None, :] - xq
    dy, dx = _original_offsets(o, dyn.expand(nx, -1, nx), dxn.expand(-1, dyn.shape[1], -1))
    fov = field_of_view(coef, dy, dx)
    dist = transform_distance((dy * dy + dx * dx).to(dtype), plan.config.distance)
    return dist, fov, (kind == 0), perm


def tile_groups(heads) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Heads for the row slabs (an axis-aligned half-plane, or no mask) and the rest by FOV: heads with
    the same half-planes share their tiles."""
    rows, tiled = [], {}
    for i, h in enumerate(heads):
        c = h.constraints
        if len(c) == 0 or (len(c) == 1 and 0 in c[0]):
            rows.append(i)
        else:
            tiled.setdefault(c, []).append(i)
    return tuple(rows), tuple(tuple(g) for g in tiled.values())


def _tiles(plan: AttentionPlan, pattern: int, group: tuple[int, ...], grid: tuple[int, int], p: int, device,
           tile: tuple[int, int], dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each tile of query patches: the query tokens, the key tokens the tile's FOVs reach (prefix
    tokens first) and minus the unscaled penalty over them, ``-inf`` outside each query's FOV."""
    gy, gx = grid
    ys, xs = patch_coords(gy, gx, device)
    coef = plan.coef[pattern, group[0]][None].to(device)
    prefix = torch.arange(p, device=device)
    out = []
    for y0 in range(0, gy, tile[0]):
        for x0 in range(0, gx, tile[1]):
            qy = torch.arange(y0, min(gy, y0 + tile[0]), device=device)
            qx = torch.arange(x0, min(gx, x0 + tile[1]), device=device)
            q_idx = (qy[:, None] * gx + qx[None, :]).reshape(-1)
            dy, dx = ys[None, :] - ys[q_idx, None], xs[None, :] - xs[q_idx, None]
            fov = field_of_view(coef, dy, dx)[0]
            k_idx = fov.any(0).nonzero()[:, 0]
            dy, dx, fov = dy[:, k_idx], dx[:, k_idx], fov[:, k_idx]
            neg = (-transform_distance((dy * dy + dx * dx).to(dtype), plan.config.distance)).masked_fill_(
                ~fov, float("-inf"))
            out.append((p + q_idx, torch.cat([prefix, p + k_idx]), F.pad(neg, (p, 0))))
    return out


def _tile_attention(q, k, v, plan, layer, grid, p, dropout_p, group, out, tile) -> None:
    """Attention of the heads ``group`` (one FOV) tile by tile, each tile against the keys it can see."""
    pattern = plan.layer_pattern[layer]
    work = table_dtype(q.dtype)
    tiles = plan.cached(("tiles", pattern, group, grid, p, q.device, tile, work),
                        lambda: _tiles(plan, pattern, group, grid, p, q.device, tile, work))
    hs = torch.tensor(group, device=q.device)
    has_distance = plan.kind[pattern].to(q.device)[hs] == 0
    # A zero scale (no distance penalty) keeps the -inf mask: tiny * -inf = -inf, tiny * penalty ~ 0.
    scale = (plan.layer_scales(layer, q.dtype).to(q.device)[hs] * has_distance).clamp(min=torch.finfo(work).tiny)
    qg, kg, vg = (t.index_select(1, hs) for t in (q, k, v))
    res = torch.empty(q.shape[0], len(group), q.shape[2], q.shape[3], dtype=q.dtype, device=q.device)
    for q_tok, k_tok, neg in tiles:
        bias = (neg[None] * scale[:, None, None]).to(q.dtype)
        res[:, :, q_tok] = F.scaled_dot_product_attention(
            qg.index_select(2, q_tok), kg.index_select(2, k_tok), vg.index_select(2, k_tok),
            attn_mask=bias[None].expand(q.shape[0], -1, -1, -1), dropout_p=dropout_p)
    out[:, hs, p:] = res[:, :, p:]


def _rows_copied(qo, ko, vo, table, o, ny, nx, p, rows_per_call, dropout_p):
    """Row slabs with each call's bias copied out of the table (prefix columns included): autograd and
    dropout see one softmax per query."""
    B, G, _, D = qo.shape
    res = torch.empty(B, G, ny * nx, D, dtype=qo.dtype, device=qo.device)
    for r0 in range(0, ny, rows_per_call):
        r1 = min(ny, r0 + rows_per_call) - 1
        key_rows = r1 + 1 if o != "all" else ny
        # Each query row's bias against key rows 0..key_rows-1 is a slice of the table.
        mask = torch.zeros(G, (r1 - r0 + 1) * nx, p + key_rows * nx, dtype=qo.dtype, device=qo.device)
        for r in range(r0, r1 + 1):
            top = ny - 1 - r  # table row of offset dy' = -r, i.e. key row 0
            mask[:, (r - r0) * nx:(r - r0 + 1) * nx, p:] = table[:, :, top: top + key_rows].flatten(2)
        end = p + key_rows * nx
        res[:, :, r0 * nx:(r1 + 1) * nx] = F.scaled_dot_product_attention(
            qo[:, :, p + r0 * nx: p + (r1 + 1) * nx], ko[:, :, :end], vo[:, :, :end],
            attn_mask=mask[None].expand(B, -1, -1, -1), dropout_p=dropout_p)
    return res


# SDPA's CPU kernel with its log-sum-exp, so that attention to the patches (whose bias is a view of
# the table, never copied) and to the prefix tokens can be merged. Its backward ignores the
# log-sum-exp, so it serves inference only.
_flash_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _rows_viewed(qo, ko, vo, table, o, ny, nx, p):
    """Row slabs for inference: one call per query row, its bias a strided view of the table; the
    prefix keys in one more call, merged through the log-sum-exps."""
    B, G, _, D = qo.shape
    res = torch.empty(B, G, ny * nx, D, dtype=qo.dtype, device=qo.device)
    lse = torch.empty(B, G, ny * nx, dtype=torch.float32 if qo.dtype != torch.float64 else qo.dtype,
                      device=qo.device)
    for r in range(ny):
        key_rows = r + 1 if o != "all" else ny
        top = ny - 1 - r  # table row of offset dy' = -r, i.e. key row 0
        rows = slice(r * nx, (r + 1) * nx)
        res[:, :, rows], lse[:, :, rows] = _flash_with_lse(
            qo[:, :, p + rows.start:p + rows.stop], ko[:, :, p:p + key_rows * nx], vo[:, :, p:p + key_rows * nx],
            0.0, False, attn_mask=table[:, :, top:top + key_rows].flatten(2)[None])
    if not p:
        return res
    pre, pre_lse = _flash_with_lse(qo[:, :, p:], ko[:, :, :p], vo[:, :, :p], 0.0, False)
    total = torch.logaddexp(lse, pre_lse)
    return (res * (lse - total).exp()[..., None].to(res.dtype)
            + pre * (pre_lse - total).exp()[..., None].to(res.dtype))


def slab_attention(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, layer: int, grid: tuple[int, int],
                   num_prefix_tokens: int, dropout_p: float = 0.0, rows_per_call: int = 4,
                   tile: tuple[int, int] = (8, 8)) -> Tensor:
    """LookHere attention for plans whose bias depends on the offset alone (``plan.offset_only``)."""
    gy, gx = grid
    p = num_prefix_tokens
    B, H, T, D = q.shape
    pattern = plan.layer_pattern[layer]
    work = table_dtype(q.dtype)
    scales = plan.layer_scales(layer, q.dtype).to(q.device)
    out = torch.empty_like(q)
    if p:
        out[:, :, :p] = F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p)
    row_heads, tiled = tile_groups(plan.patterns[pattern])
    for group in tiled:
        _tile_attention(q, k, v, plan, layer, grid, p, dropout_p, group, out, tile)
    sides = tuple(s if h in row_heads else None for h, s in enumerate(plan.sides[pattern]))
    for o, group in side_groups(sides):
        G = len(group)
        ny, nx = (gy, gx) if o in ("up", "down", "all") else (gx, gy)
        rows_below = ny - 1 if o == "all" else min(ny - 1, rows_per_call - 1)
        dist, fov, has_distance, perm = plan.cached(
            ("slab", pattern, o, grid, q.device, rows_below, work),
            lambda: _unscaled_table(plan, pattern, o, group, grid, q.device, rows_below, work))
        hs = torch.tensor(group, device=q.device)
        scale = scales[hs] * has_distance
        # This layer's table: -slope * distance inside the FOV, -inf outside; a row per head.
        table = (-(scale[:, None, None, None] * dist[None])).masked_fill_(~fov, float("-inf")).to(q.dtype)
        tokens = torch.cat([torch.arange(p, device=q.device), p + perm])
        qo = q.index_select(1, hs).index_select(2, tokens)
        ko = k.index_select(1, hs).index_select(2, tokens)
        vo = v.index_select(1, hs).index_select(2, tokens)
        # the views need the CPU kernel that returns log-sum-exps; elsewhere the rows are copied
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) or dropout_p or q.device.type != "cpu":
            res = _rows_copied(qo, ko, vo, table, o, ny, nx, p, rows_per_call, dropout_p)
        else:
            res = _rows_viewed(qo, ko, vo, table, o, ny, nx, p)
        full = torch.empty(B, G, gy * gx, D, dtype=q.dtype, device=q.device)
        full[:, :, perm] = res
        out[:, hs, p:] = full
    return out
