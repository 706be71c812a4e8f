"""Where a fine-tuning run starts: a trained model, its architecture and weights, with a new classifier.

``lookhere train --init-from SOURCE`` takes the model from SOURCE: a timm name with weights
(``vit_base_patch16_lookhere_90.in1k``; any of our registered names with ``--pretrained-file``), a
released LookHere ``.pth``, a model folder of ``save_model``, or a run directory (its best
checkpoint). Its architecture and position encoding are SOURCE's: a flag that asks for another is
refused by name. Its classifier is replaced for the data's classes (the released MLP head keeps
fc1 -> tanh and starts a new fc2); every other tensor is SOURCE's. The model runs at any image
size, so fine-tuning at another size needs nothing here: each encoding adapts its own way (LookHere:
nothing to adapt; learned-1d: its table resampled to the grid; RoPE: as it is). Stochastic depth is a
training setting, not architecture: ``--drop-path`` sets the rate, the source's is kept where it is not given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .flags import flag
from .io import load_trained, tensor_digest
from .vit import VisionTransformer

# TrainConfig fields that describe the architecture: with --init-from they come from the source.
ARCHITECTURE = ("pos_encoding", "lookhere_config", "pos_options", "model", "embed_dim", "depth", "num_heads",
                "patch_size", "init_values", "weight_init")


def load_source(source: str, pretrained_file: Optional[str] = None, num_heads: int = 12,
                num_classes: Optional[int] = None) -> tuple[VisionTransformer, str]:
    """The model SOURCE names, with its weights, and what kind of source it was. A timm model is made
    with ``num_classes`` outputs (timm then leaves the file's classifier out where the counts differ)."""
    import timm

    path = Path(source)
    if path.exists():
        if pretrained_file:
            raise ValueError(f"--pretrained-file goes with a timm model name in --init-from, not with the path {source}")
        try:
            return load_trained(path, num_heads=num_heads)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--init-from {e}") from None
    if not timm.is_model(source):
        raise FileNotFoundError(f"--init-from {source}: no such file or folder, and not a registered model name "
                                f"(ours: {', '.join(timm.list_models('vit_*_lookhere*', pretrained=True))})")
    overlay = {"file": str(pretrained_file)} if pretrained_file else None
    if pretrained_file and not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"--pretrained-file {pretrained_file} does not exist")
    model = timm.create_model(source, pretrained=True, pretrained_cfg_overlay=overlay,
                              **({"num_classes": num_classes} if num_classes else {}))
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"--init-from {source}: a timm model, but not one of lookhere's ViTs")
    return model, "timm"


def refuse_other_architecture(cfg: Any, theirs: dict[str, Any], source: str,
                              names: tuple[str, ...] = ARCHITECTURE) -> None:
    """Refuse, in one message naming every flag, settings of ``cfg`` (the run's ``TrainConfig``) among
    ``names`` that ask for another architecture than ``theirs`` (create_vit's arguments of the model
    ``source`` names: ``--init-from X`` or ``--model NAME``)."""
    sizes = {k: theirs[k] for k in ("embed_dim", "depth", "num_heads")}
    conflicts = []
    for name in names:
        value = getattr(cfg, name)  # unset (None): the source's
        if value is None:
            continue
        if name == "model":
            try:
                asked = {k: v for k, v in cfg.model_kwargs(1).items() if k in sizes}
            except ValueError:  # an unknown size name
                asked = {}
            if asked != sizes:
                conflicts.append(f"{flag(name)} {value} (the source is {sizes['embed_dim']} wide, {sizes['depth']} "
                                 f"blocks, {sizes['num_heads']} heads)")
        elif value != theirs.get(name) and not (name == "init_values" and not value and not theirs.get(name)):
            conflicts.append(f"{flag(name)} {value} (the source's: {theirs.get(name)})")
    if conflicts:
        raise ValueError(f"{source} sets the architecture and the position encoding; leave out "
                         f"or match: {'; '.join(conflicts)}")


def check_architecture(cfg: Any, model: VisionTransformer) -> None:
    """Refuse settings that ask for another architecture than the source model's."""
    own = model.config
    refuse_other_architecture(cfg, {k: getattr(own, k) for k in (
        "pos_encoding", "lookhere_config", "pos_options", "patch_size", "init_values", "weight_init", "embed_dim",
        "depth", "num_heads")}, f"--init-from {cfg.init_from}")


def start_from(cfg: Any, num_classes: int) -> tuple[VisionTransformer, dict[str, Any]]:
    """The run's first model: the source's, its classifier new for ``num_classes``; and the record of
    where it started (kept in the run directory as ``init.json``, checked on resume)."""
    model, kind = load_source(cfg.init_from, cfg.pretrained_file, cfg.num_heads or 12, num_classes)
    check_architecture(cfg, model)
    rate = cfg.drop_path
    if rate is not None and rate != model.config.drop_path_rate:  # the same weights, in blocks with the run's rate
        weights = model.state_dict()
        model = VisionTransformer(**{**model.config.to_dict(), "drop_path_rate": rate})
        model.load_state_dict(weights)
    state = model.state_dict()
    classifier = {n for n, _ in model.get_classifier().named_parameters(prefix="head.fc2" if model.config.head_hidden_dim
                                                                          else "head")}
    # the digest leaves the classifier out: it is replaced, and a timm source made for another class
    # count draws it at random (it would change with --seed)
    record = {"init_from": cfg.init_from, "pretrained_file": cfg.pretrained_file, "kind": kind,
              "sha256": tensor_digest((k, v) for k, v in state.items() if k not in classifier),
              "digest_of": "every tensor but the classifier", "new": sorted(classifier),
              "kept": len(set(state) - classifier)}
    model.reset_classifier(num_classes)
    return model.train(), record
