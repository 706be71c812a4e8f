"""LookHere configuration: the published config dict as a typed, validated dataclass."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

DISTANCES = ("linear", "sqrt", "square")
FILLS = ("inf", "zero", "max")

# Each named group is four heads; each head is a tuple of primitives whose FOVs are intersected.
GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "halves": (("up",), ("down",), ("left",), ("right",)),
    "corners": (("up", "left"), ("up", "right"), ("down", "left"), ("down", "right")),
    "triangles": (("tri_up",), ("tri_down",), ("tri_left",), ("tri_right",)),
    "diagonals": (("diag_up_right",), ("diag_up_left",), ("diag_down_right",), ("diag_down_left",)),
    "eighths1": (("tri_up", "left"), ("tri_down", "left"), ("tri_left", "up"), ("tri_right", "up")),
    "eighths2": (("tri_up", "right"), ("tri_down", "right"), ("tri_left", "down"), ("tri_right", "down")),
    "none": ((),) * 4,
    "zero": (("zero",),) * 4,
    "center": (("center",),) * 4,
    "zerohalves": (("zero", "up"), ("zero", "down"), ("zero", "left"), ("zero", "right")),
    "zerocorners": (
        ("zero", "up", "left"),
        ("zero", "up", "right"),
        ("zero", "down", "left"),
        ("zero", "down", "right"),
    ),
    "zerotriangles": (("zero", "tri_up"), ("zero", "tri_down"), ("zero", "tri_left"), ("zero", "tri_right")),
    "none1zero3": ((),) + (("zero",),) * 3,
    "none2zero2": ((),) * 2 + (("zero",),) * 2,
    "none3zero1": ((),) * 3 + (("zero",),),
}

HEAD_COUNT_RULES = (
    "6 heads: 'a-b' (a's 4 heads, b's first 2)",
    "any multiple of 4: 'a' (its 4 heads repeated)",
    "12 heads: 'a-b' (a twice, b once) or 'a-b-c' (4 each)",
    "16 heads: 'a-b' (twice each), 'a-b-c' (a twice, b, c) or 'a-b-c-d' (4 each)",
)


def _is_slope(value: Any) -> bool:
    """A real number, finite and >= 0: an infinite slope times the zero self-distance is NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _bad(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"LookHere config: invalid {field_name}={value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class LookHereConfig:
    """The published LookHere config (see the spec): slopes, head directions, distance and fill mode.

    ``head_directions`` is one name string (e.g. ``"eighths1-eighths2-triangles"``) used by every
    layer, or a tuple of such strings, one per layer, as the published code also accepts.
    """

    global_slope: float = 1.0
    layer_slopes: tuple[float, float] = (1.0, 1.0)
    head_directions: str | tuple[str, ...] = "triangles"
    distance: str = "linear"
    fill_with: str = "inf"

    def __post_init__(self) -> None:
        if not _is_slope(self.global_slope):
            raise _bad("global_slope", self.global_slope, "a finite non-negative float")
        object.__setattr__(self, "global_slope", float(self.global_slope))
        pair = "a pair [first, last] of finite non-negative floats"
        if isinstance(self.layer_slopes, (str, bytes)) or not isinstance(self.layer_slopes, Sequence):
            raise _bad("layer_slopes", self.layer_slopes, pair)
        if len(self.layer_slopes) != 2 or not all(_is_slope(s) for s in self.layer_slopes):
            raise _bad("layer_slopes", self.layer_slopes, pair)
        object.__setattr__(self, "layer_slopes", tuple(float(s) for s in self.layer_slopes))
        if self.distance not in DISTANCES:
            raise _bad("distance", self.distance, ", ".join(DISTANCES))
        if self.fill_with not in FILLS:
            raise _bad("fill_with", self.fill_with, ", ".join(FILLS))
        dirs = self.head_directions
        if isinstance(dirs, str):
            names = [dirs]
        elif isinstance(dirs, Sequence) and dirs and all(isinstance(d, str) for d in dirs):
            object.__setattr__(self, "head_directions", tuple(dirs))
            names = list(dirs)
        else:
            raise _bad("head_directions", dirs, "a string like 'halves-triangles' or a list of them, one per layer")
        for spec in names:
            for name in spec.split("-"):
                if name not in GROUPS:
                    raise _bad("head_directions", spec, f"names joined by '-' from {sorted(GROUPS)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "LookHereConfig") -> "LookHereConfig":
        """Build from the published dict format; unknown keys are an error, not silently ignored."""
        if isinstance(d, LookHereConfig):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"LookHere config must be a dict or LookHereConfig, got {type(d).__name__}")
        known = {"global_slope", "layer_slopes", "head_directions", "distance", "fill_with"}
        unknown = set(d) - known
        if unknown:
            raise _bad("key", sorted(unknown)[0], ", ".join(sorted(known)))
        missing = {"global_slope", "layer_slopes", "head_directions"} - set(d)
        if missing:
            raise ValueError(f"LookHere config: missing required field(s) {sorted(missing)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """The published dict format (JSON/YAML friendly)."""
        d = asdict(self)
        d["layer_slopes"] = list(self.layer_slopes)
        if isinstance(self.head_directions, tuple):
            d["head_directions"] = list(self.head_directions)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def directions_for_layer(self, layer: int, depth: int) -> str:
        if isinstance(self.head_directions, str):
            return self.head_directions
        if len(self.head_directions) != depth:
            raise _bad(
                "head_directions",
                list(self.head_directions),
                f"one name string per layer ({depth} layers), or a single string",
            )
        return self.head_directions[layer]

    def replace(self, **changes: Any) -> "LookHereConfig":
        d = self.to_dict()
        d.update(changes)
        return LookHereConfig.from_dict(d)


# The configs stored in the released checkpoints (LH_180/90/45_weights_and_config.pth), for 12 heads:
# eight directed heads (LH-180 half-planes, LH-90 quadrants and 90 degree cones, LH-45 the eight
# 45 degree wedges) and four unmasked heads with distance penalties only (slopes 1/4 ... 1/256).
PRESETS: dict[str, dict[str, Any]] = {
    "lh-180": {"global_slope": 2.0, "layer_slopes": [1.5, 0.5], "head_directions": "halves-diagonals-none"},
    "lh-90": {"global_slope": 2.0, "layer_slopes": [1.5, 0.5], "head_directions": "corners-triangles-none"},
    "lh-45": {"global_slope": 2.0, "layer_slopes": [1.5, 0.5], "head_directions": "eighths1-eighths2-none"},
}


def resolve_config(config: str | Mapping[str, Any] | LookHereConfig) -> LookHereConfig:
    """A preset name, a published-format dict, or a LookHereConfig -> LookHereConfig."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise _bad("preset", config, ", ".join(PRESETS))
        return LookHereConfig.from_dict(PRESETS[config])
    return LookHereConfig.from_dict(config)


__all__ = ["LookHereConfig", "PRESETS", "GROUPS", "DISTANCES", "FILLS", "resolve_config"]
