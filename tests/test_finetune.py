"""Fine-tuning: ``lookhere train --init-from SOURCE`` from a released file, a timm name, a model folder
or a run, on a folder of photographs with other classes, then ``lookhere eval`` at two sizes; and the
paper's ImageNet recipe (configs/paper-imagenet-1k.yaml)."""

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import DropPath

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


def test_architecture_flags_given_at_their_from_scratch_value_are_checked_not_ignored(tmp_path, released, photos):
    """A flag given with the value a from-scratch run takes unset (--patch-size 4, --pos-encoding lh-90,
    --model tiny) still asks for that architecture: against a source that has another, it is refused,
    not silently dropped; left out, the run's config records it unset (the source's)."""
    path, _ = released  # patch 8, 48 wide, LookHere's own config
    base = {"init_from": str(path), "data": photos, "img_size": 32, "output": str(tmp_path / "r")}
    for key, value, part in (("patch_size", 4, "--patch-size 4 (the source's: 8)"),
                             ("pos_encoding", "lh-90", "--pos-encoding lh-90 (the source's: lookhere)"),
                             ("model", "tiny", "--model tiny (the source is 48 wide"),
                             ("weight_init", "torch", "--weight-init torch (the source's: timm)")):
        with pytest.raises(ValueError, match=re.escape(part)):
            initial_model(TrainConfig.from_dict({**base, key: value}), 2)
    unset = TrainConfig.from_dict(base).to_dict()
    assert [unset[k] for k in ("pos_encoding", "model", "patch_size", "weight_init")] == [None] * 4
    # A registered --model is a source too: its encoding is not replaced by a flag at lh-90.
    with pytest.raises(ValueError, match=re.escape("--pos-encoding lh-90 (the source's: lh-45)")):
        TrainConfig(model="vit_base_patch16_lookhere_45", img_size=224, pos_encoding="lh-90").validate()
    # From scratch, unset settings are the defaults, recorded as such (a run's config.yaml, a study's commands).
    scratch = TrainConfig()
    assert (scratch.pos_encoding, scratch.model, scratch.patch_size, scratch.weight_init) == ("lh-90", "tiny", 4,
                                                                                             "torch")


def test_image_sizes_are_checked_against_the_sources_patch_before_the_run_directory_is_written(tmp_path, released,
                                                                                               photos):
    path, _ = released  # patch 8: 36 px is a multiple of the from-scratch patch 4, not of the source's
    run = tmp_path / "r"
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": [32, 36], "batch_size": 4,
                                 "output": str(run), "progress": False})
    cfg.validate()  # the source's patch is known once it is loaded
    with pytest.raises(ValueError, match=re.escape(f"--img-size 36 is not a multiple of the patch size of "
                                                   f"--init-from {path}, 8")):
        train(cfg)
    assert not run.exists()  # so that the same --output takes the corrected command
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 30, "output": str(run)})
    cfg.validate()  # not "a multiple of --patch-size 4", a flag the user never gave


def test_the_source_digest_leaves_out_the_classifier_a_timm_source_draws(tmp_path):
    """init.json's SHA-256 is the source's weights: a timm source made for another class count draws its
    classifier at random, which must not enter the digest (it changed with --seed)."""
    from lookhere.io import tensor_digest

    name = "vit_tiny_patch16_pe_rope_2d_mixed"
    src = timm.create_model(name, num_classes=7)
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(file))

    def record(seed, classes):
        cfg = TrainConfig.from_dict(dict(init_from=name, pretrained_file=str(file), data="synthetic", img_size=32,
                                         seed=seed, output=str(tmp_path / "r")))
        return initial_model(cfg, classes)[1]

    first = record(0, 2)
    assert first["sha256"] == record(1, 2)["sha256"] == record(0, 5)["sha256"]
    assert first["sha256"] == tensor_digest((k, v) for k, v in src.state_dict().items() if not k.startswith("head."))
    assert first["digest_of"] == "every tensor but the classifier"


