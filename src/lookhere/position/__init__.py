"""Position encodings, one module per family, and their registry.

- ``base``: the interface (``PositionEncoding``: ``embed``, ``attend``, the unfused analysis view),
  test-time ``Knob`` s, patch coordinates;
- ``absolute``: learned-1d, sincos-2d, factorized, fourier;
- ``offset``: biases that are a function of the patch offset: rpe-learned, alibi-2d, fire;
- ``rope``: rope-2d-axial, rope-2d-mixed, rope-2d-dinov3;
- ``pape``: PaPE;
- ``lookhere``: LookHere's presets and any config of its own.

A larger grid extends the training grid's coordinates. Each encoding that reads them has the test-time
knob ``interpolate`` (``rope_interpolate``, ``sincos_interpolate``, ``fourier_interpolate``,
``rpe_interpolate``, ``alibi_interpolate``, ``pape_interpolate``), which squeezes any grid into the
training grid's coordinate range instead; Fourier divides coordinates by the training grid; RoPE-DINOv3
maps every grid onto [-1, 1] per axis; FIRE normalises offsets by the test grid's extent unless told
to use the training grid's; learned tables (learned-1d, factorized) are resampled; LookHere's knob is
its global slope. Each encoding initialises its own parameters (``init_weights``, called at
construction), and takes only the options its constructor names: ``build_position_encoding``
refuses any other.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, Mapping

from ..config import PRESETS, LookHereConfig, resolve_config
from .absolute import Factorized, Fourier, LearnedAbsolute, SinCos2d
from .base import Knob, PositionEncoding, interpolate_knob, patch_positions
from .lookhere import LookHere
from .offset import Alibi2d, Fire, OffsetBias, RelativeBias, alibi_slopes, patch_offsets
from .pape import Pape
from .rope import Rope2d, RopeDinoV3

__all__ = ["POSITION_ENCODINGS", "MODEL_ARGUMENTS", "BASELINES", "PositionEncoding", "Knob", "OffsetBias", "LookHere",
           "LearnedAbsolute", "SinCos2d", "Factorized", "Fourier", "RelativeBias", "Alibi2d", "Fire", "Rope2d",
           "RopeDinoV3", "Pape", "alibi_slopes", "patch_offsets", "patch_positions", "encoding_class",
           "encoding_options", "build_position_encoding", "registered_knobs", "apply_knob", "interpolate_knob", "relative_encodings",
           "absolute_encodings"]

# name -> factory. Every factory takes some of the model's ``embed_dim``, ``num_heads``, ``depth``
# and ``grid_size`` (the training grid); its other keyword arguments are the encoding's options.
POSITION_ENCODINGS: dict[str, Callable[..., PositionEncoding]] = {
    "none": PositionEncoding,
    "learned-1d": LearnedAbsolute,
    "sincos-2d": SinCos2d,
    "factorized": Factorized,
    "fourier": Fourier,
    "rpe-learned": RelativeBias,
    "alibi-2d": Alibi2d,
    "rope-2d-axial": partial(Rope2d, mixed=False),
    "rope-2d-mixed": partial(Rope2d, mixed=True),
    "fire": Fire,
    "pape": Pape,
    "rope-2d-dinov3": RopeDinoV3,
    **{name: partial(LookHere, config=name) for name in PRESETS},
    "lookhere": partial(LookHere, config="lh-90"),  # any LookHere config, given as lookhere_config
}
MODEL_ARGUMENTS = ("embed_dim", "num_heads", "depth", "grid_size")
# Everything but LookHere: the paper's baselines and the newer encodings, in registry order.
BASELINES = tuple(name for name, factory in POSITION_ENCODINGS.items()
                  if (factory.func if isinstance(factory, partial) else factory) is not LookHere)


def encoding_options(name: str) -> list[str]:
    """The options (``pos_options`` keys) that encoding ``name`` accepts."""
    params = inspect.signature(POSITION_ENCODINGS[name]).parameters
    fixed = POSITION_ENCODINGS[name].keywords if isinstance(POSITION_ENCODINGS[name], partial) else {}
    return [p for p in params if p not in MODEL_ARGUMENTS and p not in fixed]


def build_position_encoding(name: str, *, embed_dim: int, num_heads: int, depth: int, grid_size: tuple[int, int],
                            lookhere_config: str | Mapping[str, Any] | LookHereConfig | None = None,
                            **options: Any) -> PositionEncoding:
    """The encoding ``name`` for a model of the given shape; unknown options are an error.

    ``lookhere_config`` goes with ``name="lookhere"``; with a preset name (``"lh-90"``) it must
    equal that preset, so a model never carries one name and another config.
    """
    if name not in POSITION_ENCODINGS:
        raise ValueError(f"unknown pos_encoding={name!r}; allowed: {', '.join(POSITION_ENCODINGS)}")
    allowed = encoding_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"pos_options {unknown} are not options of pos_encoding={name!r}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    if lookhere_config is not None:
        if name == "lookhere":
            options["config"] = lookhere_config
        elif name in PRESETS:
            if resolve_config(lookhere_config) != resolve_config(name):
                raise ValueError(f"lookhere_config differs from the preset pos_encoding={name!r}; use "
                                 f"pos_encoding='lookhere' for a config of your own, or leave lookhere_config unset")
        else:
            raise ValueError(f"lookhere_config is set but pos_encoding={name!r} is not LookHere; allowed with: "
                             f"lookhere, {', '.join(PRESETS)}")
    model = dict(embed_dim=embed_dim, num_heads=num_heads, depth=depth, grid_size=tuple(grid_size))
    params = inspect.signature(POSITION_ENCODINGS[name]).parameters
    return POSITION_ENCODINGS[name](**{k: v for k, v in model.items() if k in params}, **options)


def encoding_class(name: str) -> type[PositionEncoding]:
    """The class behind a registered name (its factory may fix some options)."""
    factory = POSITION_ENCODINGS[name]
    return factory.func if isinstance(factory, partial) else factory


def relative_encodings() -> list[str]:
    """Registered names whose encoding acts in attention (``relative``), in registry order."""
    return [n for n in POSITION_ENCODINGS if n != "none" and encoding_class(n).relative]


def absolute_encodings() -> list[str]:
    """Registered names whose encoding adds a vector to the tokens, in registry order."""
    return [n for n in POSITION_ENCODINGS if n != "none" and not encoding_class(n).relative]


def registered_knobs() -> list[Knob]:
    """Every registered encoding's test-time knobs, each once, in registry order."""
    knobs: dict[str, Knob] = {}
    for name in POSITION_ENCODINGS:
        for knob in encoding_class(name).test_knobs:
            knobs.setdefault(knob.key, knob)
    return list(knobs.values())


def apply_knob(pe: PositionEncoding, key: str, value: Any) -> None:
    """Set test-time knob ``key`` of ``pe``; a knob its encoding lacks, or a value it does not
    allow, is one message."""
    if pe.knob(key) is None:
        owner = next((k.owner for k in registered_knobs() if k.key == key), None)
        if owner is None:
            raise ValueError(f"unknown knob {key!r}; knobs: {', '.join(k.key for k in registered_knobs())}")
        raise ValueError(f"{key} applies to {owner} models, not {pe.name}")
    pe.set_knob(key, value)
