"""LookHere masks and penalties as small pure functions of patch offsets, composed per head.

Each primitive is a ``see(dy, dx) -> bool`` predicate on the key-minus-query offset (the
``mask_mod`` idea of attention-gym, expressed in 2D offsets): LookHere is translation-equivariant,
so apart from the ``center`` penalty nothing depends on absolute position. A head's field of view
is the intersection of its primitives; its penalty is a distance, 0 (``zero``) or the key's distance
to the grid centre (``center``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from typing import Callable

import torch

from .config import GROUPS, HEAD_COUNT_RULES, LookHereConfig

Tensor = torch.Tensor
SeeFn = Callable[[Tensor, Tensor], Tensor]


def up(dy: Tensor, dx: Tensor) -> Tensor:
    return dy <= 0


def down(dy: Tensor, dx: Tensor) -> Tensor:
    return dy >= 0


def left(dy: Tensor, dx: Tensor) -> Tensor:
    return dx <= 0


def right(dy: Tensor, dx: Tensor) -> Tensor:
    return dx >= 0


def tri_up(dy: Tensor, dx: Tensor) -> Tensor:
    return -dy >= dx.abs()


def tri_down(dy: Tensor, dx: Tensor) -> Tensor:
    return dy >= dx.abs()


def tri_left(dy: Tensor, dx: Tensor) -> Tensor:
    return -dx >= dy.abs()


def tri_right(dy: Tensor, dx: Tensor) -> Tensor:
    return dx >= dy.abs()


def _either(a: SeeFn, b: SeeFn) -> SeeFn:
    def see(dy: Tensor, dx: Tensor) -> Tensor:
        return a(dy, dx) | b(dy, dx)

    return see


def see_all(dy: Tensor, dx: Tensor) -> Tensor:
    return torch.ones_like(dy, dtype=torch.bool)


_TRI = {"up": tri_up, "down": tri_down, "left": tri_left, "right": tri_right}

# Every primitive is an intersection of half-planes through the query, ``a*dy + b*dx >= 0``
# (a diagonal, the union of two cones, is itself one half-plane). This form is what the fast
# backends use: vectorised over heads, as FlexAttention mask_mods, and to sort heads by side.
CONSTRAINTS: dict[str, tuple[tuple[int, int], ...]] = {
    "up": ((-1, 0),), "down": ((1, 0),), "left": ((0, -1),), "right": ((0, 1),),
    "tri_up": ((-1, -1), (-1, 1)), "tri_down": ((1, -1), (1, 1)),
    "tri_left": ((-1, -1), (1, -1)), "tri_right": ((-1, 1), (1, 1)),
    "diag_up_right": ((-1, 1),), "diag_up_left": ((-1, -1),),
    "diag_down_right": ((1, 1),), "diag_down_left": ((1, -1),),
    "zero": (), "center": (),
}

PRIMITIVES: dict[str, SeeFn] = {
    "up": up,
    "down": down,
    "left": left,
    "right": right,
    **{f"tri_{k}": f for k, f in _TRI.items()},
    **{f"diag_{a}_{b}": _either(_TRI[a], _TRI[b]) for a in ("up", "down") for b in ("left", "right")},
    "zero": see_all,
    "center": see_all,
}


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


PENALTY_KINDS = {"distance": 0, "zero": 1, "center": 2}


@dataclass(frozen=True)
class HeadTables:
    """Per-head tensors of one layer's heads: FOV half-planes, penalty kind and slope."""

    coef: Tensor  # (H, C, 2) int: a, b of each half-plane a*dy + b*dx >= 0; (0, 0) pads
    kind: Tensor  # (H,) int: PENALTY_KINDS
    slope: Tensor  # (H,) float64: head slopes


def head_tables(heads: tuple[HeadSpec, ...], device: torch.device | str = "cpu") -> HeadTables:
    c = max(1, max(len(h.constraints) for h in heads))
    coef = torch.zeros(len(heads), c, 2, dtype=torch.long)
    for i, h in enumerate(heads):
        for j, ab in enumerate(h.constraints):
            coef[i, j] = torch.tensor(ab)
    kind = torch.tensor([PENALTY_KINDS[h.penalty] for h in heads])
    slope = torch.tensor([h.slope for h in heads], dtype=torch.float64)
    return HeadTables(coef.to(device), kind.to(device), slope.to(device))


