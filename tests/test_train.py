import argparse
import dataclasses
import json
import math
import os
import re
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lookhere import load_model
from lookhere.train import TrainConfig, train

SMALL = ["--data", "synthetic", "--data-length", "192", "--img-size", "32", "--patch-size", "4",
         "--embed-dim", "48", "--depth", "2", "--num-heads", "12", "--batch-size", "32", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lookhere.cli", "train", *args], env=ENV, capture_output=True,
                          text=True, **kw)


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines), default=0)


def kill_after(args, run: Path, steps: int) -> int:
    """Start ``lookhere train`` and SIGKILL it once ``steps`` steps are logged; returns the steps logged."""
    proc = subprocess.Popen([sys.executable, "-m", "lookhere.cli", "train", *args, "--output", str(run)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while steps_logged(run) < steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return steps_logged(run)


def same_weights(a_dir: Path, b_dir: Path, names=("model.safetensors",)) -> None:
    for name in names:
        a, b = load_file(str(a_dir / "last" / name)), load_file(str(b_dir / "last" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs"


def lr_by_step(run: Path) -> dict[int, float]:
    """The learning rate of each logged step."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["kind"] == "step"}


def tensorboard_steps(run: Path) -> dict[str, list[int]]:
    """The steps of each TensorBoard scalar, as TensorBoard shows them (purged points left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_kill_and_resume_is_bit_exact(tmp_path):
    """A run killed with SIGKILL mid-epoch and resumed ends with the same weights as one never killed."""
    common = SMALL + ["--epochs", "3", "--checkpoint-every", "1", "--log-every", "1", "--ema-decay", "0.9",
                      "--mixup", "0.4", "--drop-path", "0.1"]
    full = cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    killed_at = kill_after(common, run, 8)
    assert 8 <= killed_at < 18

    # The seconds trained go on from the checkpoint's count; an hour more there must show after the resume.
    state = torch.load(run / "last" / "state.pt", weights_only=True)
    assert 0 < state["train_s"] < 600
    state["train_s"] += 3600.0
    torch.save(state, run / "last" / "state.pt")
    # What a kill leaves past the last checkpoint (steps logged again on resume, a line cut short) is forgotten.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "step", "step": state["step"] + 1, "lr": -1.0}) + '\n{"kind": "st')
    resumed = cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_weights(tmp_path / "full", run, ("model.safetensors", "ema.safetensors"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    full_records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for kind in ("step", "epoch"):  # each once, as in the run never killed
        assert [r["step"] for r in records if r["kind"] == kind] == [r["step"] for r in full_records if r["kind"] == kind]
    assert -1.0 not in [r.get("lr") for r in records]
    starts = [r["step"] for r in records if r["kind"] == "environment"]
    assert starts[0] == 0 and len(starts) == 2 and 0 < starts[1] <= killed_at  # the resume is recorded too
    seconds = [r["train_s"] for r in records if r["kind"] == "epoch" and r["step"] > starts[1]]
    assert state["train_s"] < seconds[0] < state["train_s"] + 600 and seconds == sorted(seconds)
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 18
    # TensorBoard shows every point once, the checkpoint step's too (the kill left them on disk)
    assert tensorboard_steps(run) == tensorboard_steps(tmp_path / "full")


def test_resume_with_more_epochs_follows_the_schedule_of_the_new_length(tmp_path):
    """Killed at a random step of a 3-epoch run and resumed with --epochs 5, the run's learning rate from
    there on is that of a run trained for 5 epochs from the start (not the 3-epoch schedule's minimum)."""
    common = SMALL + ["--log-every", "1", "--checkpoint-every", "2", "--warmup-epochs", "0.5"]
    fresh = cli(*common, "--epochs", "5", "--output", str(tmp_path / "five"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]

    run = tmp_path / "three"
    killed_at = kill_after([*common, "--epochs", "3"], run, random.Random(16).randint(3, 12))
    assert killed_at < 18  # 6 steps per epoch
    resumed = cli("--resume", str(run), "--epochs", "5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    want, got = lr_by_step(tmp_path / "five"), lr_by_step(run)
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for s in range(killed_at + 1, 31):
        assert got[s] == want[s], f"step {s}: lr {got[s]} after the resume, {want[s]} in a 5-epoch run"
    assert all(want[s] > TrainConfig().min_lr for s in range(19, 30))  # where the 3-epoch schedule had ended
    assert TrainConfig.from_yaml(run / "config.yaml").epochs == 5  # a later --resume keeps the new length


def test_the_logged_rate_is_the_one_each_update_used(tmp_path):
    """Step s logs the rate of update s, that of timm's schedule at t = s - 1 of 6: a linear warmup from
    lr/1000 over 3 steps, then the cosine (not shifted by the warmup)."""
    cfg = TrainConfig(data="synthetic", data_length=192, img_size=16, patch_size=4, embed_dim=48, depth=1,
                      num_heads=12, batch_size=32, epochs=1, warmup_epochs=0.5, log_every=1, lr=1e-3,
                      output=str(tmp_path / "r"), progress=False)
    train(cfg)
    start = cfg.lr * 1e-3
    want = [start + t * (cfg.lr - start) / 3 if t < 3 else
            cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)]
    got = lr_by_step(tmp_path / "r")
    assert got[1] == start and [got[s] for s in range(1, 7)] == pytest.approx(want, rel=1e-12)


def test_default_warmup_is_a_tenth_of_the_run(tmp_path):
    """Without --warmup-epochs the rate warms up over a tenth of the run (here 2 of 20 steps), as the
    minimal reference's one-cycle schedule (docs/backbone-ablation.md); 0 turns warmup off."""
    base = dict(data="synthetic", data_length=64, img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12,
                batch_size=32, epochs=10, log_every=1, lr=1e-3, progress=False)
    cfg = TrainConfig(**base, output=str(tmp_path / "r"))
    assert cfg.warmup() == 1.0 and TrainConfig(epochs=3).warmup() == pytest.approx(0.3)
    train(cfg)
    start = cfg.lr * 1e-3
    got = lr_by_step(tmp_path / "r")
    assert [got[s] for s in (1, 2)] == pytest.approx([start, start + (cfg.lr - start) / 2], rel=1e-12)
    assert got[3] == pytest.approx(cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * 2 / 20)) / 2)
    assert TrainConfig(**base, warmup_epochs=0.0).warmup() == 0.0


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path):
    run = tmp_path / "run"
    first = cli(*SMALL, "--epochs", "2", "--max-steps", "3", "--output", str(run))
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli("--resume", str(run), "--epochs", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"--resume {run}: the run is at step 3, where it ends (--epochs 3, --max-steps 3: 3 steps); nothing "
            f"to train. Raise --epochs or --max-steps to go on") in again.stderr
    more = cli("--resume", str(run), "--max-steps", "4")
    assert more.returncode == 0 and json.loads(more.stdout.strip().splitlines()[-1])["step"] == 4


def test_cuda_random_state_is_kept_once_cuda_is_in_use_and_restored_to_the_devices_there(monkeypatch):
    """Mocked CUDA: asking for its state before CUDA is in use would start it in a CPU run; a
    checkpoint from a machine with more GPUs restores the devices this one has."""
    from lookhere import train as train_module

    def never(*args):
        raise AssertionError("CUDA was asked for its state before it was in use")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, CUDA not yet in use
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", never)
    state = train_module._rng_state()
    assert state["cuda"] == []
    restored = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: restored.__setitem__(index, s))
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU machine
    train_module._set_rng_state(state)
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], state["cuda"][i]) for i in (0, 1))


def test_resume_with_workers_is_bit_exact_and_independent_of_the_worker_count(tmp_path):
    """Random augmentation (photographs) is seeded per sample: two worker processes give the weights of
    none, and a run killed mid-epoch resumes to them bit for bit."""
    from conftest import image_folder

    image_folder(tmp_path / "imgs", n=24)
    common = ["--data", f"folder:{tmp_path / 'imgs'}", "--img-size", "32", "--patch-size", "8", "--embed-dim", "48",
              "--depth", "1", "--num-heads", "12", "--batch-size", "4", "--epochs", "2", "--log-every", "1",
              "--checkpoint-every", "1", "--no-progress"]
    for workers in ("0", "2"):
        r = cli(*common, "--workers", workers, "--output", str(tmp_path / f"full{workers}"))
        assert r.returncode == 0, r.stderr[-2000:]
    same_weights(tmp_path / "full0", tmp_path / "full2")

    run = tmp_path / "killed"
    killed_at = kill_after([*common, "--workers", "2"], run, 5)
    assert killed_at < 24 and killed_at % 12  # mid-epoch: 12 steps per epoch
    resumed = cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_weights(tmp_path / "full2", run)


def test_a_streamed_run_resumes_bit_exact_with_its_workers_and_refuses_others(tmp_path):
    """--data-streaming: a run killed mid-epoch reads its epoch again from the stream's start, drops the
    batches it trained on and ends with the weights of a run never stopped; its loader workers divide
    the stream, so another --workers is refused on resume."""
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    from conftest import hf_parquet

    root = hf_parquet(tmp_path / "hf", train=24, val=6, shards=2)
    common = ["--data", f"hf:{root}", "--data-root", str(tmp_path / "cache"), "--data-streaming", "--data-length", "24",
              "--val-split", "validation", "--img-size", "16", "--patch-size", "8", "--embed-dim", "24", "--depth", "1",
              "--num-heads", "12", "--batch-size", "4", "--epochs", "2", "--log-every", "1", "--checkpoint-every", "1",
              "--no-progress", "--workers", "2"]
    full = cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    epochs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in epochs if r["kind"] == "epoch"] == [6, 12]  # 24 samples in batches of 4
    run = tmp_path / "killed"
    killed_at = kill_after(common, run, 8)
    assert killed_at < 12 and killed_at % 6
    refused = cli("--resume", str(run), "--workers", "0")
    assert refused.returncode == 2 and "--workers: run has 2, now 0" in refused.stderr, refused.stderr[-2000:]
    resumed = cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_weights(tmp_path / "full", run)
    several = cli(*common, "--img-size", "16", "24", "--output", str(tmp_path / "sizes"))
    assert several.returncode == 2 and "--data-streaming trains at one --img-size, got 16 24" in several.stderr

    # Two processes divide the stream (a training shard each) and still take 6 steps an epoch;
    # validation counts each of its 6 images once.
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                          "-m", "lookhere.cli", "train", *common, "--workers", "0", "--output", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [6, 12]
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, two.stdout  # one summary, the first process's
    assert json.loads(summaries[0])["val"]["n"] == 6


