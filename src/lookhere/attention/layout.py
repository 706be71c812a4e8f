"""Token layouts for the flex kernel: the order in which each head's patches reach FlexAttention.

FlexAttention skips a (query block, key block) pair only when no query of the block sees any key of
the other. In row-major order a block is a strip of image rows: a head that looks up and left still
sees part of every strip above it, and a left or right cone sees part of every strip. So each head
gets its own order of the patches, fitted to the edges of its field of view (FOV), which are
half-planes ``a*dy + b*dx >= 0`` through the query (``geometry``):

- no edge (unmasked heads): row-major;
- one edge: bands along it (patches sorted by ``a*y + b*x``), so a block lies on one side of the
  edge for all but the band that holds the query;
- two edges (quadrants, cones, wedges): the cheapest of a few candidates, counted exactly on the
  grid (``blocks_computed``, tiles on a tie): square tiles of one block each (8 x 8 patches for
  blocks of 64) in bands of 8 rows, tiles left to right, or bands 8, 12 or 16 wide in one edge
  coordinate ``a*y + b*x`` walked along the other (straight or snaking), whose blocks are
  parallelograms with sides on the FOV's edges. A diagonal edge cuts through square tiles, so at a
  64x64 grid the cones take 16-wide diagonal bands and the wedges 12-wide columns cut along their
  diagonal, the quadrants their tiles;
- three or more edges: square tiles. Where the grid is not a multiple of the tile, the ragged
  tiles are smaller and the blocks after them straddle two tiles (padding each ragged tile to a
  whole block was measured to cost more than it saves).

A head's slots are its patches in that order, padded at the end to whole blocks; padding slots see
only themselves. Prefix tokens are not laid out: prefix queries see every token without penalty,
and every patch sees the prefix keys without penalty, so both are attended outside the kernel and
merged with its output by their log-sum-exp (a block of keys for a few prefix tokens would cost
every query block one more block). A layout is a pure function of (head FOVs, grid), built once per
grid and kept in the model's plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .geometry import field_of_view, patch_coords

Tensor = torch.Tensor

# The block of FlexAttention's block mask, in tokens, for queries and keys alike, chosen by measuring
# the blocks computed (docs/performance.md); the GPU kernel's own tiles shrink to it.
BLOCK = 64
TILE = 8  # square tiles of TILE x TILE patches: one block
BAND_WIDTHS = (8, 12, 16)  # a two-edge head's bands, in its edge coordinates (measured: docs/performance.md)
LAYOUTS = ("fitted", "row-major")


def fov_edges(coef: Tensor) -> tuple[tuple[int, int], ...]:
    """The half-planes ``(a, b)`` of one head's ``coef (C, 2)`` that shape its FOV: the smallest
    subset with the same FOV (a 45-degree wedge, three half-planes, has two edges)."""
    planes = [tuple(c) for c in coef.tolist() if tuple(c) != (0, 0)]
    r = torch.arange(-4, 5)
    dy, dx = r[:, None], r[None, :]

    def fov(sub):
        return field_of_view(torch.tensor([list(sub) or [[0, 0]]], dtype=torch.int32), dy, dx)[0]

    full = fov(planes)
    for k in range(len(planes) + 1):
        for sub in itertools.combinations(planes, k):
            if torch.equal(fov(sub), full):
                return sub
    return tuple(planes)


def _tiles(y: Tensor, x: Tensor, gx: int) -> Tensor:
    """Sort key: square TILE x TILE tiles in bands of TILE rows, tiles left to right."""
    return (((y // TILE) * gx + x // TILE) * TILE + y % TILE) * TILE + x % TILE


def _bands(across: Tensor, along: Tensor, width: int, snake: bool) -> Tensor:
    """Sort key: bands ``width`` wide in ``across``, each walked along ``along`` (every other band
    backwards when ``snake``), ties by ``across``: blocks are parallelograms cut from the bands."""
    across, along = across - across.min(), along - along.min()
    band = across // width
    if snake:
        along = torch.where(band % 2 == 1, along.max() - along, along)
    span = int(max(across.max(), along.max())) + 1
    return (band * span + along) * span + across


def blocks_computed(order: Tensor, edges: tuple[tuple[int, int], ...], grid: tuple[int, int],
                    block: int = BLOCK) -> int:
    """(query block, key block) pairs with a visible pair when one head's patches take the slots of
    ``order``, for a FOV of at most two ``edges``: in the edge coordinates ``u, v`` a key is seen
    from some query of a block iff its ``u`` reaches the least ``u`` of the queries at or below its
    ``v`` (a running minimum), so the count needs no N x N mask."""
    if len(edges) > 2:
        raise ValueError(f"edges={edges}: the count is for FOVs of at most two edges")
    n = len(order)
    y, x = (c[order] for c in patch_coords(*grid))
    (a1, b1), (a2, b2) = (list(edges) + [(0, 0)] * 2)[:2]
    u, v = a1 * y + b1 * x, a2 * y + b2 * x
    nb = -(-n // block)
    pad = nb * block - n
    big = int(u.abs().max() + v.abs().max()) + 1  # padding queries see nothing, padding keys are never seen
    qu = torch.cat([u, u.new_full((pad,), big)]).view(nb, block)
    qv = torch.cat([v, v.new_full((pad,), big)]).view(nb, block)
    qv, sort = qv.sort(dim=1)
    least_u = qu.gather(1, sort).cummin(dim=1).values
    at = torch.searchsorted(qv, v.expand(nb, n).contiguous(), right=True) - 1
    seen = (at >= 0) & (u >= least_u.gather(1, at.clamp(min=0)))  # (query block, key)
    seen = torch.cat([seen, seen.new_zeros(nb, pad)], dim=1).view(nb, nb, block).any(-1)
    return int(seen.sum()) + int(pad > 0 and not seen[-1, -1])  # padding sees itself


def head_order(edges: tuple[tuple[int, int], ...], grid: tuple[int, int], block: int = BLOCK) -> Tensor:
    """One head's patches in the order its blocks are cut from (see the module's docstring)."""
    gy, gx = grid
    idx = torch.arange(gy * gx)
    y, x = patch_coords(gy, gx)
    if not edges:
        return idx
    if len(edges) == 1:
        (a, b), = edges
        return idx[torch.argsort(_bands(a * y + b * x, a * x - b * y, 1, False), stable=True)]  # lines along it
    tiles = idx[torch.argsort(_tiles(y, x, gx), stable=True)]
    if len(edges) > 2:
        return tiles
    orders = [tiles]
    coords = [a * y + b * x for a, b in edges]
    for across, along in (coords, coords[::-1]):
        for width in BAND_WIDTHS:
            for snake in (False, True):
                orders.append(idx[torch.argsort(_bands(across, along, width, snake), stable=True)])
    work = [blocks_computed(o, edges, grid, block) for o in orders]
    return orders[work.index(min(work))]  # the first (tiles) on a tie


@dataclass(frozen=True)
class TokenLayout:
    """Every head's patch order on one grid: ``patch (H, S)`` the patch in each slot (``-1``:
    padding), ``slot (H, N)`` its inverse; ``S`` is a whole number of blocks."""

    patch: Tensor
    slot: Tensor
    grid: tuple[int, int]

    @property
    def slots(self) -> int:
        return self.patch.shape[1]

    def to(self, device) -> "TokenLayout":
        return TokenLayout(self.patch.to(device), self.slot.to(device), self.grid)

    def gather(self, x: Tensor) -> Tensor:
        """``(B, H, N, D)`` patches in grid order -> ``(B, H, S, D)`` in each head's slots (padding
        slots hold a copy of patch 0; nothing sees them but themselves)."""
        B, H, _, D = x.shape
        return x.gather(2, self.patch.clamp(min=0)[None, :, :, None].expand(B, H, self.slots, D))

    def scatter(self, x: Tensor) -> Tensor:
        """``(B, H, S, D)`` slots -> ``(B, H, N, D)`` patches in grid order (padding dropped)."""
        B, H, _, D = x.shape
        return x.gather(2, self.slot[None, :, :, None].expand(B, H, self.slot.shape[1], D))


def build_layout(coef: Tensor, grid: tuple[int, int], layout: str = "fitted", block: int = BLOCK) -> TokenLayout:
    """The layout of heads ``coef (H, C, 2)`` on ``grid``: ``"fitted"`` (each head's own order, above)
    or ``"row-major"`` (every head row-major: the reference the fitted order is measured against)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
    gy, gx = grid
    n = gy * gx
    orders = torch.stack([head_order(fov_edges(c) if layout == "fitted" else (), grid, block) for c in coef])
    slots = -(-n // block) * block
    patch = torch.cat([orders, orders.new_full((len(orders), slots - n), -1)], dim=1)
    slot = torch.empty_like(orders).scatter_(1, orders, torch.arange(n).expand_as(orders).contiguous())
    return TokenLayout(patch, slot, (gy, gx))
