"""Fine-tuning: ``lookhere train --init-from SOURCE`` from a released file, a timm name, a model folder
or a run, on a folder of photographs with other classes, then ``lookhere eval`` at two sizes."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from lookhere import load_model, save_model
from lookhere.config import resolve_config
from lookhere.cli import main
from lookhere.train import FINETUNE_DEFAULTS, TrainConfig, initial_model, set_up, train

from conftest import LH, image_folder

FOLDER = ["--img-size", "32", "--batch-size", "4", "--epochs", "1", "--no-progress"]


@pytest.fixture
def released(released_file):
    return released_file


@pytest.fixture
def photos(tmp_path):
    image_folder(tmp_path / "photos")  # two classes, four images each in train/ and val/
    return f"folder:{tmp_path / 'photos'}"


def test_a_released_file_fine_tunes_on_a_folder_with_new_classes_and_evaluates_at_two_sizes(tmp_path, released,
                                                                                            photos, capsys):
    path, w = released
    run = tmp_path / "run"
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 32, "output": str(run)})
    model, source = initial_model(cfg, 2)
    state = model.state_dict()
    # Every tensor but the classifier is the source's; the MLP head keeps fc1 -> tanh, fc2 is new.
    assert set(state) == set(w)
    assert all(torch.equal(state[k], w[k]) for k in w if not k.startswith("head.fc2"))
    assert state["head.fc2.weight"].shape == (2, 64) and not state["head.fc2.weight"].any()
    torch.testing.assert_close(state["head.fc2.bias"], torch.full((2,), -math.log(2)))
    assert source["kind"] == "released file" and source["new"] == ["head.fc2.bias", "head.fc2.weight"]
    assert source["kept"] == len(w) - 2

    assert main(["train", "--init-from", str(path), "--data", photos, "--output", str(run), *FOLDER]) == 0
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert (saved.lr, saved.min_lr, saved.layer_decay) == tuple(FINETUNE_DEFAULTS[k] for k in ("lr", "min_lr",
                                                                                                 "layer_decay"))
    assert json.loads((run / "init.json").read_text())["sha256"] == source["sha256"]
    tuned = load_model(run / "last")
    assert tuned.num_classes == 2 and resolve_config(tuned.config.lookhere_config) == resolve_config(LH)
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run), "--data", photos, "--split", "val", "--sizes", "32", "48",
                 "--length", "4", "--output", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert sorted(result["sizes"], key=int) == ["32", "48"]


def test_a_timm_name_with_a_weights_file_a_model_folder_and_a_run_are_sources(tmp_path, photos):
    source = timm.create_model("vit_tiny_patch16_lookhere_90", num_classes=7)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    file = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    folder = save_model(source, tmp_path / "folder")
    keep = [k for k in source.state_dict() if not k.startswith("head.fc2")]
    runs = []
    for i, (init_from, extra) in enumerate([("vit_tiny_patch16_lookhere_90", ["--pretrained-file", str(file)]),
                                           (str(folder), [])]):
        cfg = TrainConfig.from_dict({"init_from": init_from, "data": photos, "img_size": 32, "patch_size": 16,
                                     "output": str(tmp_path / f"r{i}"), "batch_size": 4, "epochs": 1,
                                     "progress": False, **({"pretrained_file": str(file)} if extra else {})})
        model, record = initial_model(cfg, 2)
        assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in keep)
        assert model.num_classes == 2 and record["kind"] == ("timm" if extra else "model folder")
        runs.append(train(cfg)["run_dir"])
    # A fine-tuned run is itself a source: its best checkpoint.
    cfg = TrainConfig.from_dict({"init_from": runs[1], "data": photos, "img_size": 32, "patch_size": 16,
                                 "output": str(tmp_path / "again")})
    model, record = initial_model(cfg, 2)
    best = load_model(f"{runs[1]}/best")
    assert record["kind"] == "run directory"
    assert all(torch.equal(model.state_dict()[k], best.state_dict()[k]) for k in keep)


def test_settings_that_ask_for_another_architecture_are_refused_by_name(tmp_path, released, photos):
    path, _ = released
    base = {"init_from": str(path), "data": photos, "img_size": 32, "output": str(tmp_path / "r")}
    with pytest.raises(ValueError) as e:
        initial_model(TrainConfig.from_dict({**base, "pos_encoding": "rope-2d-mixed", "model": "small",
                                             "patch_size": 16}), 2)
    message = str(e.value)
    for part in ("--pos-encoding rope-2d-mixed (the source's: lookhere)", "--model small (the source is 48 wide",
                 "--patch-size 16 (the source's: 8)"):
        assert part in message, message
    # Matching the source is not a conflict.
    initial_model(TrainConfig.from_dict({**base, "patch_size": 8, "depth": 2, "init_values": 1.0}), 2)
    with pytest.raises(FileNotFoundError, match="--init-from nothing-here: no such file or folder, and not a "
                                                "registered model name"):
        initial_model(TrainConfig.from_dict({**base, "init_from": "nothing-here"}), 2)
    with pytest.raises(ValueError, match="--pretrained-file names the weights of an --init-from model"):
        TrainConfig(pretrained_file=str(path)).validate()
    with pytest.raises(ValueError, match="--pretrained-file goes with a timm model name"):
        initial_model(TrainConfig.from_dict({**base, "pretrained_file": str(path)}), 2)
    with pytest.raises(ValueError, match=r"--layer-decay must be in \(0, 1\], got 1.5"):
        TrainConfig(layer_decay=1.5).validate()


def test_layer_decay_scales_each_blocks_learning_rate_and_freezing_trains_the_head_alone(tmp_path, released,
                                                                                          photos):
    path, w = released
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 32, "batch_size": 4,
                                 "output": str(tmp_path / "r"), "layer_decay": 0.5, "progress": False})
    run = set_up(cfg)
    depth = 2
    scale = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            scale[next(n for n, q in run.raw.named_parameters() if q is p)] = group["lr_scale"]
    assert scale["cls_token"] == scale["patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth and scale["blocks.1.attn.qkv.weight"] == 0.5
    assert scale["norm.weight"] == 0.5 and scale["head.fc1.weight"] == scale["head.fc2.weight"] == 1.0  # as timm's ViT
    run.scheduler.step_update(num_updates=5)
    assert {g["lr"] / g["lr_scale"] for g in run.optimizer.param_groups} == {run.optimizer.param_groups[0]["lr"]
                                                                             / run.optimizer.param_groups[0]["lr_scale"]}

    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 32, "batch_size": 4,
                                 "epochs": 1, "output": str(tmp_path / "probe"), "freeze_backbone": True,
                                 "progress": False})
    tuned = train(cfg)["model"].state_dict()
    changed = {k for k in tuned if k in w and not torch.equal(tuned[k].cpu(), w[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed


def test_resume_refuses_a_source_whose_weights_changed(tmp_path, released, photos, capsys):
    path, w = released
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(path), "--data", photos, "--output", str(run), *FOLDER,
                 "--max-steps", "1"]) == 0
    w["norm.bias"] += 1
    torch.save({"config": dict(LH), "weights": w}, path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) != 0
    assert "started from other weights than --init-from" in capsys.readouterr().err
