import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lookhere.analyze import head_diversity, mean_attention_distance, token_similarity
from lookhere.evaluate import Metrics, fgsm_attack, parse_eps, pgd_attack
from lookhere.report import compare


def test_metrics_match_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.1, -1.0, 0.0, 0.5],
                           [0.2, 0.1, 3.0, 0.0, 0.0, 0.0],
                           [1.0, 1.5, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 4.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 4])
    m = Metrics(6)
    m.update(logits[:2], labels[:2])
    m.update(logits[2:], labels[2:])
    out = m.compute()
    p = logits.softmax(-1).double()
    assert out["top1"] == pytest.approx(2 / 4)
    top5 = [int(labels[i] in logits[i].topk(5).indices) for i in range(4)]
    assert out["top5"] == pytest.approx(sum(top5) / 4)
    nll = -sum(math.log(p[i, labels[i]]) for i in range(4)) / 4
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    conf, pred = p.max(-1)
    correct = (pred == labels).double()
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.double().mean() * abs(correct[sel].mean() - conf[sel].mean())
    assert out["ece"] == pytest.approx(float(ece), abs=1e-6)


def _linear_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3 * 4 * 4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 48, generator=g))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_reach_the_analytic_worst_case_of_a_linear_model(attack):
    """For logits W x, the worst L-inf perturbation of size eps (pixels) lowers the margin by
    eps * ||(w_y - w_other) / std||_1; FGSM attains it, and so must PGD."""
    model = _linear_model()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1)
    pixels = 0.3 + 0.4 * torch.rand(16, 3, 4, 4, generator=g)  # far from 0 and 1: no clamping
    x = (pixels - m) / s
    y = model(x).argmax(-1)
    eps = 2 / 255
    if attack == "fgsm":
        adv = fgsm_attack(model, x, y, eps, mean=mean, std=std)
    else:
        adv = pgd_attack(model, x, y, eps, steps=10, step_size=eps / 4, mean=mean, std=std)
    w = model[1].weight.detach()
    sign = torch.where(y == 0, 1.0, -1.0)
    dw = (w[0] - w[1]).view(1, 3, 4, 4) / s  # margin gradient in pixel space
    expected = sign * (model(x)[:, 0] - model(x)[:, 1]).detach() - eps * dw.abs().sum()
    got = sign * (model(adv)[:, 0] - model(adv)[:, 1]).detach()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    adv_pixels = adv * s + m
    assert (adv_pixels - pixels).abs().max() <= eps + 1e-6


def test_attack_keeps_pixels_in_range():
    model = _linear_model()
    x = torch.ones(2, 3, 4, 4)  # all pixels at 1.0 with mean 0, std 1
    adv = pgd_attack(model, x, torch.tensor([0, 1]), 0.1, steps=3, step_size=0.05, random_start=True,
                     generator=torch.Generator().manual_seed(0))
    assert adv.max() <= 1.0 and adv.min() >= 0.9 - 1e-6


def test_parse_eps():
    assert parse_eps("1/255,2/255") == [1 / 255, 2 / 255]
    assert parse_eps("0.01") == [0.01]
    with pytest.raises(ValueError, match="--eps"):
        parse_eps("one/255")


def test_attention_distance_on_known_attention():
    grid = (3, 4)
    n = 12
    # Every patch attends only to the patch two columns to its right (or itself at the edge), CLS unused.
    w = torch.zeros(1, 2, n + 1, n + 1)
    expected = []
    for q in range(n):
        y, x = divmod(q, 4)
        k = q + 2 if x + 2 < 4 else q
        w[0, :, 1 + q, 1 + k] = 0.5
        w[0, :, 1 + q, 0] = 0.5  # CLS mass is excluded from the distance
        expected.append(2.0 if x + 2 < 4 else 0.0)
    w[0, :, 0, :] = 1 / (n + 1)
    d = mean_attention_distance(w, grid, 1)
    torch.testing.assert_close(d, torch.full((2,), float(np.mean(expected)), dtype=torch.float64))
    # Uniform attention: the mean pairwise distance of the grid.
    u = torch.full((1, 1, n, n), 1 / n)
    ys, xs = np.divmod(np.arange(n), 4)
    brute = np.mean([[math.hypot(ys[a] - ys[b], xs[a] - xs[b]) for b in range(n)] for a in range(n)])
    assert float(mean_attention_distance(u, grid, 0)) == pytest.approx(brute)


