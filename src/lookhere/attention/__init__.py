"""LookHere attention: ``softmax(q k^T / sqrt(D) + bias) v`` without ever building the full bias.

A model builds one :class:`AttentionPlan` (``geometry`` -> ``plan``); each layer's call picks a
backend, a function of ``(q, k, v, plan, layer, grid, num_prefix_tokens, dropout_p)``:

- ``dense`` (``dense.py``): SDPA with bias rows per query chunk; every config, the reference.
- ``slab`` (``slab.py``): the CPU fast path; masked keys are skipped, the bias is a view of a table.
- ``flex`` (``flex.py``): compiled FlexAttention, mask and penalty computed in the kernel (GPU).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..config import LookHereConfig, resolve_config
from .dense import dense_attention
from .flex import flex_attention_lookhere, flex_work
from .geometry import check_grid, dense_bias
from .plan import AttentionPlan
from .slab import slab_attention

BACKENDS = ("auto", "dense", "slab", "flex")
# Below this many patches the dense path's few large SDPA calls beat the slabs' many smaller ones.
SLAB_MIN_PATCHES = 576


def choose_backend(plan: AttentionPlan, device: torch.device, num_patches: int, dropout_p: float = 0.0) -> str:
    """FlexAttention on GPU (it has no dropout); else row slabs for large grids where they apply;
    else, and on devices the slabs were not written for (MPS, XPU), the dense path."""
    if device.type == "cuda" and not dropout_p:
        return "flex"
    if device.type in ("cpu", "cuda") and num_patches >= SLAB_MIN_PATCHES and plan.offset_only:
        return "slab"
    return "dense"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must be (B, H, T, D) with matching shapes, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != tokens:
        raise ValueError(f"q has T={q.shape[2]} tokens; the grid and prefix tokens need T={tokens}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, layer: int, grid_size,
           num_prefix_tokens: int = 1, backend: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """One layer of LookHere attention for ``(B, H, T, D)`` inputs, following ``plan``."""
    gy, gx = check_grid(grid_size)
    n, p = gy * gx, int(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")
    if not 0 <= layer < plan.depth:
        raise ValueError(f"layer={layer} is outside 0..{plan.depth - 1} (depth={plan.depth})")
    _check_qkv(q, k, v, p + n)
    if q.shape[1] != plan.num_heads:
        raise ValueError(f"q has {q.shape[1]} heads; the LookHere plan was built for num_heads={plan.num_heads}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if backend == "auto":
        backend = choose_backend(plan, q.device, n, dropout_p)
    if backend == "slab" and not plan.offset_only:
        raise ValueError("the slab backend needs fill_with='inf' and no 'center' heads; use backend='dense'")
    run = {"dense": dense_attention, "slab": slab_attention, "flex": flex_attention_lookhere}[backend]
    return run(q, k, v, plan, layer, (gy, gx), p, dropout_p)


@lru_cache(maxsize=16)
def _plan(config: LookHereConfig, depth: int, num_heads: int) -> AttentionPlan:
    return AttentionPlan(config, depth, num_heads)


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
    reference), ``"slab"`` (CPU, skips masked keys), ``"flex"`` (compiled FlexAttention), or
    ``"auto"``. ``dropout_p`` drops attention probabilities (training); FlexAttention has no dropout,
    so ``"auto"`` then takes another backend. Models keep their plan (:class:`lookhere.position.LookHere`);
    this function keeps the plans of its last few configs.
    """
    if q.dim() != 4:
        _check_qkv(q, k, v, -1)
    if not 0 <= layer < depth:
        raise ValueError(f"layer={layer} is outside 0..{depth - 1} (depth={depth})")
    plan = _plan(resolve_config(config), depth, q.shape[1])
    return attend(q, k, v, plan, layer=layer, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens,
                  backend=backend, dropout_p=dropout_p)


__all__ = ["AttentionPlan", "BACKENDS", "attend", "choose_backend", "dense_bias", "flex_work", "lookhere_attention"]
