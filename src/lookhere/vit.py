"""A plain pre-norm ViT (CLS token; LayerScale and timm's initialisation as options) for any image size.

The position encoding is a module (``lookhere.position``) that the model hands the current patch
grid at every forward, so one model runs at any size and aspect ratio with no set-up call.
Registered in timm: ``timm.create_model("vit_base_patch16_lookhere_90")``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, named_apply, register_model
from timm.models._features import feature_take_indices

from .config import LookHereConfig
from .official import checkpoint_filter_fn
from .position import BASELINES, PositionEncoding, build_position_encoding

# Drop-path rate per block: the same in every block (the released LookHere models, DeiT-III), or
# rising linearly from 0 in the first block (DeiT, timm's ViT).
DROP_PATH_SCHEDULES = ("uniform", "linear")
# Pooling before the head: the CLS token, the mean of the patch tokens, or none (every token).
GLOBAL_POOLS = ("token", "avg", "")
# How the layers start. "torch": each layer's own PyTorch initialisation and a zero CLS token, what a
# ViT written by hand gets; models trained from scratch learn best so (docs/backbone-ablation.md: timm's
# N(0, 0.02) is about PyTorch's scale at width 768 but a third of it at width 96, and small models
# learned less and extrapolated worse with it). "timm": timm's ViT and DeiT-III, every Linear and the
# CLS token N(0, 0.02), biases 0: the released LookHere models' recipe.
WEIGHT_INITS = ("torch", "timm")


@dataclass
class ViTConfig:
    """Everything needed to rebuild a model; saved next to its weights (JSON/YAML round-trip)."""

    pos_encoding: str = "lh-90"
    lookhere_config: Optional[dict] = None
    pos_options: Optional[dict] = None  # extra arguments of the encoding, e.g. {"interpolate": True}
    img_size: Union[int, tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # 0 turns each off (timm.create_model drops keyword arguments that are None)
    init_values: Optional[float] = None  # LayerScale's initial value (the released models: 1e-4)
    head_hidden_dim: Optional[int] = None  # the LookHere head's hidden width (fc1 -> tanh -> fc2)
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "uniform"
    weight_init: str = "torch"  # one of WEIGHT_INITS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("img_size"), list):
            d["img_size"] = tuple(d["img_size"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _pair(x: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


# The patch grid is read from the input's shape and the position encoding computes with it in Python
# (cached tables, masks, coordinates), so both stay opaque to torch.fx: a traced model keeps them as
# calls that run at every forward, and works at any image size.
@register_notrace_function
def image_grid(x: torch.Tensor, patch_size: int, in_chans: int) -> tuple[int, int]:
    """Check an image batch and return its patch grid, with a message that says what is wrong."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {c} (shape {tuple(x.shape)})")
    p = patch_size
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(
            f"image size {h}x{w} is not a positive multiple of the patch size {p}; "
            f"resize or crop to e.g. {max(p, h // p * p)}x{max(p, w // p * p)}"
        )
    return h // p, w // p