def fov_from_tables(coef: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``(H, *dy.shape)`` FOV: every half-plane of each head holds. ``coef``: ``(H, C, 2)``."""
    shape = (coef.shape[0],) + (1,) * dy.dim()
    coef, dy, dx = coef.to(torch.int32), dy.to(torch.int32), dx.to(torch.int32)
    seen = None
    for c in range(coef.shape[1]):  # one (H, ...) temporary at a time
        ok = (coef[:, c, 0].reshape(shape) * dy + coef[:, c, 1].reshape(shape) * dx) >= 0
        seen = ok if seen is None else seen.logical_and_(ok)
    return seen


_NONE_SLOPES = (1 / 4, 1 / 16, 1 / 64, 1 / 256)


def _group_slopes(name: str, n: int) -> list[float]:
    if "zero" in name or "center" in name or "none" in name:
        if n == 2:
            return list(_NONE_SLOPES[:2])
        if n == 4:
            return list(_NONE_SLOPES)
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
        slopes += _group_slopes(name, len(list(run)))
    return tuple(HeadSpec(prims, s) for (_, prims), s in zip(assigned, slopes))


def layer_slope(config: LookHereConfig, layer: int, depth: int) -> float:
    """``linspace(first, last, depth)[layer]``, as numpy computes it."""
    if not 0 <= layer < depth:
        raise ValueError(f"layer={layer} is outside 0..{depth - 1} (depth={depth})")
    first, last = config.layer_slopes
    if depth == 1:
        return first
    step = (last - first) / (depth - 1)
    return last if layer == depth - 1 else first + layer * step


def check_grid(grid_size: tuple[int, int] | int) -> tuple[int, int]:
    gy, gx = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if int(gy) != gy or int(gx) != gx or gy < 1 or gx < 1:
        raise ValueError(f"grid_size={grid_size!r} is empty or not integral; need (rows, cols) >= (1, 1)")
    return int(gy), int(gx)


@lru_cache(maxsize=64)
def _coords(gy: int, gx: int, device: str) -> tuple[Tensor, Tensor]:
    idx = torch.arange(gy * gx, device=device)
    return idx // gx, idx % gx


def _distance(d2: Tensor, distance: str) -> Tensor:
    if distance == "square":
        return d2
    d = d2.sqrt()
    return d.sqrt() if distance == "sqrt" else d


def head_penalties(
    config: LookHereConfig,
    heads: tuple[HeadSpec, ...],
    grid_size: tuple[int, int],
    rows: slice | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Unscaled penalties ``(H, R, N)`` (fill applied) and FOV ``(H, R, N)`` for query rows ``rows``.

    Layer-independent: a layer multiplies the penalty by ``global_slope * layer_slope * head.slope``.
    """
    gy, gx = grid_size
    ys, xs = _coords(gy, gx, str(torch.device(device)))
    qy, qx = (ys, xs) if rows is None else (ys[rows], xs[rows])
    dy = ys[None, :] - qy[:, None]
    dx = xs[None, :] - qx[:, None]
    dist = _distance((dy * dy + dx * dx).to(dtype), config.distance)
    center = ((ys.to(dtype) - (gy - 1) / 2) ** 2 + (xs.to(dtype) - (gx - 1) / 2) ** 2).sqrt()
    max_dist = _distance(torch.tensor(float((gy - 1) ** 2 + (gx - 1) ** 2), dtype=dtype), config.distance)

    tables = head_tables(heads, dy.device)
    fov = fov_from_tables(tables.coef, dy, dx)  # (H, R, N)
    kind = tables.kind[:, None, None]
    pen = torch.where(kind == 0, dist, torch.where(kind == 2, center.expand_as(dist), torch.zeros((), dtype=dtype,
                                                                                              device=dist.device)))
    if config.fill_with == "inf":
        return pen, fov
    if config.fill_with == "zero":
        pen = pen.masked_fill(~fov, 0.0)
    else:
        centre_max = math.hypot((gy - 1) / 2, (gx - 1) / 2)
        pen_max = torch.where(tables.kind == 0, max_dist, torch.where(tables.kind == 2, centre_max, 0.0)).to(dtype)
        pen = torch.where(fov, pen, pen_max[:, None, None])
    return pen, torch.ones_like(fov)


def head_scales(config: LookHereConfig, heads: tuple[HeadSpec, ...], layer: int, depth: int) -> list[float]:
    ls = layer_slope(config, layer, depth)
    return [config.global_slope * ls * h.slope for h in heads]


def layer_bias(
    config: LookHereConfig,
    grid_size: tuple[int, int],
    layer: int,
    depth: int,
    num_heads: int,
    rows: slice | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Additive bias ``(H, R, N)`` of one layer for query rows ``rows``; ``-inf`` outside the FOV."""
    heads = head_specs(config.directions_for_layer(layer, depth), num_heads)
    pen, fov = head_penalties(config, heads, grid_size, rows, dtype=dtype, device=device)
    scale = torch.tensor(head_scales(config, heads, layer, depth), dtype=dtype, device=pen.device)
    bias = -(scale[:, None, None] * pen)
    return bias.masked_fill(~fov, float("-inf"))


def dense_bias(config, grid_size, depth: int, num_heads: int) -> Tensor:
    """The full ``(depth, num_heads, N, N)`` LookHere bias (float32, patches only, ``-inf`` masked).

    For inspection and tests: it is what the published code materialises, and grows as N^2.
    Computed in float64 and rounded once to float32.
    """
    from .config import resolve_config

    config = resolve_config(config)
    grid = check_grid(grid_size)
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    return torch.stack(
        [layer_bias(config, grid, l, depth, num_heads, dtype=torch.float64) for l in range(depth)]
    ).to(torch.float32)