def test_training_learns_and_writes_what_it_promises(tmp_path):
    cfg = TrainConfig(data="synthetic", data_length=4000, img_size=32, patch_size=8, embed_dim=96, depth=4,
                      num_heads=12, batch_size=64, epochs=2, lr=2e-3, warmup_epochs=0.2, output=str(tmp_path / "r"),
                      progress=False, log_every=20, pos_encoding="lh-45")
    result = train(cfg)
    run = Path(result["run_dir"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    total = 2 * (4000 // 64)  # whole batches only
    assert len(epochs) == 2 and [r["step"] for r in steps] == list(range(20, total, 20)) + [total]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] < math.log(10)  # below the loss of a uniform guess
    n = result["val"]["n"]
    assert n == 800
    chance = 0.1  # 10 balanced classes; three binomial standard errors above it
    assert epochs[-1]["val_acc"] > chance + 3 * math.sqrt(chance * (1 - chance) / n)
    assert TrainConfig.from_yaml(run / "config.yaml") == cfg
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    model = load_model(run / "best")
    assert model.config.pos_encoding == "lh-45"
    assert not (run / "last.tmp").exists() and not (run / "last.old").exists()
    env = [r for r in records if r["kind"] == "environment"]  # what decides the last digits, once per start
    assert len(env) == 1 and env[0]["step"] == 0 and env[0]["torch"] == torch.__version__
    assert env[0]["threads"] == torch.get_num_threads() and env[0]["torch_cpu_capability"]


def test_train_config_round_trips(tmp_path):
    cfg = TrainConfig(pos_encoding="rope-2d-mixed", pos_options={"interpolate": True}, ema_decay=0.99)
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_input_gives_clear_messages(tmp_path):
    r = cli(*SMALL, "--img-size", "30", "--output", str(tmp_path / "a"))
    assert r.returncode == 2 and "--img-size 30 is not a multiple of --patch-size 4" in r.stderr
    r = cli(*SMALL, "--data", "fashion-mnist", "--data-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cli(*SMALL, "--data", f"folder:{tmp_path / 'nothing'}", "--output", str(tmp_path / "c"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("learning_rate: 0.1\n")
    r = cli("--config", str(cfg_file))
    assert r.returncode == 2 and "learning_rate" in r.stderr
    ok = cli(*SMALL, "--epochs", "1", "--max-steps", "1", "--output", str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-1000:]
    r = cli(*SMALL, "--epochs", "1", "--output", str(tmp_path / "run"))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = cli("--resume", str(tmp_path / "run"), "--embed-dim", "96")
    assert r.returncode == 2 and "incompatible" in r.stderr and "--embed-dim: run has 48, now 96" in r.stderr


def test_corrupt_images_are_skipped_during_training(tmp_path):
    from conftest import image_folder

    image_folder(tmp_path / "imgs", n=8, corrupt=True)
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", img_size=32, patch_size=8, embed_dim=48, depth=1,
                      num_heads=12, batch_size=17, epochs=1, output=str(tmp_path / "r"), progress=False, log_every=1)
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        train(cfg)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 1


def test_seeded_samples_draw_each_augmentation_from_seed_epoch_and_index(tmp_path):
    """An augmented sample is a function of (seed, epoch, index), not of the batch it is fetched in or
    of the caller's random state, which it leaves untouched."""
    import numpy as np

    from lookhere.data import DataSpec, build_dataset
    from lookhere.train import SeededSamples
    from conftest import image_folder

    image_folder(tmp_path / "imgs")
    samples = SeededSamples(build_dataset(DataSpec(f"folder:{tmp_path / 'imgs'}", 32), "train"), seed=3)
    first = samples[2][0]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert torch.equal(samples.__getitems__([5, 2, 7])[1][0], first)
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == (
        torch.manual_seed(0) and torch.rand(1).item(), random.seed(0) or random.random(),
        np.random.seed(0) or np.random.rand())
    samples.epoch = 1
    assert not torch.equal(samples[2][0], first)
    assert not torch.equal(SeededSamples(samples.dataset, seed=4)[2][0], first)


def test_odd_batch_left_by_an_unreadable_sample_still_gets_mixup(tmp_path):
    """Five readable images and a broken one in a batch of six: mixup pairs samples, so one more is left
    out (counted) and the step trains on four mixed images."""
    import shutil

    from conftest import image_folder

    image_folder(tmp_path / "imgs", n=2, corrupt=True)
    shutil.copy(tmp_path / "imgs" / "train" / "dog" / "0.png", tmp_path / "imgs" / "train" / "dog" / "extra.png")
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", img_size=32, patch_size=8, embed_dim=48, depth=1,
                      num_heads=12, batch_size=6, epochs=2, mixup=0.8, cutmix=1.0, output=str(tmp_path / "r"),
                      progress=False, log_every=1)
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        train(cfg)
    steps = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert [(r["skipped"], r["mixup_dropped"], r["empty_batches"]) for r in steps] == [(1, 1, 0), (2, 2, 0)]
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_batch_of_unreadable_samples_makes_no_update(tmp_path):
    """A batch with no readable sample never reaches the model: the step counts (schedule and data position
    stay aligned), the weights stay as they were, and the batch is counted."""
    from conftest import image_folder

    image_folder(tmp_path / "imgs", n=2, corrupt=True)  # 4 readable images and a broken one
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", img_size=32, patch_size=8, embed_dim=48, depth=1,
                      num_heads=12, batch_size=1, epochs=1, output=str(tmp_path / "r"), progress=False, log_every=1,
                      checkpoint_every=1)
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        result = train(cfg)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert result["step"] == 5 and [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    empty = [r for r in steps if r["loss"] is None]
    assert len(empty) == 1 and empty[0]["grad_norm"] is None
    assert steps[-1]["skipped"] == 1 and steps[-1]["empty_batches"] == 1


def test_every_train_flag_says_what_it_does_and_its_default():
    from lookhere.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cluster = {"executor", "nodes_per_cell", "tasks_per_node", "partition", "time_min", "max_running", "slurm_arg",
               "detach"}  # where the run runs (tests/test_cluster.py)
    actions = [a for a in sub.choices["train"]._actions
               if a.option_strings and a.dest not in ("help", "config", *cluster)]
    assert len(actions) == len(dataclasses.fields(TrainConfig))
    for action in actions:
        assert action.help and "(default: " in action.help, action.option_strings
        assert "None" not in action.help, action.option_strings  # an unset default says what it means


def test_train_flag_and_setting_errors_name_the_flag(tmp_path, capsys):
    from lookhere.cli import main

    for value, why in (("{interpolate: true}", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--pos-options", value])
        assert e.value.code == 2 and f"argument --pos-options: {why}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=r"bad.yaml: --lr: expected a number, got 'fast'"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ValueError, match=r"--pos-options: expected a mapping, got 3"):
        TrainConfig.from_dict({"pos_options": 3})
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) learning_rate; allowed .*--lr,"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    for setting, message in (({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
                             ({"workers": -1}, "--workers must be >= 0"), ({"max_steps": 0}, "--max-steps must be >= 1"),
                             ({"device": "gpu"}, "--device 'gpu' is not a device")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train(TrainConfig(**setting, output=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()



@pytest.mark.parametrize("text", ["epochs: 2\n  lr: [1\n", "epochs: [1\n", "\tlr: 0.1\n"])
def test_a_config_file_that_is_not_yaml_is_a_usage_error_that_names_it(tmp_path, capsys, text):
    from lookhere.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["train", "--config", str(bad), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lookhere train: error: {bad}: not valid YAML"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--tasks-per-node", "8"], "--executor local runs one process"),
    (["--nodes-per-cell", "2"], "--executor local runs one process"),
    (["--partition", "gpu"], "--partition and --slurm-arg are Slurm's; --executor local would ignore them"),
    (["--slurm-arg", "account=abc"], "--partition and --slurm-arg are Slurm's; --executor local would ignore them"),
    (["--time-min", "5"], "--max-running and --time-min are for submitit's executors"),
    (["--max-running", "3"], "--max-running caps how many of a study's cells run at once"),
    (["--executor", "submitit-local", "--max-running", "3"], "--max-running caps how many of a study's cells"),
])
def test_cluster_flags_that_a_run_would_ignore_are_refused(tmp_path, capsys, monkeypatch, extra, message):
    """`lookhere train` refuses what it would not do, as `lookhere study` does, with the executor left out too."""
    import lookhere.cluster
    import lookhere.train
    from lookhere.cli import main

    monkeypatch.setattr(lookhere.train, "train", lambda cfg: pytest.fail("trained"))
    monkeypatch.setattr(lookhere.cluster, "submit_run", lambda *a: pytest.fail("submitted"))
    assert main(["train", "--output", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("field", ["lr", "min_lr", "clip_grad", "init_values", "mixup", "warmup_epochs"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_settings_must_be_finite(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be a finite number, got {value}"):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("settings, message", [
    (dict(ema_decay=0.0), "--ema-decay must be in (0, 1), got 0.0; leave it out for no EMA"),
    (dict(lr=1e-3, min_lr=2e-3), "--min-lr 0.002 is above --lr 0.001: the schedule would rise"),
])
def test_settings_that_would_be_ignored_or_misread_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**settings).validate()


def test_data_that_cannot_be_trained_as_asked_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"--data-root {tmp_path}: synthetic is not read from it")):
        train(TrainConfig(data="synthetic", data_root=str(tmp_path), output=str(tmp_path / "a"), progress=False))
    with pytest.raises(ValueError, match=re.escape("--num-classes 4: synthetic has 10 classes")):
        train(TrainConfig(data="synthetic", num_classes=4, output=str(tmp_path / "b"), progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_config_file_on_resume_overrides_only_what_it_sets(tmp_path):
    from lookhere.cli import _train_config, build_parser

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(TrainConfig(epochs=20, log_every=5, lr=3e-3).to_dict()))
    (tmp_path / "more.yaml").write_text("epochs: 30\nlog-every: 7\n")
    cfg = _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "more.yaml"),
                                                   "--resume", str(run), "--log-every", "9"]))
    assert (cfg.epochs, cfg.log_every, cfg.lr, cfg.output) == (30, 9, 3e-3, str(run))  # file, flag, run, run
    # a run killed before its config.yaml: the file gives the settings
    cfg = _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "more.yaml"),
                                                   "--resume", str(tmp_path / "fresh")]))
    assert (cfg.epochs, cfg.lr, cfg.output) == (30, TrainConfig().lr, str(tmp_path / "fresh"))
    # ... and it runs: from the beginning, as nothing of it was kept
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"data_length": 64, "img_size": 16, "embed_dim": 48,
                                                         "depth": 1, "batch_size": 32, "max_steps": 1,
                                                         "progress": False}))
    cfg = _train_config(build_parser().parse_args(["train", "--config", str(tmp_path / "tiny.yaml"),
                                                   "--resume", str(tmp_path / "fresh")]))
    assert train(cfg)["step"] == 1 and (tmp_path / "fresh" / "config.yaml").is_file()
    # a folder with a checkpoint but no config.yaml is no run of ours to resume
    (tmp_path / "odd" / "last").mkdir(parents=True)
    for name in ("state.pt", "model.safetensors"):
        (tmp_path / "odd" / "last" / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.yaml there"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "resume": str(tmp_path / "odd"), "output": str(tmp_path / "odd")}))


def test_resume_into_another_output_is_refused_and_a_moved_run_resumes_in_place(tmp_path, capsys):
    from lookhere.cli import _train_config, build_parser, main

    run = tmp_path / "moved"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(TrainConfig(output="elsewhere/run").to_dict()))
    assert _train_config(build_parser().parse_args(["train", "--resume", str(run)])).output == str(run)
    assert main(["train", "--resume", str(run), "--output", str(tmp_path / "other")]) != 0
    err = capsys.readouterr().err
    assert f"--resume {run} continues that run in its own directory, but --output {tmp_path / 'other'}" in err
    with pytest.raises(ValueError, match="--output runs/run names another"):
        train(TrainConfig(resume=str(run)))


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from lookhere.train import TrainConfig, train
cfg = TrainConfig.from_dict(dict(data="synthetic", data_length=96, img_size=16, patch_size=4, embed_dim=48, depth=2,
                                 num_heads=12, batch_size=16, epochs=2, lr=2e-3, output=sys.argv[1], progress=False,
                                 seed=3, label_smoothing=0.0))