def test_head_diversity_and_token_similarity():
    same = torch.softmax(torch.randn(2, 1, 5, 7), -1).expand(2, 3, 5, 7)
    assert head_diversity(same) == pytest.approx(0.0, abs=1e-12)
    onehot = torch.zeros(1, 2, 1, 4)
    onehot[0, 0, 0, 0] = 1
    onehot[0, 1, 0, 3] = 1
    assert head_diversity(onehot) == pytest.approx(math.log(2))
    tokens = torch.randn(1, 1, 8).expand(3, 6, 8)
    assert token_similarity(tokens) == pytest.approx(1.0)
    opposite = torch.stack([torch.ones(4), -torch.ones(4)])[None]
    assert token_similarity(opposite) == pytest.approx(-1.0)


def _fake_eval(path: Path, acc: list[float]):
    path.mkdir(parents=True)
    res = {"train_size": 32, "sizes": {str(s): {"top1": a, "top5": 1.0, "nll": 1 - a, "ece": 0.1, "n": 10}
                                       for s, a in zip((32, 64, 128), acc)},
           "adversarial": {"n": 10, "fgsm@1/255": acc[0] / 2}, "by_object_size": None}
    (path / "eval.json").write_text(json.dumps(res))


def test_compare_report_opens(tmp_path):
    from PIL import Image

    _fake_eval(tmp_path / "a", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "b", [0.75, 0.5, 0.3])
    files = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "report", names=["lh", "rope"])
    md = Path(files["markdown"]).read_text()
    assert "| 64 | 0.7000 | 0.5000 |" in md and "fgsm@1/255" in md
    for key in ("top1", "nll", "ece"):
        with Image.open(files[key]) as im:
            im.verify()
    page = Path(files["html"]).read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page


def test_eval_and_analyze_commands_on_a_trained_run(tmp_path):
    run = tmp_path / "run"
    common = ["--data", "synthetic", "--data-length", "64", "--img-size", "16", "--patch-size", "4",
              "--embed-dim", "48", "--depth", "2", "--num-heads", "12", "--batch-size", "32", "--epochs", "1",
              "--no-progress", "--output", str(run)]
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "train", *common], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "eval", "--checkpoint", str(run), "--sizes", "16", "32",
                        "--length", "40", "--adversarial", "fgsm,pgd", "--eps", "1/255", "--pgd-steps", "2",
                        "--adversarial-samples", "8", "--by-object-size", "--no-progress", "--lh-global-slope", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert set(res["sizes"]) == {"16", "32"} and res["sizes"]["16"]["n"] == 40
    assert set(res["adversarial"]) == {"n", "fgsm@1/255", "pgd@1/255"}
    assert len(res["by_object_size"]["accuracy_change"]["32"]) == 5
    assert res["by_object_size"]["accuracy_change"]["16"] == [0.0] * 5
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "analyze", "--checkpoint", str(run), "--sizes", "16",
                        "32", "--num-images", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "analysis" / "analysis.json").read_text())
    assert len(summary["32"]["layers"]) == 2
    for name in ("attention_maps.png", "layer_metrics.png", "fov.png"):
        assert (run / "analysis" / name).stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "eval", "--checkpoint", str(run), "--sizes", "18"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "18 px is not a multiple of the patch size 4" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "eval", "--checkpoint", str(run), "--sizes", "16",
                        "--rope-interpolate"], capture_output=True, text=True)
    assert r.returncode == 2 and "RoPE" in r.stderr


def test_demo_quick_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lookhere.cli", "demo", "--quick", "--no-progress", "--output",
                        str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report:" in r.stdout
    res = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    assert set(res) == {"lh-90", "rope-2d-mixed"}
    assert all(set(v["sizes"]) == {"32", "64", "128"} for v in res.values())
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10000
