"""LookHere as compiled FlexAttention: the masks and penalties as ``mask_mod`` / ``score_mod``.

The kernel sees each head's patches in the order of its :class:`~.layout.TokenLayout` (gathered
before, scattered back after), so that whole blocks of keys a head cannot see are skipped; the mods
read a slot's patch from the layout's table. Prefix tokens (unpenalised both ways) are attended
outside the kernel and merged with its output by log-sum-exp; where the compiled kernel cannot return
its log-sum-exp (this CPU), the prefix keys follow the patches' key slots in the kernel instead. The penalty is computed in registers from each head's
half-planes, penalty kind and scale; the layout and the block mask are built once per (head
pattern, grid, prefix count, device) and kept in the plan, shared by the layers, which differ only
by their scales. The kernel is compiled with dynamic shapes, and every per-call quantity (tables,
sizes, scales) reaches it as a tensor, so batch sizes, grids and layers reuse one compilation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .geometry import check_grid, field_of_view, head_groups, max_penalties, patch_coords, transform_distance
from .layout import BLOCK, LAYOUTS, TokenLayout, build_layout
from .plan import AttentionPlan

Tensor = torch.Tensor
log = logging.getLogger(__name__)

# Compiled FlexAttention kernels refuse smaller head dims on these devices; q, k, v are zero-padded
# to it (the scores and the kept columns of the output are unchanged).
MIN_HEAD_DIM = {"cuda": 16}
# Devices whose compiled kernel returns no log-sum-exp: the prefix keys are key slots of the kernel.
PREFIX_KEYS_IN_KERNEL = {"cpu"}
PREFIX = -2  # a prefix key's entry in the slot -> patch table (padding is -1)

_kernels: dict[str, object] = {}
_padded_logged: set[tuple[str, int]] = set()


def _compiled(name: str):
    if name not in _kernels:
        fn = flex_attention if name == "flex" else create_block_mask
        _kernels[name] = torch.compile(fn, dynamic=True)
    return _kernels[name]


def _geometry(plan: AttentionPlan, pattern: int, grid: tuple[int, int], layout: TokenLayout, prefix_keys: int,
              device) -> dict[str, Tensor]:
    """The tensors the mods read: each key slot's patch (``-1``: padding, ``PREFIX``: the prefix keys
    after the patches, if in the kernel), the grid width, the grid centre (doubled: integers) and each
    head's largest penalty (``fill_with="max"``)."""
    gy, gx = grid
    kind = plan.kind[pattern].to(device)
    patch = layout.patch.to(device)
    return {
        "patch": torch.cat([patch, patch.new_full((patch.shape[0], prefix_keys), PREFIX)], dim=1),
        "width": torch.tensor(gx, device=device),
        "centre_y": torch.tensor(gy - 1, device=device), "centre_x": torch.tensor(gx - 1, device=device),
        "top": max_penalties(kind, grid, plan.config.distance, torch.float32).to(device),
    }


def _half_planes(coef: Tensor) -> list[tuple[Tensor, Tensor]]:
    # One contiguous int64 (H,) tensor per coefficient: what the CPU code generator handles.
    return [(coef[:, c, 0].long().contiguous(), coef[:, c, 1].long().contiguous()) for c in range(coef.shape[1])]


def _slots(g: dict[str, Tensor], h, q_idx, kv_idx):
    """The query's and key's patches (``-1``: padding) and the key's offset from the query."""
    patch, width = g["patch"], g["width"]
    pq, pk = patch[h, q_idx], patch[h, kv_idx]
    return pq, pk, pk // width - pq // width, pk % width - pq % width


def _in_fov(planes, h, dy, dx):
    seen = dy == dy
    for a, b in planes:
        seen = seen & (a[h] * dy + b[h] * dx >= 0)
    return seen


