"""LookHere geometry: patch coordinates, offsets, distances, fields of view and penalties.

Every backend and :func:`dense_bias` take these facts from here. A field of view (FOV) is an
intersection of half-planes through the query, ``a*dy + b*dx >= 0`` on the key-minus-query offset
(a diagonal, the union of two cones, is itself one half-plane). LookHere is translation-equivariant:
apart from the ``center`` penalty nothing depends on absolute position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby

import torch

from ..config import GROUPS, HEAD_COUNT_RULES, LookHereConfig, resolve_config

Tensor = torch.Tensor

# Each primitive's FOV as half-planes ``(a, b)``: a key at offset (dy, dx) is seen when a*dy + b*dx >= 0.
CONSTRAINTS: dict[str, tuple[tuple[int, int], ...]] = {
    "up": ((-1, 0),), "down": ((1, 0),), "left": ((0, -1),), "right": ((0, 1),),
    "tri_up": ((-1, -1), (-1, 1)), "tri_down": ((1, -1), (1, 1)),
    "tri_left": ((-1, -1), (1, -1)), "tri_right": ((-1, 1), (1, 1)),
    "diag_up_right": ((-1, 1),), "diag_up_left": ((-1, -1),),
    "diag_down_right": ((1, 1),), "diag_down_left": ((1, -1),),
    "zero": (), "center": (),
}

PENALTY_KINDS = {"distance": 0, "zero": 1, "center": 2}


@dataclass(frozen=True)
class HeadSpec:
    """One head: the primitives whose FOVs are intersected, and the head's slope."""

    primitives: tuple[str, ...]
    slope: float

    @property
    def penalty(self) -> str:
        # The published construction applies these in list order, so the last one wins.
        kinds = [p for p in self.primitives if p in ("zero", "center")]
        return kinds[-1] if kinds else "distance"

    @property
    def constraints(self) -> tuple[tuple[int, int], ...]:
        """The FOV as half-planes ``a*dy + b*dx >= 0`` (duplicates removed)."""
        return tuple(dict.fromkeys(c for p in self.primitives for c in CONSTRAINTS[p]))


# The most half-planes any head of the named groups has (a 45-degree wedge: a cone and a side).
MAX_CONSTRAINTS = max(len(HeadSpec(h, 1.0).constraints) for g in GROUPS.values() for h in g)

_NONE_SLOPES = (1 / 4, 1 / 16, 1 / 64, 1 / 256)