def test_a_validation_folder_lacking_a_class_keeps_the_training_labels(tmp_path):
    """train/{cat,dog,fox}, val/{cat,fox}: each split's own sorted folders would label val's fox 1 (dog)."""
    from PIL import Image

    root = tmp_path / "photos"
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "fox")), ("odd", ("cat", "owl"))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    base = dict(data=f"folder:{root}", img_size=8, patch_size=4, embed_dim=48, depth=1, num_heads=12, batch_size=2,
                progress=False)
    run = set_up(TrainConfig(**base, output=str(tmp_path / "r")))
    val = run.val_loaders[8].dataset
    assert [val[i][1] for i in range(len(val))] == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="split 'odd' has classes the training split lacks: owl"):
        set_up(TrainConfig(**base, val_split="odd", output=str(tmp_path / "r2")))


def test_eval_labels_a_split_lacking_a_class_as_the_run_trained(tmp_path, capsys):
    """train/{cat,dog,fox}, test/{fox}: the run keeps its classes, so eval scores test's fox as class 2
    (its own sorted folders would say 0). A model that always answers 2 must score 1.0."""
    from PIL import Image

    from lookhere.evaluate import load_checkpoint
    from lookhere.train import run_classes

    root = tmp_path / "photos"
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "dog", "fox")), ("test", ("fox",))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    run = tmp_path / "r"
    train(TrainConfig(data=f"folder:{root}", img_size=8, patch_size=4, embed_dim=48, depth=1, num_heads=12,
                      batch_size=2, epochs=1, progress=False, output=str(run)))
    assert run_classes(run) == {"cat": 0, "dog": 1, "fox": 2}
    model, _ = load_checkpoint(run)
    with torch.no_grad():  # answers fox whatever the image
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    save_model(model, run / "best")
    assert main(["eval", "--checkpoint", str(run), "--sizes", "8", "16", "--no-progress"]) == 0
    sizes = json.loads((run / "eval" / "eval.json").read_text())["sizes"]
    assert {s: v["top1"] for s, v in sizes.items()} == {"8": 1.0, "16": 1.0}
    # a split with a class the run never saw is one message, as for validation
    (root / "odd" / "owl").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "odd" / "owl" / "0.png")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--split", "odd", "--sizes", "8", "--no-progress"]) == 2
    assert "split 'odd' has classes the training split lacks: owl" in capsys.readouterr().err
    # a damaged classes.json is one message naming the file, not a bare JSON error
    for damaged in ('{"cat": 0, "dog"', '["cat", "dog", "fox"]', '{"cat": 0, "dog": 0, "fox": 2}',
                    '{"cat": 0, "dog": 1, "fox": 3}'):
        (run / "classes.json").write_text(damaged)
        assert main(["eval", "--checkpoint", str(run), "--sizes", "8", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(run / "classes.json") in err and "not the run's class indices" in err, err
        assert "ImageDataset(TRAIN_SPLIT_FOLDER).reader.class_to_idx" in err, err  # and how to mend it
    # A resume whose folder names its classes otherwise (as many, renamed) is refused: the head would
    # go on learning another class under each index.
    (run / "classes.json").write_text(json.dumps({"cat": 0, "dog": 1, "fox": 2}))
    for split in ("train", "val"):
        (root / split / "fox").rename(root / split / "wolf")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the training folder's classes are not those the run trained on" in err, err
    assert "differing: fox -> 2, wolf -> 2" in err and json.loads((run / "classes.json").read_text())["fox"] == 2
    for split in ("train", "val"):
        (root / split / "wolf").rename(root / split / "fox")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0


def test_drop_path_is_a_training_setting_a_source_or_registered_name_keeps_unless_given(tmp_path, released, photos):
    path, w = released
    base = {"init_from": str(path), "data": photos, "img_size": 32, "output": str(tmp_path / "r")}
    kept, _ = initial_model(TrainConfig.from_dict(base), 2)
    source_rate = kept.config.drop_path_rate
    model, record = initial_model(TrainConfig.from_dict({**base, "drop_path": 0.3}), 2)
    rates = [getattr(getattr(b, f"drop_path{i}"), "drop_prob", 0.0) for b in model.blocks for i in (1, 2)]
    assert source_rate != 0.3 and rates == [0.3] * len(rates) and model.config.drop_path_rate == 0.3
    assert model.training and all(torch.equal(model.state_dict()[k], kept.state_dict()[k]) for k in w)
    assert record["sha256"] == initial_model(TrainConfig.from_dict(base), 2)[1]["sha256"]  # the source's weights
    off, _ = initial_model(TrainConfig.from_dict({**base, "drop_path": 0.0}), 2)  # given as 0: turned off
    assert off.config.drop_path_rate == 0.0 and not any(isinstance(m, DropPath) for m in off.modules())
    # The released architecture by name, from scratch, takes a rate too (its own is 0.1).
    named = TrainConfig(model="vit_tiny_patch16_lookhere_90", img_size=32, patch_size=16, drop_path=0.2)
    named.validate()
    assert named.model_kwargs(2)["drop_path_rate"] == 0.2
    assert TrainConfig(model="vit_tiny_patch16_lookhere_90", img_size=32, patch_size=16).model_kwargs(2)[
        "drop_path_rate"] == 0.1
    assert TrainConfig(model="vit_tiny_patch16_lookhere_90", img_size=32, patch_size=16, drop_path=0.0).model_kwargs(
        2)["drop_path_rate"] == 0.0
    assert TrainConfig().model_kwargs(2)["drop_path_rate"] == 0.0  # from scratch: none unless given


def test_layer_decay_scales_each_blocks_learning_rate_and_freezing_trains_the_head_alone(tmp_path, released,
                                                                                          photos, monkeypatch):
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
    # The log shows the schedule's rate, not the stem's (lr x decay^(depth+1)): no warmup, the first step's is --lr.
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 32, "batch_size": 4,
                                 "output": str(tmp_path / "logged"), "layer_decay": 0.5, "warmup_epochs": 0.0,
                                 "lr": 1e-3, "log_every": 1, "max_steps": 1, "progress": False})
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["kind"] == "step"] == [pytest.approx(1e-3)]

    # A linear probe of the source's features: the frozen backbone runs as at test time (the released
    # models' drop-path of 0.1 would otherwise drop blocks under the probe); the head trains in train mode.
    import lookhere.train

    modes = []
    step = lookhere.train.train_step
    monkeypatch.setattr(lookhere.train, "train_step", lambda run, *a: modes.append(
        (any(b.training for b in run.raw.blocks), run.raw.head.training)) or step(run, *a))
    cfg = TrainConfig.from_dict({"init_from": str(path), "data": photos, "img_size": 32, "batch_size": 4,
                                 "epochs": 1, "output": str(tmp_path / "probe"), "freeze_backbone": True,
                                 "progress": False})
    tuned = train(cfg)["model"].state_dict()
    changed = {k for k in tuned if k in w and not torch.equal(tuned[k].cpu(), w[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed
    assert modes and set(modes) == {(False, True)}, modes


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


# --- the paper's recipe --------------------------------------------------------------------------
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "paper-imagenet-1k.yaml"


def test_the_papers_recipe_names_the_released_architecture_and_the_minival_split():
    cfg = TrainConfig.from_yaml(RECIPE)
    cfg.validate()
    assert (cfg.data, cfg.train_split, cfg.val_split, cfg.epochs, cfg.size) == (
        "hf:imagenet-1k", "train[:99%]", "train[99%:]", 150, 224)
    model, _ = initial_model(cfg, 1000)
    released = timm.create_model("vit_base_patch16_lookhere_90")
    assert model.config == released.config  # MLP head, LayerScale 1e-4, drop-path 0.1, timm's init
    assert model.config.head_hidden_dim == 3072 and model.config.drop_path_rate == 0.1
    for name, p in released.state_dict().items():
        assert model.state_dict()[name].shape == p.shape, name


def test_a_registered_name_refuses_flags_for_another_architecture_and_splits_where_there_are_none():
    with pytest.raises(ValueError, match=r"--model vit_base_patch16_lookhere_90 sets the architecture.*"
                                         r"--pos-encoding lh-45 \(the source's: lh-90\); --depth 4 \(the source's: 12\)"):
        TrainConfig(model="vit_base_patch16_lookhere_90", img_size=224, pos_encoding="lh-45", depth=4).validate()
    with pytest.raises(ValueError, match="--img-size 40 is not a multiple of the patch size of vit_base_patch16_"):
        TrainConfig(model="vit_base_patch16_lookhere_90", img_size=40).validate()
    with pytest.raises(ValueError, match="--model 'vit_huge'; allowed: micro, tiny, small, base, or a registered"):
        TrainConfig(model="vit_huge").validate()
    with pytest.raises(ValueError, match="--train-split 'train.:99%.': synthetic has fixed splits"):
        TrainConfig(train_split="train[:99%]").validate()
    with pytest.raises(ValueError, match="--train-split and --val-split are both 'train'"):
        TrainConfig(data="folder:x", val_split="train").validate()


def one_split_dataset(root, n=16):
    """A local Hugging Face dataset with a train split only (as ImageNet's minival is cut from it):
    ``n`` images, labels 0, 1, 0, 1, ... but the last quarter all 1."""
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [i % 2 if i < n * 3 // 4 else 1 for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(num_classes=2)}))
    ds.to_parquet(str(root / "train-00000.parquet"))
    return labels


def test_training_and_validation_splits_are_cut_from_one_split(tmp_path):
    labels = one_split_dataset(tmp_path / "data")
    run = set_up(TrainConfig(data=f"hf:{tmp_path / 'data'}", data_root=str(tmp_path / "cache"), train_split="train[:75%]",
                             val_split="train[75%:]", model="micro", depth=1, img_size=16, batch_size=4,
                             output=str(tmp_path / "run"), progress=False))
    assert len(run.train_ds) == 12
    val = run.val_loaders[16].dataset
    assert [int(val[i][1]) for i in range(len(val))] == labels[12:] == [1, 1, 1, 1]


def test_the_papers_recipe_runs_a_few_steps_under_torchrun_on_a_minival_split(tmp_path):
    """The shipped config, on a local Hugging Face dataset with one split (the last quarter held out as
    ImageNet's last 1% is), two gloo processes: it trains, validates on the held-out images only, and
    records the splits."""
    import subprocess
    import sys

    one_split_dataset(tmp_path / "data")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        "-m", "lookhere.cli", "train", "--config", str(RECIPE), "--data", f"hf:{tmp_path / 'data'}",
                        "--data-root", str(tmp_path / "cache"), "--train-split", "train[:75%]",
                        "--val-split", "train[75%:]", "--img-size", "32", "--batch-size", "4", "--epochs", "1",
                        "--workers", "0", "--no-compile", "--device", "cpu", "--log-every", "1", "--no-progress",
                        "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if x["kind"] == "step"]
    assert [x["step"] for x in steps] == [1, 2, 3]  # 12 training images, 4 a step
    assert all(math.isfinite(x["loss"]) and x["images_per_s"] > 0 for x in steps)
    epoch, = [x for x in records if x["kind"] == "epoch"]
    assert epoch["val_acc"] * 4 == round(epoch["val_acc"] * 4)  # top-1 over the 4 held-out images
    saved = TrainConfig.from_yaml(out / "config.yaml")
    assert (saved.model, saved.train_split, saved.val_split, saved.mixup, saved.cutmix) == (
        "vit_base_patch16_lookhere_90", "train[:75%]", "train[75%:]", 0.8, 1.0)
    # Each process drew its own drop-path and mixup (the recipe's 0.1 and 0.8/1.0), not the same draws twice.
    rng = torch.load(out / "last" / "state.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert not torch.equal(rng[0]["numpy"][1], rng[1]["numpy"][1])


def test_photographs_are_validated_at_each_size_as_lookhere_eval_tests_the_run(tmp_path, photos):
    """Validation picks the best epoch: at every training size it must see the images `lookhere eval`
    will score (the model's data config; crop_pct at the training size alone), not timm's defaults."""
    import dataclasses

    from lookhere.evaluate import EvalSettings, _split, load_checkpoint, model_data_config, training_size
    from lookhere.train import run_classes

    cfg = TrainConfig.from_dict({"data": photos, "img_size": [32, 48], "model": "micro", "patch_size": 8, "depth": 1,
                                 "batch_size": 4, "output": str(tmp_path / "run"), "max_steps": 1, "progress": False})
    train(cfg)
    model, run_cfg = load_checkpoint(tmp_path / "run")  # as `lookhere eval --checkpoint RUN` reads it
    size = training_size(model, run_cfg)
    settings = EvalSettings.from_flags({"sizes": [32, 48]}, data=photos, train_size=size,
                                       classes=run_classes(tmp_path / "run"))
    settings = dataclasses.replace(settings, data_config=model_data_config(model, size))
    run = set_up(dataclasses.replace(cfg, output=str(tmp_path / "again")))
    for size in (32, 48):
        validated, tested = run.val_loaders[size].dataset.dataset, _split(settings, size, "val", None).dataset
        assert repr(validated.transform) == repr(tested.transform), size
        assert validated.reader.class_to_idx == tested.reader.class_to_idx
