"""A minimal pre-norm ViT with the LookHere bias, written out by hand: the reference our defaults must
match (tests) and learn as well as (benchmarks/backbone_ablation.py).

PyTorch's default initialisation of every layer, a zero CLS token, no LayerScale, a linear head on the
CLS token, and the published dense bias (``lookhere.dense_bias``) added to every attention score;
the CLS token sees, and is seen by, every patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lookhere


class MinimalBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MinimalViT(nn.Module):
    def __init__(self, num_classes: int, dim: int = 96, depth: int = 4, heads: int = 12, patch: int = 4,
                 preset: str = "lh-90"):
        super().__init__()
        self.preset, self.depth, self.heads = preset, depth, heads
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(MinimalBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._bias: dict[tuple[int, int], torch.Tensor] = {}

    def bias(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._bias:
            self._bias[grid] = F.pad(lookhere.dense_bias(self.preset, grid, self.depth, self.heads), (1, 0, 1, 0))
        return self._bias[grid]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        bias = self.bias(tuple(x.shape[-2:]))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, bias[i])
        return self.head(self.norm(x)[:, 0])

    def as_lookhere(self, **kwargs) -> nn.Module:
        """The same function as a ``lookhere.create_vit`` model (same weights, our attention backends)."""
        patch = self.patch.kernel_size[0]
        model = lookhere.create_vit(self.preset, img_size=patch, patch_size=patch, embed_dim=self.cls.shape[-1],
                                    depth=self.depth, num_heads=self.heads, num_classes=self.head.out_features,
                                    **kwargs)
        rename = {"patch.": "patch_embed.proj.", "cls": "cls_token", ".qkv.": ".attn.qkv.", ".proj.": ".attn.proj.",
                  ".fc1.": ".mlp.fc1.", ".fc2.": ".mlp.fc2."}
        state = {}
        for key, value in self.state_dict().items():
            for a, b in rename.items():
                if not key.startswith("patch_embed"):
                    key = key.replace(a, b)
            state[key] = value
        model.load_state_dict(state)
        return model