def lookhere_mask_mod(coef: Tensor, g: dict[str, Tensor], masked: bool = True):
    """``mask_mod(b, h, q, kv)`` over the layout's slots: a patch sees the prefix keys and the patches
    in its FOV where ``masked`` (``fill_with="inf"``), else every patch; a padding slot sees only
    itself (a row with nothing to see would be empty)."""
    planes = _half_planes(coef)

    def mask_mod(b, h, q_idx, kv_idx):
        pq, pk, dy, dx = _slots(g, h, q_idx, kv_idx)
        seen = pk >= 0
        if masked:
            seen = seen & _in_fov(planes, h, dy, dx)
        return ((pq >= 0) & (seen | (pk == PREFIX))) | (q_idx == kv_idx)

    return mask_mod


def lookhere_score_mod(coef: Tensor, kind: Tensor, scale: Tensor, g: dict[str, Tensor], distance: str,
                       fill_with: str):
    """``score_mod``: minus the head's scaled penalty (distance, 0, or the key's centre distance);
    outside the FOV the fill's penalty (``fill_with`` zero or max; inf is the block mask's)."""
    width, centre_y, centre_x, top = g["width"], g["centre_y"], g["centre_x"], g["top"]
    planes, kind = _half_planes(coef), kind.long()

    def score_mod(score, b, h, q_idx, kv_idx):
        _, pk, dy, dx = _slots(g, h, q_idx, kv_idx)
        dist = transform_distance((dy * dy + dx * dx).to(torch.float32), distance)
        # In doubled integer coordinates: the CPU code generator cannot cast a table's integers to float.
        cy, cx = 2 * (pk // width) - centre_y, 2 * (pk % width) - centre_x
        to_centre = (cy * cy + cx * cx).to(torch.float32).sqrt() * 0.5
        k = kind[h]
        pen = torch.where(k == 0, dist, torch.where(k == 2, to_centre, torch.zeros_like(dist)))
        if fill_with != "inf":
            seen = _in_fov(planes, h, dy, dx)
            pen = torch.where(seen, pen, torch.zeros_like(pen) if fill_with == "zero" else top[h])
        return score - torch.where(pk == PREFIX, torch.zeros_like(pen), scale[h] * pen)

    return score_mod


def flex_state(plan: AttentionPlan, pattern: int, grid: tuple[int, int], prefix_keys: int, device,
               layout: str = "fitted"):
    """What one head pattern needs on one grid: its layout, the mods' tensors and the block mask
    (``prefix_keys``: how many prefix keys the kernel itself sees)."""
    def build():
        lay = build_layout(plan.coef[pattern].cpu(), grid, layout).to(device)
        g = _geometry(plan, pattern, grid, lay, prefix_keys, device)
        coef = plan.coef[pattern].to(device)
        blocks = _compiled("blocks")(lookhere_mask_mod(coef, g, plan.config.fill_with == "inf"), None,
                                     plan.num_heads, lay.slots, lay.slots + prefix_keys, device=device,
                                     BLOCK_SIZE=BLOCK)
        return lay, g, blocks

    return plan.cached(("flex", layout, pattern, grid, prefix_keys, device), build)


def _with_prefix_keys(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention over the kernel's keys (``out``, its log-sum-exp ``lse``) and the prefix keys ``k``,
    ``v`` (no penalty) together: the two softmaxes merged by their log-sum-exps, in float32 or wider."""
    dt = torch.promote_types(out.dtype, torch.float32)
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale  # (B, H, S, p)
    lse = lse.to(dt)
    top = torch.maximum(lse, s.amax(-1)).detach()
    w_kernel, w_prefix = (lse - top).exp(), (s - top[..., None]).exp()
    merged = w_kernel[..., None] * out.to(dt) + w_prefix @ v.to(dt)
    return (merged / (w_kernel + w_prefix.sum(-1))[..., None]).to(out.dtype)


def flex_attention_lookhere(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, layer: int,
                            grid: tuple[int, int], num_prefix_tokens: int, dropout_p: float = 0.0) -> Tensor:
    if dropout_p:
        raise ValueError("the flex backend has no attention dropout; use backend='dense' or 'slab' to train with it")
    B, H, T, D = q.shape
    device, p, pattern, cfg = q.device, num_prefix_tokens, plan.layer_pattern[layer], plan.config
    in_kernel = p if device.type in PREFIX_KEYS_IN_KERNEL else 0
    lay, g, block_mask = flex_state(plan, pattern, grid, in_kernel, device)
    coef, kind = plan.coef[pattern].to(device), plan.kind[pattern].to(device)
    score_mod = lookhere_score_mod(coef, kind, plan.scale[layer].to(device), g, cfg.distance, cfg.fill_with)
    ql = lay.gather(q[:, :, p:])
    kl, vl = (torch.cat([lay.gather(t[:, :, p:]), t[:, :, :in_kernel]], dim=2) for t in (k, v))
    pad = MIN_HEAD_DIM.get(device.type, 0) - D
    if pad > 0:
        if (device.type, D) not in _padded_logged:
            _padded_logged.add((device.type, D))
            log.info("FlexAttention on %s needs head dim >= %d: head dim %d is zero-padded", device.type, D + pad, D)
        ql_, kl_, vl_ = (F.pad(t, (0, pad)) for t in (ql, kl, vl))
    else:
        ql_, kl_, vl_ = ql, kl, vl
    scale = D ** -0.5
    merge = p and not in_kernel
    out = _compiled("flex")(ql_, kl_, vl_, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            return_aux=AuxRequest(lse=True) if merge else None)
    if merge:
        out, aux = out
        out = _with_prefix_keys(out[..., :D], aux.lse, ql, k[:, :, :p], v[:, :, :p], scale)
    elif pad > 0:
        out = out[..., :D]
    patches = lay.scatter(out)
    if not p:
        return patches
    # Prefix queries see every token without penalty: plain attention.
    return torch.cat([F.scaled_dot_product_attention(q[:, :, :p], k, v), patches], dim=2)


def flex_work(config, grid_size, num_heads: int = 12, depth: int = 12, num_prefix_tokens: int = 1,
              layout: str = "fitted") -> dict:
    """The work of the flex backend on one grid, from its own block masks, without a GPU.

    ``"computed"``: the (query, key) pairs computed, whole blocks of the kernel's block mask (padding
    included) plus the prefix tokens' rows and columns (attended outside the kernel), as a fraction
    of all pairs of the tokens (unmasked attention);
    ``"ideal"``: the fraction of pairs a query sees; both averaged over heads and layers, and per head
    group in ``"groups"``. ``layout``: ``"fitted"`` (the backend's) or ``"row-major"`` (to compare).
    The work is the GPU's: prefix keys merged outside the kernel.
    """
    from ..config import resolve_config

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")
    grid, p = check_grid(grid_size), int(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")
    cfg = resolve_config(config)
    plan = AttentionPlan(cfg, depth, num_heads)
    n = grid[0] * grid[1]
    tokens = (n + p) ** 2
    y, x = patch_coords(*grid)
    dy, dx = y[None, :] - y[:, None], x[None, :] - x[:, None]
    per_pattern = []
    for pattern in range(len(plan.patterns)):
        _, _, blocks = flex_state(plan, pattern, grid, 0, torch.device("cpu"), layout)
        pairs = (blocks.kv_num_blocks + (blocks.full_kv_num_blocks if blocks.full_kv_num_blocks is not None else 0))
        computed = (pairs.sum(-1)[0].double() * BLOCK * BLOCK + p * (2 * n + p)) / tokens
        if cfg.fill_with == "inf":
            seen = torch.stack([field_of_view(c[None], dy, dx)[0].sum() for c in plan.coef[pattern]]).double()
        else:
            seen = torch.full((num_heads,), float(n * n), dtype=torch.float64)
        ideal = (seen + 2 * p * n + p * p) / tokens
        per_pattern.append((computed, ideal))
    computed = torch.stack([per_pattern[plan.layer_pattern[l]][0] for l in range(depth)])  # (L, H)
    ideal = torch.stack([per_pattern[plan.layer_pattern[l]][1] for l in range(depth)])
    names = [head_groups(cfg.directions_for_layer(l, depth), num_heads) for l in range(depth)]
    groups: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(n for layer in names for n in layer):
        where = torch.tensor([[n == name for n in layer] for layer in names])
        groups[name] = {"computed": computed[where].mean().item(), "ideal": ideal[where].mean().item()}
    return {"computed": computed.mean().item(), "ideal": ideal.mean().item(), "groups": groups,
            "layout": layout, "block": BLOCK}
