"""PaPE: a per-query sum of parabolas in the 2D patch offset, as extra q and k features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PositionEncoding, interpolate_knob, patch_positions

INTERPOLATE = interpolate_knob("pape", "PaPE")


class Pape(PositionEncoding):
    """PaPE (Øhrstrøm et al., 2026, "Where to attend"): each query scores every key with a sum of
    parabolas in their 2D offset, whose shape the query chooses.

    Per layer, head ``h`` and parabola ``r``: a learned direction ``w`` projects the offset,
    ``d = w . (p_query - p_key)``, and ``bias = sum_r (-a_r d^2 + b_r d) / sqrt(head_dim)`` with
    ``a_r = softplus(.) >= 0`` and ``b_r`` linear in the query token: a peak at the offset
    ``b / 2a`` along ``w``, of width ``1 / sqrt(a)``. The authors compute ``a, b`` from the layer's
    input; the attention hook sees the layer's queries (all heads concatenated), an affine and
    generically invertible function of that input, so the same family of biases. Positions are patch
    indices; a larger grid extends them (the authors' extension), or with ``interpolate=True`` (the
    test-time knob) is squeezed into the training grid's range.
    Both projections are ``nn.Linear`` layers, initialised and weight-decayed as the ViT's others.

    The bias is never materialised. A sum of parabolas along directions in 2D is one quadratic in
    the offset ``delta``: ``sum_r a_r (w_r . delta)^2 = delta' A delta`` with ``A = sum_r a_r w_r w_r'``
    (2x2, per query and head) and ``sum_r b_r w_r . delta = beta . delta``. Expanded, it is one dot
    product of 6 extra query and key features (the key's ``1, y, x, y^2, x^2, yx``), appended to q and
    k, whatever the number of parabolas: 6 where the authors append ``1 + 2P`` (101 for P = 50), the
    same bias. Computed in float32 whatever the autocast dtype, since the expanded terms cancel.
    """

    name = "pape"
    relative = True
    knobs = ("interpolate",)
    test_knobs = (INTERPOLATE,)
    layer_modules = ("direction", "shape")

    def __init__(self, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int], parabolas: int = 50,
                 interpolate: bool = False):
        super().__init__()
        self.num_heads, self.parabolas, self.grid_size = num_heads, parabolas, tuple(grid_size)
        self.interpolate = INTERPOLATE.check(interpolate, "pape interpolate")
        self.direction = nn.ModuleList(nn.Linear(2, num_heads * parabolas, bias=False) for _ in range(depth))
        self.shape = nn.ModuleList(nn.Linear(embed_dim, 2 * num_heads * parabolas, bias=False) for _ in range(depth))
        self.init_weights()

    def init_weights(self) -> None:
        for layer in (*self.direction, *self.shape):
            layer.reset_parameters()  # PyTorch's default, as the authors use

    def features(self, q: torch.Tensor, grid: tuple[int, int], layer: int, num_prefix_tokens: int):
        """Extra query ``(B, H, T, 6)`` and key ``(1, H, T, 6)`` features (float32) whose dot product is
        the bias, 0 for prefix tokens."""
        B, H, T, D = q.shape
        p, P = num_prefix_tokens, self.parabolas
        y, x = patch_positions(grid, self.grid_size, device=q.device, interpolate=self.interpolate)
        # Centred: the bias depends only on offsets, and smaller coordinates lose less to cancellation.
        extent = self.grid_size if self.interpolate else grid
        y, x = y - (extent[0] - 1) / 2, x - (extent[1] - 1) / 2
        w = self.direction[layer].weight.float().view(H, P, 2)  # w_r = (w_y, w_x)
        shape_a, shape_b = self.shape[layer].weight.float().view(2, H, P, -1).unbind(0)
        tokens = q[:, :, p:].transpose(1, 2).reshape(B, T - p, H * D).float()
        a = F.softplus(F.linear(tokens, shape_a.reshape(H * P, -1))).view(B, T - p, H, P).transpose(1, 2)
        outer = torch.stack([w[..., 0] * w[..., 0], w[..., 1] * w[..., 1], w[..., 0] * w[..., 1]], -1)
        ayy, axx, axy = torch.einsum("bhnp,hpc->cbhn", a, outer)  # A's entries, (B, H, N) each
        # beta = sum_r b_r w_r is linear in the query: one projection to 2 numbers a head, not P.
        beta_weight = torch.einsum("hpc,hpk->hkc", shape_b, w).reshape(H * 2, -1)
        by, bx = F.linear(tokens, beta_weight).view(B, T - p, H, 2).permute(3, 0, 2, 1)
        # -(u_q - u_k)' A (u_q - u_k) + beta . (u_q - u_k), u = (y, x), expanded over the key's monomials
        ay, ax = ayy * y + axy * x, axy * y + axx * x  # A u_q
        qf = torch.stack([by * y + bx * x - (ay * y + ax * x), 2 * ay - by, 2 * ax - bx, -ayy, -axx, -2 * axy], -1)
        kf = torch.stack([torch.ones_like(y), y, x, y * y, x * x, y * x], -1).expand(1, H, -1, -1)
        return F.pad(qf, (0, 0, p, 0)), F.pad(kf, (0, 0, p, 0))

    def _augmented(self, q, k, grid, layer, num_prefix_tokens):
        qf, kf = self.features(q, grid, layer, num_prefix_tokens)
        qa, ka = torch.cat([q.float(), qf], -1), torch.cat([k.float(), kf.expand(k.shape[0], -1, -1, -1)], -1)
        pad = -qa.shape[-1] % 8  # zero features up to a multiple of 8: GPU kernels need it for the fused path
        return F.pad(qa, (0, pad)), F.pad(ka, (0, pad))

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        with torch.autocast(q.device.type, enabled=False):
            qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
            # Values padded to the queries' width: the fused kernels (the CPU's flash kernel among
            # them) want one head width, and build no T x T scores.
            vf = F.pad(v.float(), (0, qa.shape[-1] - v.shape[-1]))
            out = F.scaled_dot_product_attention(qa, ka, vf, dropout_p=dropout_p, scale=q.shape[-1] ** -0.5)
        return out[..., :v.shape[-1]].to(v.dtype)

    def attention_weights(self, q, k, *, grid, layer, num_prefix_tokens, state=None):
        qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
        return ((qa @ ka.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