model = train(cfg)["model"]
rank = dist.get_rank() if dist.is_initialized() else 0
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{sys.argv[1]}/rank{rank}.safetensors")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          str(script), str(tmp_path / "ddp")], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "single")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        if k.endswith("attn.qkv.bias"):
            # The keys' bias shifts every score of a query row alike, which softmax ignores: its gradient
            # is 0 up to rounding, which AdamW normalises into steps of size lr. Queries' and values' count.
            q, _, v = r0[k].chunk(3)
            q1, _, v1 = single[k].chunk(3)
            r0[k], single[k] = torch.cat([q, v]), torch.cat([q1, v1])
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Rank 0 alone logged and checkpointed; validation (19 scenes on 2 ranks) counted each scene once.
    assert (tmp_path / "ddp" / "last" / "model.safetensors").is_file()
    epochs = {}
    for name in ("ddp", "single"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        epochs[name] = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert len(epochs["ddp"]) == len(epochs["single"]) == 2
    for a, b in zip(epochs["ddp"], epochs["single"]):
        assert a["val_acc"] == b["val_acc"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    # the logged training loss is the whole batch's, over both ranks
    steps = {name: [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                    if r["kind"] == "step"] for name in ("ddp", "single")}
    assert [r["step"] for r in steps["ddp"]] == [r["step"] for r in steps["single"]] == [10, 12]
    for a, b in zip(steps["ddp"], steps["single"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # a fresh run into a taken --output is refused on every rank: none waits for the others
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_port=29533", str(script), str(tmp_path / "ddp")], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_validation_shards_cover_every_sample_once():
    """Unlike DistributedSampler, which pads the last shard with repeats, whatever the number of ranks."""
    from lookhere.train import shard

    for n, world in ((800, 3), (800, 7), (19, 2), (5, 8)):
        shards = [shard(n, rank, world) for rank in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))


def test_a_checkpoint_swap_keeps_the_only_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """After a crash between the renames of a swap only ``last.old`` is left; a crash in the next swap must
    not lose it."""
    from lookhere.train import find_checkpoint, write_checkpoint
    from lookhere.vit import create_vit

    model = create_vit("none", img_size=16, patch_size=4, embed_dim=48, depth=1, num_classes=2)
    write_checkpoint(tmp_path / "last", model, None, {"step": 1})
    os.replace(tmp_path / "last", tmp_path / "last.old")  # the first crash
    assert find_checkpoint(tmp_path) == tmp_path / "last.old"

    real_replace = os.replace

    def crash_before_swapping_in(src, dst):
        if Path(src).name == "last.tmp":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_swapping_in)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "last", model, None, {"step": 2})
    monkeypatch.undo()
    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "last.old" and torch.load(found / "state.pt", weights_only=True)["step"] == 1
    write_checkpoint(tmp_path / "last", model, None, {"step": 3})
    assert find_checkpoint(tmp_path) == tmp_path / "last" and not (tmp_path / "last.old").exists()


def test_a_checkpoint_is_on_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """Renames alone survive a kill; a machine crash also needs every file flushed before the swap,
    or ``last/`` may come back holding empty files after the old one was deleted."""
    from lookhere.train import write_checkpoint
    from lookhere.vit import create_vit

    model = create_vit("none", img_size=16, patch_size=4, embed_dim=48, depth=1, num_classes=2)
    write_checkpoint(tmp_path / "last", model, None, {"step": 1})
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or real_replace(src, dst))
    write_checkpoint(tmp_path / "last", model, None, {"step": 2})
    swap = events.index(("replace", str(tmp_path / "last.tmp")))
    flushed = {path for kind, path in events[:swap] if kind == "fsync"}
    tmp = tmp_path / "last.tmp"
    assert {str(tmp / name) for name in ("model.safetensors", "config.json", "state.pt")} | {str(tmp)} <= flushed
    assert ("fsync", str(tmp_path)) in events[swap:]  # and the rename itself

    # A file system that cannot flush a folder (some FUSE mounts) still takes checkpoints; a file it
    # cannot flush is an error.
    import errno

    def no_folders(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folders)
    write_checkpoint(tmp_path / "last", model, None, {"step": 3})
    assert torch.load(tmp_path / "last" / "state.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        write_checkpoint(tmp_path / "last", model, None, {"step": 4})


# --- training at several sizes -------------------------------------------------------------------
def test_one_size_batches_are_those_of_distributed_sampler_and_a_dataloader():
    """With one size the step batches are what torch's DistributedSampler (shuffle, drop_last) and a
    DataLoader of that batch size give, on every rank and epoch, from any start step."""
    from torch.utils.data import DistributedSampler

    from lookhere.train import StepBatches

    for n, world, b in [(50, 1, 4), (50, 2, 4), (53, 3, 5)]:
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
            mine = StepBatches(n, [b], rank, world, 7)
            for epoch in (0, 3):
                ref.set_epoch(epoch)
                mine.set_epoch(epoch)
                idx = list(ref)
                expected = [idx[i:i + b] for i in range(0, len(idx) - b + 1, b)]
                mine.start = 0
                assert list(mine) == expected and len(mine) == len(expected)
                mine.start = 2
                assert list(mine) == expected[2:]


def test_several_sizes_take_turns_with_batches_that_keep_patches_per_step():
    from lookhere.train import StepBatches

    cfg = TrainConfig(img_size=[16, 24, 32], batch_size=36, patch_size=8)
    assert cfg.size == 16 and cfg.sizes == [16, 24, 32]
    assert cfg.batch_sizes() == [36, 16, 9]  # 36 x 4, 16 x 9, 9 x 16 patches: 144 a step at each size
    n, per_rank = 200, [18, 8, 4]
    ranks = [list(StepBatches(n, per_rank, r, 2, 0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 9  # 100 samples a rank: three turns of 18 + 8 + 4; 18 more do not fit
    for steps in ranks:
        for k, batch in enumerate(steps):
            assert len(batch) == per_rank[k % 3] and {i // n for i in batch} == {k % 3}
    drawn = [i % n for steps in ranks for batch in steps for i in batch]
    assert len(drawn) == len(set(drawn))  # no sample twice in an epoch, over both ranks
    assert TrainConfig(img_size=[24]).img_size == 24  # one size is a size


def test_training_at_several_sizes_validates_each_and_resumes_bit_exact(tmp_path):
    at = SMALL.index("--img-size")
    args = SMALL[:at] + SMALL[at + 2:]
    common = args + ["--img-size", "16", "24", "32", "--epochs", "2", "--checkpoint-every", "1", "--log-every", "1",
                     "--mixup", "0.4"]
    full = cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    killed_at = kill_after(common, run, 5)
    assert cli("--resume", str(run)).returncode == 0
    same_weights(tmp_path / "full", run)
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    assert cfg.img_size == [16, 24, 32] and cfg.batch_sizes() == [32, 14, 8]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps_per_epoch = 9  # 192 scenes: three turns of 32 + 14 + 8, then one more 32
    assert [r["step"] for r in epochs] == [steps_per_epoch, 2 * steps_per_epoch] and killed_at < steps_per_epoch * 2
    for r in epochs:
        assert set(r["val_acc_by_size"]) == {"16", "24", "32"}
        assert r["val_acc"] == pytest.approx(sum(r["val_acc_by_size"].values()) / 3)
    assert load_model(run / "last").config.img_size == 16
    # Each process's share of a step depends on the process count: a resume under another is refused.
    state = torch.load(run / "last" / "state.pt", weights_only=True)
    state["rng"] = state["rng"] * 2  # as two processes would have written it
    torch.save(state, run / "last" / "state.pt")
    r = cli("--resume", str(run), "--epochs", "3")
    assert r.returncode == 2 and ("the run was trained by 2 process(es), this resume has 1; with several --img-size"
                                  in r.stderr) and "torchrun --nproc_per_node 2" in r.stderr, r.stderr[-2000:]


def test_bad_training_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="--img-size: expected integers, got"):
        TrainConfig.from_dict({"img_size": [16, "24"]})
    with pytest.raises(ValueError, match="--img-size 16 24 16 repeats a size"):
        TrainConfig(img_size=[16, 24, 16], patch_size=8).validate()
    with pytest.raises(ValueError, match="--img-size 20 is not a multiple of --patch-size 8"):
        TrainConfig(img_size=[16, 20], patch_size=8).validate()


def test_compile_wraps_the_model_that_trains_and_checkpoints_keep_the_module(tmp_path, monkeypatch):
    """--compile hands the model to torch.compile (here a stand-in that records it); the compiled
    module is the one that trains, the plain one the one saved and evaluated."""
    from lookhere.train import set_up

    compiled = []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            compiled.append(x.shape)
            return self.module(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    base = dict(data="synthetic", data_length=64, img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12,
                batch_size=16, epochs=1, progress=False)
    run = set_up(TrainConfig(**base, compile=True, output=str(tmp_path / "c")))
    assert isinstance(run.model, Compiled) and run.model.module is run.raw
    assert not isinstance(set_up(TrainConfig(**base, output=str(tmp_path / "p"))).model, Compiled)
    result = train(TrainConfig(**base, compile=True, output=str(tmp_path / "t")))
    assert len(compiled) == 64 // 16 and not isinstance(result["model"], Compiled)
    assert load_model(tmp_path / "t" / "last").config.depth == 1


def test_a_stretchs_environment_record_is_on_disk_before_its_first_step(tmp_path):
    """A process killed before its first step record (a job signalled early) keeps the record of its
    start: the line is written through, not left in the file's buffer."""
    from lookhere.train import RunLog

    log = RunLog(tmp_path, step=0, resumed=False, main=True)
    try:
        records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["step"], r["world_size"]) for r in records] == [("environment", 0, 1)]
    finally:
        log.close()
