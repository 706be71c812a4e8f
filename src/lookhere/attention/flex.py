"""LookHere as compiled FlexAttention: the masks and penalties as ``mask_mod`` / ``score_mod``.

The penalty is computed in registers from each head's half-planes, penalty kind and scale; the
block mask (which tiles hold any visible key) is built once per (head pattern, grid, prefix count,
device) and kept in the plan, shared by the layers, which differ only by their scales. The kernel
is compiled with dynamic shapes, and every per-call quantity (prefix count, coordinates, scales)
reaches it as a tensor, so batch sizes, grids and layers reuse one compilation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .geometry import max_penalties, transform_distance
from .plan import AttentionPlan

Tensor = torch.Tensor
log = logging.getLogger(__name__)

# Compiled FlexAttention kernels refuse smaller head dims on these devices; q, k, v are zero-padded
# to it (the scores and the kept columns of the output are unchanged).
MIN_HEAD_DIM = {"cuda": 16}
BLOCK = 128

_kernels: dict[str, object] = {}
_padded_logged: set[tuple[str, int]] = set()


def _compiled(name: str):
    if name not in _kernels:
        fn = flex_attention if name == "flex" else create_block_mask
        _kernels[name] = torch.compile(fn, dynamic=True)
    return _kernels[name]


def _geometry(plan: AttentionPlan, pattern: int, grid: tuple[int, int], p: int, device) -> dict[str, Tensor]:
    """The tensors the mods read: the prefix count and grid width (token coordinates are computed from
    them: tensors of the grid's size make the CPU code generator fail), the grid centre and each
    head's largest penalty (``fill_with="max"``)."""
    gy, gx = grid
    kind = plan.kind[pattern].to(device)
    return {
        "prefix": torch.tensor(p, device=device), "width": torch.tensor(gx, device=device),
        "centre": torch.tensor([(gy - 1) / 2, (gx - 1) / 2], device=device),
        "top": max_penalties(kind, grid, plan.config.distance, torch.float32).to(device),
    }


def _half_planes(coef: Tensor) -> list[tuple[Tensor, Tensor]]:
    # One contiguous int64 (H,) tensor per coefficient: what the CPU code generator handles.
    return [(coef[:, c, 0].long().contiguous(), coef[:, c, 1].long().contiguous()) for c in range(coef.shape[1])]


def _coords(idx: Tensor, prefix: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
    i = (idx - prefix).clamp(min=0)  # prefix tokens at patch 0; their scores are never penalised
    return i // width, i % width


def _in_fov(planes, h, dy, dx):
    seen = dy == dy
    for a, b in planes:
        seen = seen & (a[h] * dy + b[h] * dx >= 0)
    return seen


def lookhere_mask_mod(coef: Tensor, g: dict[str, Tensor]):
    """``mask_mod(b, h, q, kv)``: prefix tokens see and are seen; otherwise all half-planes hold."""
    prefix, width = g["prefix"], g["width"]
    planes = _half_planes(coef)

    def mask_mod(b, h, q_idx, kv_idx):
        (qy, qx), (ky, kx) = _coords(q_idx, prefix, width), _coords(kv_idx, prefix, width)
        dy, dx = ky - qy, kx - qx
        return (q_idx < prefix) | (kv_idx < prefix) | _in_fov(planes, h, dy, dx)

    return mask_mod


def lookhere_score_mod(coef: Tensor, kind: Tensor, scale: Tensor, g: dict[str, Tensor], distance: str,
                       fill_with: str):
    """``score_mod``: minus the head's scaled penalty (distance, 0, or the key's centre distance);
    outside the FOV the fill's penalty (``fill_with`` zero or max; inf is the block mask's)."""
    prefix, width, centre, top = g["prefix"], g["width"], g["centre"], g["top"]
    planes, kind = _half_planes(coef), kind.long()

    def score_mod(score, b, h, q_idx, kv_idx):
        (qy, qx), (ky, kx) = _coords(q_idx, prefix, width), _coords(kv_idx, prefix, width)
        dy, dx = ky - qy, kx - qx
        dist = transform_distance((dy * dy + dx * dx).to(torch.float32), distance)
        to_centre = torch.sqrt((ky - centre[0]) ** 2 + (kx - centre[1]) ** 2)
        k = kind[h]
        pen = torch.where(k == 0, dist, torch.where(k == 2, to_centre, torch.zeros_like(dist)))
        if fill_with != "inf":
            seen = _in_fov(planes, h, dy, dx)
            pen = torch.where(seen, pen, torch.zeros_like(pen) if fill_with == "zero" else top[h])
        outside = (q_idx < prefix) | (kv_idx < prefix)
        return score - torch.where(outside, torch.zeros_like(pen), scale[h] * pen)

    return score_mod


def flex_attention_lookhere(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, layer: int,
                            grid: tuple[int, int], num_prefix_tokens: int, dropout_p: float = 0.0) -> Tensor:
    if dropout_p:
        raise ValueError("the flex backend has no attention dropout; use backend='dense' or 'slab' to train with it")
    B, H, T, D = q.shape
    device, p, pattern, cfg = q.device, num_prefix_tokens, plan.layer_pattern[layer], plan.config
    g = plan.cached(("flex", pattern, grid, p, device), lambda: _geometry(plan, pattern, grid, p, device))
    coef, kind = plan.coef[pattern].to(device), plan.kind[pattern].to(device)
    block_mask = None
    if cfg.fill_with == "inf":
        block_mask = plan.cached(("flex-blocks", pattern, grid, p, device), lambda: _compiled("blocks")(
            lookhere_mask_mod(coef, g), None, H, T, T, device=device, BLOCK_SIZE=BLOCK))
    score_mod = lookhere_score_mod(coef, kind, plan.scale[layer].to(device), g, cfg.distance, cfg.fill_with)
    pad = MIN_HEAD_DIM.get(device.type, 0) - D
    if pad > 0:
        if (device.type, D) not in _padded_logged:
            _padded_logged.add((device.type, D))
            log.info("FlexAttention on %s needs head dim >= %d: head dim %d is zero-padded", device.type, D + pad, D)
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = _compiled("flex")(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=D ** -0.5)
    return out[..., :D] if pad > 0 else out
