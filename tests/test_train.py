import json
import math
import os
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


def test_kill_and_resume_is_bit_exact(tmp_path):
    """A run killed with SIGKILL mid-epoch and resumed ends with the same weights as one never killed."""
    common = SMALL + ["--epochs", "3", "--checkpoint-every", "1", "--log-every", "1", "--ema-decay", "0.9",
                      "--mixup", "0.4", "--drop-path", "0.1"]
    full = cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lookhere.cli", "train", *common, "--output", str(run)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while steps_logged(run) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = steps_logged(run)
    assert 8 <= killed_at < 18

    resumed = cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "full" / "last" / name))
        b = load_file(str(run / "last" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 18


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
    assert r.returncode == 2 and "incompatible" in r.stderr and "embed_dim" in r.stderr


def test_corrupt_images_are_skipped_during_training(tmp_path):
    from test_data import _image_folder

    _image_folder(tmp_path / "imgs", n=8, corrupt=True)
    cfg = TrainConfig(data=f"folder:{tmp_path / 'imgs'}", img_size=32, patch_size=8, embed_dim=48, depth=1,
                      num_heads=12, batch_size=17, epochs=1, output=str(tmp_path / "r"), progress=False, log_every=1)
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        train(cfg)
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 1


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
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Rank 0 alone logged and checkpointed.
    assert (tmp_path / "ddp" / "last" / "model.safetensors").is_file()
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) > 0