@register_notrace_function
def embed_positions(pos: PositionEncoding, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return pos.embed(x, grid)


@register_notrace_function
def position_state(pos: PositionEncoding, grid: tuple[int, int], device: torch.device) -> Any:
    return pos.forward_state(grid, device)


@register_notrace_function
def attend_positions(pos: PositionEncoding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                     layer: int, num_prefix_tokens: int, dropout_p: float, state: Any) -> torch.Tensor:
    return pos.attend(q, k, v, grid=grid, layer=layer, num_prefix_tokens=num_prefix_tokens, dropout_p=dropout_p,
                      state=state)


class Attention(nn.Module):
    """Multi-head self-attention whose score computation is delegated to the position encoding."""

    def __init__(self, dim: int, num_heads: int, layer: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.layer = num_heads, dim // num_heads, layer
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, pos: PositionEncoding, grid: tuple[int, int], num_prefix_tokens: int,
                state: Any = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend_positions(pos, q, k, v, grid, self.layer, num_prefix_tokens,
                             self.attn_drop if self.training else 0.0, state)
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, layer: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, layer, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, pos: PositionEncoding, grid: tuple[int, int], num_prefix_tokens: int, state: Any = None):
        """``state``: the encoding's per-forward values (``PositionEncoding.forward_state``), shared by every block."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), pos, grid, num_prefix_tokens, state)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT with a pluggable position encoding; see :class:`ViTConfig` for the arguments."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        kwargs.pop("dynamic_img_size", None)  # always dynamic; accepted for timm compatibility
        cfg = self._built_config = ViTConfig.from_dict(kwargs)
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False
        if cfg.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={cfg.global_pool!r}; allowed: {GLOBAL_POOLS}")
        if cfg.weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init={cfg.weight_init!r}; allowed: torch (PyTorch's own, for training from "
                             f"scratch), timm (N(0, 0.02), as the released models)")
        img = _pair(cfg.img_size)
        if img[0] % cfg.patch_size or img[1] % cfg.patch_size:
            raise ValueError(f"img_size={cfg.img_size} is not a multiple of patch_size={cfg.patch_size}")
        self.grid_size = (img[0] // cfg.patch_size, img[1] // cfg.patch_size)

        self.patch_embed = PatchEmbed(img, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      output_fmt="NHWC", strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_encoding = build_position_encoding(
            cfg.pos_encoding, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, depth=cfg.depth,
            grid_size=self.grid_size, lookhere_config=cfg.lookhere_config, **(cfg.pos_options or {}),
        )
        self._built_lookhere = getattr(self.pos_encoding, "config", None)
        self._built_knobs = self._encoding_knobs()
        if cfg.drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise ValueError(f"drop_path_schedule={cfg.drop_path_schedule!r}; allowed: uniform (drop_path_rate in "
                             f"every block, as the released LookHere models), linear (0 rising to drop_path_rate)")
        if cfg.drop_path_schedule == "uniform":
            dpr = [cfg.drop_path_rate] * cfg.depth
        else:
            dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, i, cfg.mlp_ratio, cfg.qkv_bias, cfg.init_values,
                  cfg.proj_drop_rate, cfg.attn_drop_rate, dpr[i], cfg.norm_eps)
            for i in range(cfg.depth)
        )
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=cfg.embed_dim, reduction=cfg.patch_size)
                             for i in range(cfg.depth)]
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._make_head(cfg.num_classes)
        self._init_weights()

    # --- construction -------------------------------------------------------------------------
    def _encoding_knobs(self) -> dict[str, Any]:
        return {k: getattr(self.pos_encoding, k) for k in self.pos_encoding.knobs}

    @property
    def config(self) -> ViTConfig:
        """The config that rebuilds this model as it is now (what ``save_model`` writes).

        The construction arguments, updated by what was changed since: classifier and pooling
        (``reset_classifier``), the LookHere config (e.g. its ``global_slope``) and the encoding's
        test-time knobs (``pos_encoding.knobs``).
        """
        changes: dict[str, Any] = dict(num_classes=self.num_classes, global_pool=self.global_pool)
        lookhere = getattr(self.pos_encoding, "config", None)
        if isinstance(lookhere, LookHereConfig) and lookhere != self._built_lookhere:
            changes.update(pos_encoding="lookhere", lookhere_config=lookhere.to_dict())
        knobs = {k: v for k, v in self._encoding_knobs().items() if v != self._built_knobs.get(k)}
        if knobs:
            changes["pos_options"] = {**(self._built_config.pos_options or {}), **knobs}
        return dataclasses.replace(self._built_config, **changes)

    def _make_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised head (none without classes: timm's models then give the pooled features)."""
        if num_classes <= 0:
            return nn.Identity()
        if self._built_config.head_hidden_dim:
            # The published LookHere head: fc1 -> tanh -> fc2, starting at uniform predictions.
            head = Mlp(self.embed_dim, self._built_config.head_hidden_dim, num_classes, act_layer=nn.Tanh)
            self._init_layers(head)
            head.fc2 = self._logits(head.fc2, num_classes)
            return head
        head = nn.Linear(self.embed_dim, num_classes)
        self._init_layers(head)
        return head

    @staticmethod
    def _logits(fc2: nn.Linear, num_classes: int) -> nn.Module:
        """The LookHere head's classifier, starting at uniform predictions over ``num_classes``."""
        if num_classes <= 0:
            return nn.Identity()
        nn.init.zeros_(fc2.weight)
        nn.init.constant_(fc2.bias, -math.log(num_classes))
        return fc2

    def _init_layers(self, module: nn.Module) -> None:
        """``weight_init``'s initialisation of ``module``'s layers (PyTorch's is what they were built with)."""
        if self._built_config.weight_init == "timm":
            named_apply(_init_timm_layer, module, include_root=True)

    def _init_weights(self) -> None:
        """``weight_init`` for every layer but the position encoding's, which owns its own, and the head's,
        made with it."""
        if self._built_config.weight_init == "timm":
            trunc_normal_(self.cls_token, std=0.02)
        for child in self.children():
            if child is not self.pos_encoding and child is not self.head:
                self._init_layers(child)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"pos_encoding.{n}" for n in self.pos_encoding.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # an encoding's per-block modules (FIRE's MLPs, PaPE's projections) go with their block
        per_block = "|".join(self.pos_encoding.layer_modules)
        encoding = rf"^pos_encoding(?!\.(?:{per_block})\.\d)" if per_block else r"^pos_encoding"
        return dict(stem=rf"^cls_token|{encoding}|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None),
                            *[(rf"^pos_encoding\.{name}\.(\d+)", None) for name in self.pos_encoding.layer_modules],
                            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def head_hidden_size(self) -> int:
        """Width of the pre-logits features: the LookHere head's fc1 -> tanh is a pre-logits stage and
        fc2 its classifier (timm's "head.fc2"); other heads take the pooled token."""
        return self.head.fc1.out_features if isinstance(self.head, Mlp) else self.embed_dim

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc2 if isinstance(self.head, Mlp) else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool={global_pool!r}; allowed: {GLOBAL_POOLS}")
            self.global_pool = global_pool
        like = self.cls_token
        if isinstance(self.head, Mlp):  # keep the pre-logits stage (fc1 -> tanh), as timm's loading does
            fc2 = nn.Linear(self.head.fc1.out_features, max(num_classes, 1), device=like.device, dtype=like.dtype)
            self.head.fc2 = self._logits(fc2, num_classes)
        else:
            self.head = self._make_head(num_classes).to(device=like.device, dtype=like.dtype)
        self.head.train(self.training)

    # --- forward ------------------------------------------------------------------------------
    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """Check an image batch and return its patch grid, with a message that says what is wrong."""
        return image_grid(x, self.patch_size, self._built_config.in_chans)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Any]:
        """Tokens (CLS first), the patch grid, and the encoding's state for this forward."""
        grid = self.grid_for(x)
        x = self.patch_embed(x).flatten(1, 2)
        x = embed_positions(self.pos_encoding, x, grid)
        state = position_state(self.pos_encoding, grid, x.device)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1), grid, state

    def _block(self, blk: Block, x: torch.Tensor, grid: tuple[int, int], state: Any) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(blk, x, self.pos_encoding, grid, self.num_prefix_tokens, state)
        return blk(x, self.pos_encoding, grid, self.num_prefix_tokens, state)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid, state = self._embed(x)
        for blk in self.blocks:
            x = self._block(blk, x, grid, state)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        if pre_logits:
            return self.head.act(self.head.fc1(x)) if isinstance(self.head, Mlp) else x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API: block outputs as NCHW maps (or NLC tokens)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}; allowed: NCHW, NLC")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, (gy, gx), state = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        inter = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, (gy, gx), state)
            if i in take:
                inter.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in inter]
        inter = [y[:, p:] for y in inter]
        if output_fmt == "NCHW":
            inter = [y.reshape(y.shape[0], gy, gx, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if return_prefix_tokens:
            inter = list(zip(inter, prefix))
        if intermediates_only:
            return inter
        return self.norm(x), inter

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _init_timm_layer(module: nn.Module, name: str = "") -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_vit(pos_encoding: str = "lh-90", img_size: Union[int, tuple[int, int]] = 224, patch_size: int = 16,
               embed_dim: int = 768, depth: int = 12, num_heads: int = 12, num_classes: int = 1000,
               **kwargs: Any) -> VisionTransformer:
    """Build the backbone with a position encoding from ``lookhere.POSITION_ENCODINGS``."""
    return VisionTransformer(pos_encoding=pos_encoding, img_size=img_size, patch_size=patch_size,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=num_classes,
                             **kwargs)


# --- timm registry ---------------------------------------------------------------------------
SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=12),
    "small": dict(embed_dim=384, depth=12, num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_VARIANTS = {"180": "lh-180", "90": "lh-90", "45": "lh-45"}
# The paper's baselines and newer encodings on the same backbone (``lookhere.position.BASELINES``):
# vit_{size}_patch16_pe_{encoding with underscores}.


def _name(size: str, pos_encoding: str) -> str:
    if pos_encoding.startswith("lh-"):
        return f"vit_{size}_patch16_lookhere_{pos_encoding[3:]}"
    return f"vit_{size}_patch16_pe_{pos_encoding.replace('-', '_')}"


MODEL_NAMES = {(size, pe): _name(size, pe) for size in SIZES for pe in (*_VARIANTS.values(), *BASELINES)}
_SIZE_AND_ENCODING = {name: key for key, name in MODEL_NAMES.items()}


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


# The paper's architecture around LookHere (DeiT-III's ViT as the authors trained it): an MLP head
# (width -> mlp_ratio x width -> classes, tanh) whose last layer starts at weight 0 and bias
# -ln(classes) (-6.9 for ImageNet's 1000, as released: uniform predictions, whichever the classes; a
# softmax ignores the constant, so it changes no step), LayerScale 1e-4, and drop-path 0.1 in every
# block, all initialised as timm's ViT. Every LookHere variant is built so.
# The registered baselines share its backbone (LayerScale 1e-4, timm's initialisation) with a linear head.
PAPER_BACKBONE = dict(init_values=1e-4, weight_init="timm")
LOOKHERE_ARCH = dict(PAPER_BACKBONE, drop_path_rate=0.1, drop_path_schedule="uniform")
# The released weights (ViT-B/16, ImageNet-1k, 150 epochs at 224 px) on the Hugging Face Hub, with
# the paper's evaluation at 224 px: shorter side to 256, centre crop 224, bicubic, ImageNet mean/std.
RELEASED_HUB_ID = "antofuller/LookHere"


def _released_cfg(variant: str) -> dict:
    return _cfg(hf_hub_id=RELEASED_HUB_ID, hf_hub_filename=f"LH_{variant}_weights_and_config.pth",
                crop_pct=0.875, crop_mode="center", classifier="head.fc2", license=None,
                origin_url=f"https://huggingface.co/{RELEASED_HUB_ID}",
                paper_name="LookHere: Vision Transformers with Directed Attention Generalize and Extrapolate")


_RELEASED = {_name("base", pe): variant for variant, pe in _VARIANTS.items()}
default_cfgs = generate_default_cfgs({
    **{f"{name}.in1k": _released_cfg(variant) for name, variant in _RELEASED.items()},
    **{name: _cfg(classifier="head.fc2" if pe.startswith("lh-") else "head")
       for (_, pe), name in MODEL_NAMES.items() if name not in _RELEASED},
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs,
    )


def architecture(name: str, **kwargs: Any) -> dict[str, Any]:
    """The :func:`create_vit` arguments of a registered name (``vit_base_patch16_lookhere_90``), with
    ``kwargs`` over them: what ``timm.create_model(name)`` builds."""
    if name not in _SIZE_AND_ENCODING:
        raise ValueError(f"{name!r} is not one of lookhere's registered models "
                         f"(e.g. {', '.join(n for n in _RELEASED)})")
    size, pos_encoding = _SIZE_AND_ENCODING[name]
    args = dict(patch_size=16, pos_encoding=pos_encoding, **SIZES[size], **PAPER_BACKBONE)
    if pos_encoding.startswith("lh-"):
        args.update(LOOKHERE_ARCH)
    args.update(kwargs)
    if pos_encoding.startswith("lh-") and "head_hidden_dim" not in kwargs:
        args["head_hidden_dim"] = int(args["embed_dim"] * args.get("mlp_ratio", 4.0))
    return args


def _register(size: str, pos_encoding: str, name: str) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _create(name, pretrained, **architecture(name, **kwargs))

    fn.__name__ = name
    fn.__doc__ = (f"ViT-{size.capitalize()}/16 with the {pos_encoding} position encoding. "
                  f"init_values=0 turns LayerScale off, head_hidden_dim=0 gives a linear head.")
    fn.__module__ = __name__
    register_model(fn)


for (_size, _pe), _model_name in MODEL_NAMES.items():
    _register(_size, _pe, _model_name)