def _group_slopes(name: str, n: int, directions: str) -> list[float]:
    if "zero" in name or "center" in name or "none" in name:
        if n == 2:
            return list(_NONE_SLOPES[:2])
        if n % 4:
            # The published slope rule has no value list for such a group (it builds fewer slopes than heads).
            raise ValueError(
                f"LookHere config: head_directions={directions!r} puts {n} consecutive heads in {name!r} "
                f"groups; slopes exist for 2 or a multiple of 4 such heads. Use different names for the two "
                f"groups (e.g. 'none-zero') or another head count")
        return [s for s in _NONE_SLOPES for _ in range(n // 4)]
    return [2.0 ** -(1 + i // 4) for i in range(n)]


def _assign(names: list[str], num_heads: int) -> list[tuple[str, tuple[str, ...]]]:
    g = [[(n, h) for h in GROUPS[n]] for n in names]
    k = len(names)
    if num_heads == 6 and k == 2:
        return g[0] + g[1][:2]
    if k == 1 and num_heads > 0 and num_heads % 4 == 0:
        return g[0] * (num_heads // 4)
    if k == 2 and num_heads == 12:
        return g[0] * 2 + g[1]
    if k == 2 and num_heads == 16:
        return g[0] * 2 + g[1] * 2
    if k == 3 and num_heads == 12:
        return g[0] + g[1] + g[2]
    if k == 3 and num_heads == 16:
        return g[0] * 2 + g[1] + g[2]
    if k == 4 and num_heads == 16:
        return g[0] + g[1] + g[2] + g[3]
    raise ValueError(
        f"LookHere config: invalid num_heads={num_heads} for head_directions={'-'.join(names)!r} "
        f"({k} name(s)); allowed: " + "; ".join(HEAD_COUNT_RULES)
    )


@lru_cache(maxsize=256)
def head_specs(directions: str, num_heads: int) -> tuple[HeadSpec, ...]:
    """Heads of one layer, in order, with their slopes (spec: 'Config and head assignment', 'Slopes')."""
    assigned = _assign(directions.split("-"), num_heads)
    slopes: list[float] = []
    for name, run in groupby(n for n, _ in assigned):
        slopes += _group_slopes(name, len(list(run)), directions)
    return tuple(HeadSpec(prims, s) for (_, prims), s in zip(assigned, slopes, strict=True))


@lru_cache(maxsize=256)
def head_groups(directions: str, num_heads: int) -> tuple[str, ...]:
    """The group name (``corners``, ``none``, ...) of each head of one layer, in order."""
    return tuple(name for name, _ in _assign(directions.split("-"), num_heads))


def layer_slope(config: LookHereConfig, layer: int, depth: int) -> float:
    """``linspace(first, last, depth)[layer]``, as numpy computes it."""
    if not 0 <= layer < depth:
        raise ValueError(f"layer={layer} is outside 0..{depth - 1} (depth={depth})")
    first, last = config.layer_slopes
    if depth == 1:
        return first
    step = (last - first) / (depth - 1)
    return last if layer == depth - 1 else first + layer * step


def head_scales(config: LookHereConfig, heads: tuple[HeadSpec, ...], layer: int, depth: int) -> list[float]:
    """``global_slope * layer_slope * head_slope`` of each head: what multiplies its penalty."""
    ls = layer_slope(config, layer, depth)
    return [config.global_slope * ls * h.slope for h in heads]


def check_grid(grid_size: tuple[int, int] | int) -> tuple[int, int]:
    gy, gx = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if int(gy) != gy or int(gx) != gx or gy < 1 or gx < 1:
        raise ValueError(f"grid_size={grid_size!r} is empty or not integral; need (rows, cols) >= (1, 1)")
    return int(gy), int(gx)


def patch_coords(gy: int, gx: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Row and column of each patch, row-major (``y = i // gx``, ``x = i % gx``)."""
    idx = torch.arange(gy * gx, device=device)
    return idx // gx, idx % gx


def transform_distance(d2: Tensor, distance: str) -> Tensor:
    """The penalty of a squared Euclidean distance: ``d`` (linear), ``sqrt(d)`` or ``d^2`` (square)."""
    if distance == "square":
        return d2
    d = d2.sqrt()
    return d.sqrt() if distance == "sqrt" else d


def head_tables(heads: tuple[HeadSpec, ...]) -> tuple[Tensor, Tensor]:
    """``coef (H, MAX_CONSTRAINTS, 2)`` half-planes (``(0, 0)`` pads: always true) and ``kind (H,)``."""
    coef = torch.zeros(len(heads), MAX_CONSTRAINTS, 2, dtype=torch.int32)
    for i, h in enumerate(heads):
        for j, ab in enumerate(h.constraints):
            coef[i, j] = torch.tensor(ab)
    kind = torch.tensor([PENALTY_KINDS[h.penalty] for h in heads], dtype=torch.int32)
    return coef, kind


def field_of_view(coef: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``(H, *dy.shape)`` FOV: every half-plane of each head holds. ``coef``: ``(H, C, 2)``."""
    shape = (coef.shape[0],) + (1,) * dy.dim()
    coef, dy, dx = coef.to(torch.int32), dy.to(torch.int32), dx.to(torch.int32)
    seen = torch.ones((), dtype=torch.bool, device=dy.device)
    for c in range(coef.shape[1]):  # one (H, ...) temporary at a time
        seen = seen & ((coef[:, c, 0].reshape(shape) * dy + coef[:, c, 1].reshape(shape) * dx) >= 0)
    return seen.expand(shape[:1] + dy.shape) if seen.dim() < 1 + dy.dim() else seen


def max_penalties(kind: Tensor, grid: tuple[int, int], distance: str, dtype=torch.float64) -> Tensor:
    """Each head's largest penalty over the grid (``fill_with="max"``): the corner-to-corner distance,
    the corner's centre distance, or 0."""
    gy, gx = grid
    corner = transform_distance(torch.tensor(float((gy - 1) ** 2 + (gx - 1) ** 2), dtype=dtype), distance)
    centre = math.hypot((gy - 1) / 2, (gx - 1) / 2)
    return torch.where(kind == 0, corner, torch.where(kind == 2, centre, 0.0)).to(dtype)


def head_penalties(heads: tuple[HeadSpec, ...], distance: str, fill_with: str, grid: tuple[int, int],
                   rows: slice | None = None, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Unscaled penalties ``(H, R, N)`` (fill applied) and FOV ``(H, R, N)`` for query rows ``rows``.

    Layer-independent: a layer multiplies the penalty by :func:`head_scales`.
    """
    gy, gx = grid
    ys, xs = patch_coords(gy, gx, device)
    qy, qx = (ys, xs) if rows is None else (ys[rows], xs[rows])
    dy = ys[None, :] - qy[:, None]
    dx = xs[None, :] - qx[:, None]
    dist = transform_distance((dy * dy + dx * dx).to(dtype), distance)
    centre = ((ys.to(dtype) - (gy - 1) / 2) ** 2 + (xs.to(dtype) - (gx - 1) / 2) ** 2).sqrt()
    coef, kind = (t.to(dy.device) for t in head_tables(heads))
    fov = field_of_view(coef, dy, dx)
    k = kind[:, None, None]
    pen = torch.where(k == 0, dist, torch.where(k == 2, centre.expand_as(dist), torch.zeros((), dtype=dtype,
                                                                                         device=dist.device)))
    if fill_with == "inf":
        return pen, fov
    if fill_with == "zero":
        pen = pen.masked_fill(~fov, 0.0)
    else:
        pen = torch.where(fov, pen, max_penalties(kind, grid, distance, dtype).to(pen.device)[:, None, None])
    return pen, torch.ones_like(fov)


def layer_bias(config: LookHereConfig, grid_size: tuple[int, int], layer: int, depth: int, num_heads: int,
               rows: slice | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
    """Additive bias ``(H, R, N)`` of one layer for query rows ``rows``; ``-inf`` outside the FOV."""
    heads = head_specs(config.directions_for_layer(layer, depth), num_heads)
    pen, fov = head_penalties(heads, config.distance, config.fill_with, grid_size, rows, dtype=dtype, device=device)
    scale = torch.tensor(head_scales(config, heads, layer, depth), dtype=dtype, device=pen.device)
    return (-(scale[:, None, None] * pen)).masked_fill(~fov, float("-inf"))


def dense_bias(config, grid_size, depth: int, num_heads: int) -> Tensor:
    """The full ``(depth, num_heads, N, N)`` LookHere bias (float32, patches only, ``-inf`` masked).

    For inspection and tests: it is what the published code materialises, and grows as N^2.
    Computed in float64 and rounded once to float32.
    """
    config = resolve_config(config)
    grid = check_grid(grid_size)
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    return torch.stack(
        [layer_bias(config, grid, l, depth, num_heads, dtype=torch.float64) for l in range(depth)]
    ).to(torch.float32)
