"""Offset biases: an additive attention bias per head that is a function of the (query, key) patch
offset (the learned relative table, 2D-ALiBi, FIRE)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..attention.chunked import chunk_rows
from .base import Knob, PositionEncoding, interpolate_knob, patch_positions

NORMALIZE = Knob("fire_normalize", "normalize", "FIRE", "normalise",
                 "FIRE: normalise offsets by the test grid's extent (FIRE's own) or the training grid's",
                 choices=("test", "train"))
RPE_INTERPOLATE = interpolate_knob("rpe", "rpe-learned")
ALIBI_INTERPOLATE = interpolate_knob("alibi", "2D-ALiBi")


class OffsetBias(PositionEncoding):
    """An additive bias per head that is a function of the (query, key) patch offset, 0 for prefix
    tokens: FIRE, the learned relative table, 2D-ALiBi. Attention runs on chunks of query rows with
    LookHere's dense-path budget, so at a large grid only one chunk's bias rows exist at a time."""

    relative = True

    def bias(self, grid: tuple[int, int], layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """``(H, rows, N)``: the bias of the query patches ``rows`` against every key patch."""
        raise NotImplementedError

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        B, H, T, _ = q.shape
        p, n = num_prefix_tokens, grid[0] * grid[1]
        step = chunk_rows(H, T, n)
        if step >= n:  # one call; a 4D mask broadcast over the batch lets CPU SDPA take its fused kernel
            mask = self.score_bias(grid=grid, layer=layer, num_prefix_tokens=p, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype).expand(B, -1, -1, -1),
                                                  dropout_p=dropout_p)
        parts = [F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p)] if p else []
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            mask = F.pad(self.bias(grid, layer, rows), (p, 0)).to(q.dtype).expand(B, -1, -1, -1)
            parts.append(F.scaled_dot_product_attention(q[:, :, p + rows.start:p + rows.stop], k, v, attn_mask=mask,
                                                        dropout_p=dropout_p))
        return torch.cat(parts, dim=2)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        return F.pad(self.bias(grid, layer), (num_prefix_tokens, 0, num_prefix_tokens, 0))


def patch_offsets(grid: tuple[int, int], rows: slice = slice(None), device="cpu",
                  train_grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``(key - query)`` per axis, ``(rows, N)`` each, for the query patches ``rows``: integers,
    or with ``train_grid`` the (float) offsets of the grid squeezed into its range (:func:`patch_positions`)."""
    y, x = patch_positions(grid, train_grid, device=device, interpolate=train_grid is not None)
    dy, dx = y[None, :] - y[rows, None], x[None, :] - x[rows, None]
    return (dy, dx) if train_grid is not None else (dy.long(), dx.long())

