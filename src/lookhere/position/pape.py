"""PaPE: a per-query sum of parabolas in the 2D patch offset, as extra q and k features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.chunked import sdpa_in_chunks
from .base import PositionEncoding, patch_positions


class Pape(PositionEncoding):
    """PaPE (Øhrstrøm et al., 2026, "Where to attend"): each query scores every key with a sum of
    parabolas in their 2D offset, whose shape the query chooses.

    Per layer, head ``h`` and parabola ``r``: a learned direction ``w`` projects the offset,
    ``d = w . (p_query - p_key)``, and ``bias = sum_r (-a_r d^2 + b_r d) / sqrt(head_dim)`` with
    ``a_r = softplus(.) >= 0`` and ``b_r`` linear in the query token: a peak at the offset
    ``b / 2a`` along ``w``, of width ``1 / sqrt(a)``. The authors compute ``a, b`` from the layer's
    input; the attention hook sees the layer's queries (all heads concatenated), an affine and
    generically invertible function of that input, so the same family of biases. Positions are patch
    indices; a larger grid extends them (the authors' extension), and there is no test-time knob.
    Both projections are ``nn.Linear`` layers, initialised and weight-decayed as the ViT's others.

    The bias is never materialised: expanding the square makes it one dot product of ``1 + 2P``
    extra query and key features, appended to q and k (as the authors do), computed in float32
    whatever the autocast dtype, since the expanded terms cancel.
    """

    name = "pape"
    relative = True
    layer_modules = ("direction", "shape")

    def __init__(self, embed_dim: int, num_heads: int, depth: int, parabolas: int = 50):
        super().__init__()
        self.num_heads, self.parabolas = num_heads, parabolas
        self.direction = nn.ModuleList(nn.Linear(2, num_heads * parabolas, bias=False) for _ in range(depth))
        self.shape = nn.ModuleList(nn.Linear(embed_dim, 2 * num_heads * parabolas, bias=False) for _ in range(depth))
        self.init_weights()

    def init_weights(self) -> None:
        for layer in (*self.direction, *self.shape):
            layer.reset_parameters()  # PyTorch's default, as the authors use

    def features(self, q: torch.Tensor, grid: tuple[int, int], layer: int, num_prefix_tokens: int):
        """Extra query ``(B, H, T, 1 + 2P)`` and key ``(1, H, T, 1 + 2P)`` features (float32) whose dot
        product is the bias, 0 for prefix tokens."""
        B, H, T, D = q.shape
        p, P = num_prefix_tokens, self.parabolas
        y, x = patch_positions(grid, device=q.device)
        # Centred: the bias depends only on offsets, and smaller coordinates lose less to cancellation.
        pos = torch.stack([y - (grid[0] - 1) / 2, x - (grid[1] - 1) / 2], dim=-1)
        u = F.linear(pos, self.direction[layer].weight.float()).view(-1, H, P).transpose(0, 1)  # (H, N, P)
        ab = F.linear(q[:, :, p:].transpose(1, 2).reshape(B, T - p, H * D).float(), self.shape[layer].weight.float())
        a, b = ab.view(B, T - p, 2, H, P).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, P) each
        a = F.softplus(a)
        # sum_r -a (u_q - u_k)^2 + b (u_q - u_k) = [sum_r -a u_q^2 + b u_q] + (2 a u_q - b) . u_k - a . u_k^2
        qf = torch.cat([(b * u - a * u * u).sum(-1, keepdim=True), 2 * a * u - b, -a], dim=-1)
        kf = torch.cat([torch.ones_like(u[..., :1]), u, u * u], dim=-1)[None]
        return F.pad(qf, (0, 0, p, 0)), F.pad(kf, (0, 0, p, 0))

    def _augmented(self, q, k, grid, layer, num_prefix_tokens):
        qf, kf = self.features(q, grid, layer, num_prefix_tokens)
        qa, ka = torch.cat([q.float(), qf], -1), torch.cat([k.float(), kf.expand(k.shape[0], -1, -1, -1)], -1)
        pad = -qa.shape[-1] % 8  # zero features up to a multiple of 8: GPU kernels need it for the fused path
        return F.pad(qa, (0, pad)), F.pad(ka, (0, pad))

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        with torch.autocast(q.device.type, enabled=False):
            qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
            scale, vf = q.shape[-1] ** -0.5, v.float()
            if q.device.type == "cpu":
                out = sdpa_in_chunks(qa, ka, vf, dropout_p=dropout_p, scale=scale)
            else:
                out = F.scaled_dot_product_attention(qa, ka, vf, dropout_p=dropout_p, scale=scale)
        return out.to(v.dtype)

    def attention_weights(self, q, k, *, grid, layer, num_prefix_tokens, state=None):
        qa, ka = self._augmented(q, k, grid, layer, num_prefix_tokens)
        return ((qa @ ka.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
