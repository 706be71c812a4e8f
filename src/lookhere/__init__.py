"""lookhere: vision transformers that train at one image size and run at any other.

LookHere (Fuller et al., NeurIPS 2024) replaces the position encoding with directed 2D attention
masks and distance penalties; this package implements it exactly as published, on a ViT that takes
any image size and aspect ratio, registered in timm.
"""

from .attention import dense_bias, lookhere_attention
from .config import PRESETS, LookHereConfig
from .io import load_model, load_official, save_model
from .position import POSITION_ENCODINGS
from .vit import ViTConfig, VisionTransformer, checkpoint_filter_fn, create_vit

__version__ = "0.1.0"

__all__ = [
    "LookHereConfig", "PRESETS", "POSITION_ENCODINGS", "ViTConfig", "VisionTransformer", "checkpoint_filter_fn",
    "create_vit", "dense_bias", "load_model", "load_official", "lookhere_attention", "save_model",
]
