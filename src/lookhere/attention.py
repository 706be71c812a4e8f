"""LookHere attention: ``softmax(q k^T / sqrt(D) + bias) v`` with the bias built per query chunk.

Only the rows of the bias that a chunk of queries needs are built, so memory per call stays
below ``H x T x T`` (and a fixed budget for large grids); nothing of size depth x N x N exists.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .config import LookHereConfig, resolve_config
from .masks import HeadSpec, check_grid, head_penalties, head_scales, head_specs

# Elements of one chunk's bias (H x rows x T). 2**24 floats = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


@lru_cache(maxsize=8)
def _chunk_penalties(config: LookHereConfig, heads: tuple[HeadSpec, ...], grid: tuple[int, int], start: int,
                     stop: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Layer-independent, so the layers of one forward (and the next forward) share it.
    return head_penalties(config, heads, grid, slice(start, stop), device=device)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, H, T, D) with matching shapes, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != tokens:
        raise ValueError(f"q has T={q.shape[2]} tokens; the grid and prefix tokens need T={tokens}")


BACKENDS = ("auto", "dense", "slab", "flex")


def _slab_supported(config: LookHereConfig, heads: tuple[HeadSpec, ...]) -> bool:
    from .slab import supported

    return supported(config, heads)
# Below this many patches the dense path's few large SDPA calls beat the slabs' many smaller ones.
SLAB_MIN_PATCHES = 576


def choose_backend(device: torch.device, num_patches: int, config: LookHereConfig,
                   heads: tuple[HeadSpec, ...]) -> str:
    """FlexAttention on GPU; on CPU row slabs for large grids where they apply, else the dense path."""
    from .slab import supported

    if device.type == "cuda":
        return "flex"
    if num_patches >= SLAB_MIN_PATCHES and supported(config, heads):
        return "slab"
    return "dense"


def lookhere_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config,
    grid_size,
    layer: int,
    depth: int,
    num_prefix_tokens: int = 1,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LookHere attention of one layer for q, k, v of shape ``(B, H, T, D)``.

    ``T = num_prefix_tokens + gy * gx``; prefix tokens (CLS, registers) come first and see, and
    are seen by, every token without penalty. ``config`` is a preset name, a published-format
    dict or a :class:`LookHereConfig`. ``backend``: ``"dense"`` (bias rows per query chunk, the
    reference), ``"slab"`` (CPU, skips masked keys), ``"flex"`` (FlexAttention), or ``"auto"``.
    ``dropout_p`` drops attention probabilities (training); FlexAttention has no dropout, so ``"auto"``
    then takes another backend.
    """
    cfg: LookHereConfig = resolve_config(config)
    gy, gx = check_grid(grid_size)
    n, p = gy * gx, int(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")
    _check_qkv(q, k, v, p + n)
    B, H, T, D = q.shape
    heads = head_specs(cfg.directions_for_layer(layer, depth), H)
    scales = head_scales(cfg, heads, layer, depth)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if backend == "auto":
        backend = choose_backend(q.device, n, cfg, heads)
        if backend == "flex" and dropout_p:
            backend = "slab" if n >= SLAB_MIN_PATCHES and _slab_supported(cfg, heads) else "dense"
    if backend == "flex" and dropout_p:
        raise ValueError("the flex backend has no attention dropout; use backend='dense' or 'slab' to train with it")
    if backend == "slab":
        from .slab import slab_attention, supported

        if not supported(cfg, heads):
            raise ValueError("the slab backend needs fill_with='inf' and no 'center' heads; use backend='dense'")
        return slab_attention(q, k, v, config=cfg, heads=heads, scales=scales, grid=(gy, gx), num_prefix_tokens=p,
                              dropout_p=dropout_p)
    if backend == "flex":
        from .flex import flex_lookhere_attention

        return flex_lookhere_attention(q, k, v, config=cfg, heads=heads, scales=scales, grid=(gy, gx),
                                       num_prefix_tokens=p)
    scale = torch.tensor(scales, dtype=torch.float32, device=q.device)

    parts = []
    if p:
        parts.append(F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p))
    rows = max(1, min(n, _CHUNK_ELEMENTS // max(1, H * T)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        pen, fov = _chunk_penalties(cfg, heads, (gy, gx), start, stop, str(q.device))
        bias = (-(scale[:, None, None] * pen)).masked_fill(~fov, float("-inf"))
        if p:
            bias = F.pad(bias, (p, 0))
        # A 4D mask broadcast over the batch lets CPU SDPA take its fused kernel (5x faster than 3D).
        mask = bias.to(q.dtype).expand(B, -1, -1, -1)
        o = F.scaled_dot_product_attention(q[:, :, p + start : p + stop], k, v, attn_mask=mask, dropout_p=dropout_p)
        parts.append(o)
    return torch.cat(parts, dim=2)