class RelativeBias(OffsetBias):
    """Learned bias per layer and head indexed by the offset (dy, dx) (iRPE / Swin style).

    Offsets beyond the training grid's range clamp to the table's edge; ``interpolate=True`` (the
    test-time knob) squeezes the grid into the training grid's range instead, and reads the table
    bilinearly at the fractional offsets.
    """

    name = "rpe-learned"
    knobs = ("interpolate",)
    test_knobs = (RPE_INTERPOLATE,)

    def __init__(self, num_heads: int, depth: int, grid_size: tuple[int, int], interpolate: bool = False):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.interpolate = RPE_INTERPOLATE.check(interpolate, "rpe-learned interpolate")
        gy, gx = grid_size
        self.table = nn.Parameter(torch.zeros(depth, num_heads, 2 * gy - 1, 2 * gx - 1))
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.table, std=0.02)

    def bias(self, grid, layer, rows=slice(None)):
        table, (ty, tx) = self.table[layer], self.grid_size
        if not self.interpolate or tuple(grid) == self.grid_size:
            dy, dx = patch_offsets(grid, rows, device=table.device)
            return table[:, dy.clamp(-(ty - 1), ty - 1) + ty - 1, dx.clamp(-(tx - 1), tx - 1) + tx - 1]
        dy, dx = patch_offsets(grid, rows, device=table.device, train_grid=self.grid_size)
        # grid_sample's (x, y) in [-1, 1] with align_corners: -1 and 1 are the table's first and last entries
        where = torch.stack([dx / max(tx - 1, 1), dy / max(ty - 1, 1)], -1)[None]
        return F.grid_sample(table[None].float(), where, mode="bilinear", align_corners=True)[0].to(table.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^(-8 h / H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


class Alibi2d(OffsetBias):
    """2D-ALiBi (CROMA): minus a per-head slope times the Euclidean patch distance; no masks.
    ``interpolate=True`` (the test-time knob) measures distances in the grid squeezed into the
    training grid's range: the slopes times the training-to-test size ratio, per axis."""

    name = "alibi-2d"
    knobs = ("interpolate",)
    test_knobs = (ALIBI_INTERPOLATE,)

    def __init__(self, num_heads: int, grid_size: tuple[int, int], interpolate: bool = False):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.interpolate = ALIBI_INTERPOLATE.check(interpolate, "alibi-2d interpolate")
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def bias(self, grid, layer=0, rows=slice(None)):
        dy, dx = patch_offsets(grid, rows, device=self.slopes.device,
                               train_grid=self.grid_size if self.interpolate else None)
        return -self.slopes[:, None, None] * torch.hypot(dy.float(), dx.float())

class Fire(OffsetBias):
    """FIRE (Li et al., ICLR 2024): an attention bias computed by a small MLP per layer from the
    log-scaled offset, normalised by a length.

    In 1D, ``bias(i, j) = MLP(psi(i - j) / psi(max(n, L)))`` with ``psi(r) = log(|c| r + 1)``,
    ``n`` the length seen so far, ``c`` and the threshold ``L`` learned. The 2D form used here takes the
    offset per axis, with its sign: ``MLP(phi_y(dy), phi_x(dx))``, ``phi_a(d) = sign(d) psi(|d|) /
    psi(max(E_a, L))``, ``E_a`` the grid's extent along the axis (rows - 1 or columns - 1). Per axis,
    because attention in an image is not causal: the sign tells above from below and left from
    right (as the learned relative bias and LookHere do), each axis of a non-square grid is normalised
    by its own extent, and the MLP can still learn any function of the Euclidean distance from the two.
    Each layer has its own MLP (2 -> ``width`` -> heads, ReLU), ``c`` and ``L``.

    ``normalize`` is the test-time knob: ``"test"`` (FIRE's own extension: the normaliser is the
    current input's extent, so every grid's offsets span [-1, 1], an interpolation of the training
    range) or ``"train"`` (the training grid's extent, so a larger grid reaches offsets beyond 1).
    """

    name = "fire"
    knobs = ("normalize",)
    test_knobs = (NORMALIZE,)
    layer_modules = ("mlp",)

    def __init__(self, num_heads: int, depth: int, grid_size: tuple[int, int], width: int = 32, init_c: float = 0.1,
                 init_threshold: float | None = None, normalize: str = "test"):
        super().__init__()
        self.grid_size, self.init_c = tuple(grid_size), init_c
        self.normalize = NORMALIZE.check(normalize, "fire normalize")
        # FIRE starts L at a quarter of its training length (512 of 2048 tokens); here of the larger extent.
        self.register_buffer("init_threshold", torch.tensor(
            float(init_threshold if init_threshold is not None else max(grid_size[0] - 1, grid_size[1] - 1, 1) / 4)))
        self.c = nn.Parameter(torch.empty(depth))
        self.threshold_scale = nn.Parameter(torch.empty(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, num_heads))
                                 for _ in range(depth))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.constant_(self.c, self.init_c)
        nn.init.ones_(self.threshold_scale)
        for mlp in self.mlp:
            mlp[0].reset_parameters()
            mlp[2].reset_parameters()

    def offset_table(self, grid: tuple[int, int], layer: int) -> torch.Tensor:
        """``(H, 2 gy - 1, 2 gx - 1)``: the bias at each offset ``(dy, dx)``, ``dy = -(gy - 1) .. gy - 1``."""
        extent_grid = grid if NORMALIZE.check(self.normalize, "fire normalize") == "test" else self.grid_size
        c = self.c[layer].abs()
        threshold = (self.threshold_scale[layer] * self.init_threshold).abs()
        device, dtype = self.c.device, self.c.dtype
        phis = []
        for g, e in zip(grid, extent_grid):
            d = torch.arange(-(g - 1), g, device=device, dtype=dtype)
            norm = torch.log(c * torch.maximum(threshold, torch.tensor(float(e - 1), device=device, dtype=dtype)) + 1) + 1e-6
            phis.append(d.sign() * torch.log(c * d.abs() + 1) / norm)
        dy, dx = torch.meshgrid(*phis, indexing="ij")
        return self.mlp[layer](torch.stack([dy, dx], dim=-1)).permute(2, 0, 1)

    def bias(self, grid, layer, rows=slice(None)):
        table = self.offset_table(grid, layer)
        dy, dx = patch_offsets(grid, rows, device=table.device)
        return table[:, dy + grid[0] - 1, dx + grid[1] - 1]
