"""LookHere: directed 2D attention masks and distance penalties, run by ``lookhere.attention``."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F

from ..attention import BACKENDS, AttentionPlan, attend
from ..attention.geometry import layer_bias
from ..config import LookHereConfig
from .base import Knob, PositionEncoding

GLOBAL_SLOPE = Knob("lh_global_slope", "global_slope", "LookHere", "slope",
                    "LookHere: scale of the distance penalty at test time", size_ratio=True)


class LookHere(PositionEncoding):
    """LookHere: directed 2D attention masks and distance penalties; no parameters.

    The heads' tables and scales are built once, as an :class:`AttentionPlan`, and follow ``.to()``.
    ``config.global_slope`` is the published test-time knob: replace the config to change it
    (``pe.config = pe.config.replace(global_slope=...)``, or ``set_knob("lh_global_slope", ...)``),
    which rebuilds the plan; the saved model records it in its LookHere config.
    """

    knobs = ("backend",)
    test_knobs = (GLOBAL_SLOPE,)
    relative = True

    def __init__(self, config: str | Mapping[str, Any] | LookHereConfig, depth: int, num_heads: int,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        self.name = config if isinstance(config, str) else "lookhere"
        self.depth, self.num_heads = depth, num_heads
        self.config = config

    @property
    def config(self) -> LookHereConfig:
        return self.plan.config

    @config.setter
    def config(self, config: str | Mapping[str, Any] | LookHereConfig) -> None:
        old = self._modules.get("plan")
        plan = AttentionPlan(config, self.depth, self.num_heads)
        self.plan = plan if old is None else plan.to(old.scale.device)

    def get_knob(self, key: str) -> Any:
        return self.config.global_slope

    def set_knob(self, key: str, value: Any) -> None:
        self.config = self.config.replace(global_slope=GLOBAL_SLOPE.check(value))

    def attend(self, q, k, v, *, grid, layer, num_prefix_tokens, dropout_p=0.0, state=None):
        return attend(q, k, v, self.plan, layer=layer, grid_size=grid, num_prefix_tokens=num_prefix_tokens,
                      backend=self.backend, dropout_p=dropout_p)

    def score_bias(self, *, grid, layer, num_prefix_tokens, device):
        bias = layer_bias(self.config, grid, layer, self.depth, self.num_heads, device=device)
        return F.pad(bias, (num_prefix_tokens, 0, num_prefix_tokens, 0))

    def resolved(self) -> dict[str, Any]:
        return {**super().resolved(), "config": self.config.to_dict()}

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
