import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lookhere.analyze import head_diversity, mean_attention_distance, token_similarity
from lookhere.evaluate import EvalSettings, Metrics, _adversarial, fgsm_attack, parse_eps, pgd_attack
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


class _TiedLogits(nn.Module):
    """Logits with a gradient of zero (no attack moves them), tied between classes 0 and 1, behind
    class 2 for bright images."""

    def forward(self, x):
        bright = (x.mean((1, 2, 3)) > 0.5).float()
        return torch.stack([torch.ones(len(x)), torch.ones(len(x)), 2 * bright], -1) + 0 * x.sum((1, 2, 3))[:, None]


def test_accuracy_under_attack_breaks_ties_as_clean_top1_does(monkeypatch):
    """With a gradient of zero the attacked images score as the clean ones, ties included, and through
    the same forward (on CUDA: the same bf16 autocast) as clean images."""
    import lookhere.evaluate

    forwards = []
    monkeypatch.setattr(lookhere.evaluate, "scored", lambda model, x, device: forwards.append(len(x)) or model(x))
    images = torch.tensor([0.9] * 4 + [0.1] * 4).view(8, 1, 1, 1).expand(8, 3, 4, 4)
    labels = torch.tensor([1, 1, 0, 2, 1, 0, 2, 1])
    logits = _TiedLogits()(images)
    clean = Metrics(3)
    clean.update(logits, labels)
    assert clean.compute()["top1"] == pytest.approx(2 / 8)  # the tie goes to class 0
    ds = [(images[i], labels[i], 0) for i in range(8)]
    out = _adversarial(_TiedLogits(), ds, EvalSettings(data="synthetic", sizes=[4], adversarial=("fgsm", "pgd"),
                                                       eps=(1 / 255,), pgd_steps=2, batch_size=3), "cpu")
    assert out == {"n": 8, "fgsm@1/255": 2 / 8, "pgd@1/255": 2 / 8}
    assert forwards == [3, 3, 2] * 2  # every attacked batch of each attack was scored by it


def test_parse_eps():
    assert parse_eps("1/255,2/255") == [1 / 255, 2 / 255]
    assert parse_eps("0.01") == [0.01]
    for bad in ("one/255", "1/0", "nan", "inf", "-1/255"):
        with pytest.raises(ValueError, match="--eps"):
            parse_eps(bad)


@pytest.mark.parametrize("setting, message", [
    ({"val_length": 0}, "--val-length must be >= 1, got 0"),
    ({"length": 0}, "--length must be >= 1, got 0"),
    ({"lh_slope_scales": (0.5, -1.0)}, "--lh-slope-scales 0.5 -1.0: scales must be finite and >= 0"),
    ({"lh_slope_scales": (float("nan"),)}, "--lh-slope-scales nan: scales must be finite and >= 0"),
    ({"split": "val"}, "--tune-knobs chooses each knob on the validation split, which --split val reads"),
    ({"split": "validation[:10%]"}, "the validation split, which --split validation[:10%] reads"),
    ({"split": "val.tar"}, "the validation split, which --split val.tar reads"),  # a folder's val split in a tar
    ({"split": "test+validation"}, "the validation split, which --split test+validation reads"),
])
def test_eval_settings_refuse_before_any_work(setting, message):
    from lookhere.evaluate import EvalSettings

    EvalSettings(data="synthetic", sizes=[32, 64], train_size=32, tune_knobs=True).check(4)
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalSettings(data="synthetic", sizes=[32, 64], train_size=32, tune_knobs=True, **setting).check(4)


@pytest.mark.parametrize("setting, message", [
    ({"val_length": 20}, "--val-length 20 is read only by --tune-knobs: add --tune-knobs, or leave out --val-length"),
    ({"lh_slope_scales": (3.0,)}, "--lh-slope-scales 3.0 is read only by --tune-knobs"),
    ({"eps": (8 / 255,)}, "--eps 8/255 is read only by --adversarial: add --adversarial, or leave out --eps"),
    ({"adversarial_samples": 5}, "--adversarial-samples 5 is read only by --adversarial"),
    ({"pgd_steps": 50}, "--pgd-steps 50 is read only by --adversarial pgd"),
    ({"pgd_steps": 50, "adversarial": ("fgsm",)}, "--pgd-steps 50 is read only by --adversarial pgd"),
])
def test_a_setting_read_only_by_another_is_refused_without_it_not_ignored(setting, message):
    from lookhere.evaluate import EvalSettings

    with pytest.raises(ValueError, match=re.escape(message)):
        EvalSettings(data="synthetic", sizes=[32], **setting).check(4)
    EvalSettings(data="synthetic", sizes=[32], tune_knobs=True, adversarial=("pgd",), **{  # with its reader: taken
        k: v for k, v in setting.items() if k != "adversarial"}).check(4)


def test_a_study_file_may_list_its_attack_sizes():
    from lookhere.evaluate import EvalSettings

    for listed in (["1/255", "2/255"], [1 / 255, "2/255"], ("1/255", 2 / 255)):
        settings = EvalSettings.from_flags({"data": "synthetic", "sizes": [32], "adversarial": ("fgsm",), "eps": listed})
        assert settings.eps == (1 / 255, 2 / 255)
    settings = EvalSettings.from_flags({"data": "synthetic", "sizes": [32], "adversarial": ("fgsm",), "eps": ["4/255"]})
    assert settings.argv()[-2:] == ["--eps", "4/255"]
    with pytest.raises(ValueError, match=re.escape("--eps '1/255,x': expected numbers or fractions")):
        EvalSettings.from_flags({"data": "synthetic", "sizes": [32], "eps": ["1/255", "x"]})


def _ece_reference(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """The definition in float64: bins [0, 1/15), ..., [14/15, 1], the last holding 1.0."""
    index = np.minimum(np.floor(confidence * bins).astype(int), bins - 1)
    return sum(abs(correct[index == b].mean() - confidence[index == b].mean()) * (index == b).mean()
               for b in range(bins) if (index == b).any())


def test_calibration_error_matches_the_definition_and_torchmetrics_digits():
    # 100 images at confidence exactly 1.0 (90 right), 100 at about 0.95 (all right): one bin, gap 0.025
    sure = torch.full((100, 10), -30.0).index_fill_(1, torch.tensor([3]), 0.0)
    likely = torch.full((100, 10), math.log(0.05 / 9)).index_fill_(1, torch.tensor([3]), math.log(0.95))
    labels = torch.cat([torch.tensor([3] * 90 + [4] * 10), torch.full((100,), 3)])
    m = Metrics(10)
    m.update(torch.cat([sure, likely]), labels)
    confidence = torch.cat([sure, likely]).softmax(-1).amax(-1)
    assert (confidence[:100] == 1).all()
    expected = _ece_reference(confidence.double().numpy(), (labels == 3).double().numpy())
    # float32 sums over the bin, as torchmetrics: within 1e-5 (torchmetrics' 16th bin for 1.0 gives 0.075)
    assert m.compute()["ece"] == pytest.approx(expected, abs=1e-5) and expected == pytest.approx(0.025, abs=1e-6)
    torchmetrics = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # below a confidence of 1.0, torchmetrics' digits, accumulated over uneven batches
        logits, labels = torch.randn(499, 10, generator=g) * 3, torch.randint(0, 10, (499,), generator=g)
        assert (logits.softmax(-1).amax(-1) < 1).all()
        m = Metrics(10)
        for part in torch.split(torch.arange(499), 97):
            m.update(logits[part], labels[part])
        reference = torchmetrics.MulticlassCalibrationError(10, n_bins=15, norm="l1")
        reference.update(logits.softmax(-1), labels)
        assert m.compute()["ece"] == reference.compute().item()
        confidence = logits.softmax(-1).amax(-1).double().numpy()
        assert m.compute()["ece"] == pytest.approx(_ece_reference(confidence, (logits.argmax(-1) == labels).double().numpy()), abs=1e-5)


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


@pytest.mark.parametrize("pos_encoding", ["lh-90", "rope-2d-mixed"])
def test_analysis_in_chunks_of_images_equals_the_metrics_of_all_weights_at_once(pos_encoding):
    """The diagnostics, reduced a chunk of images at a time, are the means over all images that the
    whole (images, heads, tokens, tokens) weights of every layer give (on a non-square grid)."""
    from lookhere.analyze import analyze, capture_attention
    from lookhere.vit import create_vit

    torch.manual_seed(0)
    model = create_vit(pos_encoding, img_size=(24, 40), patch_size=4, embed_dim=48, depth=2, num_heads=12).eval()
    images = torch.randn(5, 3, 24, 40)
    grid, p = (6, 10), 1
    with torch.no_grad(), capture_attention(model) as weights:
        _, inter = model.forward_intermediates(images, output_fmt="NLC")
    centre = p + 3 * 10 + 5
    for chunk in (1, 2, 5):
        got = analyze(model, images, chunk=chunk)
        assert got["grid"] == [6, 10]
        for layer, (w, tokens) in enumerate(zip(weights, inter)):
            want, have = mean_attention_distance(w, grid, p), got["layers"][layer]
            assert have["per_head_distance"] == pytest.approx(want.tolist(), rel=1e-12)
            assert have["mean_attention_distance"] == pytest.approx(float(want.mean()), rel=1e-12)
            assert have["head_diversity_js"] == pytest.approx(head_diversity(w[:, :, p:]), rel=1e-12)
            assert have["token_similarity"] == pytest.approx(token_similarity(tokens), rel=1e-12)
            torch.testing.assert_close(got["centre_maps"][layer], w[:, :, centre, p:].mean(0).reshape(12, *grid),
                                       rtol=1e-6, atol=1e-7)


def test_images_per_chunk_keeps_one_layers_weights_within_the_budget():
    from lookhere.analyze import ATTENTION_BYTES, images_per_chunk

    tokens = 1 + 64 * 64  # 1024 px at patch 16: one image's 12 heads already take 0.8 GB
    assert images_per_chunk(tokens, 12) == 1 and 4 * 12 * tokens ** 2 <= ATTENTION_BYTES
    assert images_per_chunk(tokens, 12, budget=1) == 1  # never none
    small = 1 + 14 * 14
    n = images_per_chunk(small, 12)
    assert n * 4 * 12 * small ** 2 <= ATTENTION_BYTES < (n + 1) * 4 * 12 * small ** 2

def _fake_eval(path: Path, acc: list[float]):
    path.mkdir(parents=True)
    res = {"train_size": 32, "sizes": {str(s): {"top1": a, "top5": 1.0, "nll": 1 - a, "ece": 0.1, "n": 10}
                                       for s, a in zip((32, 64, 128), acc)},
           "adversarial": {"n": 10, "fgsm@1/255": acc[0] / 2}, "by_object_size": None}
    (path / "eval.json").write_text(json.dumps(res))


def test_result_records_are_flushed_to_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """eval.json says a study cell is finished: a crash of the machine must leave none or all of it,
    as must the reports' results.json (a study's and a comparison's)."""
    import os

    from lookhere.evaluate import write_results
    from lookhere.report import compare

    _fake_eval(tmp_path / "a", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "b", [0.75, 0.5, 0.3])
    results = json.loads((tmp_path / "a" / "eval.json").read_text())
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(dst))) or real_replace(src, dst))
    write_results(results, tmp_path / "eval")
    compare([tmp_path / "a", tmp_path / "b"], tmp_path / "report")
    for record in (tmp_path / "eval" / "eval.json", tmp_path / "report" / "results.json"):
        swap = events.index(("replace", str(record)))
        assert ("fsync", str(record) + ".tmp") in events[:swap] and ("fsync", str(record.parent)) in events[swap:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == results


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


def test_compare_names_runs_by_their_folder_and_refuses_a_name_twice(tmp_path):
    _fake_eval(tmp_path / "lh" / "eval", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "rope" / "eval", [0.75, 0.5, 0.3])
    compare([tmp_path / "lh" / "eval" / "eval.json", tmp_path / "rope" / "eval"], tmp_path / "report")
    assert set(json.loads((tmp_path / "report" / "results.json").read_text())) == {"lh", "rope"}
    _fake_eval(tmp_path / "cells" / "lh-90" / "seed0", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "cells" / "rope" / "seed0", [0.75, 0.5, 0.3])
    seeds = [tmp_path / "cells" / "lh-90" / "seed0", tmp_path / "cells" / "rope" / "seed0"]
    with pytest.raises(ValueError, match="two or more runs are named seed0; name each with --names"):
        compare(seeds, tmp_path / "report2")
    with pytest.raises(ValueError, match=re.escape("--names: give one name per run (2 runs, 1 names)")):
        compare(seeds, tmp_path / "report2", names=["lh"])
    assert not (tmp_path / "report2").exists()


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
    # The knob given by flag is recorded beside the numbers it made (not read later as the defaults).
    assert res["knobs_given"] == {"lh_global_slope": 0.5}
    assert (run / "eval" / "eval.md").read_text().startswith("Every size with the test-time setting given: "
                                                             "lh_global_slope=0.5")
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


def test_demo_command_trains_evaluates_and_reports_both_models(tmp_path, monkeypatch, capsys):
    # The command's wiring at a small plan (the quick plan's own 5 epochs are the README's measured run,
    # not a test's: long training stays out of the suite).
    from lookhere import demo
    from lookhere.cli import main

    monkeypatch.setattr(demo, "QUICK", demo.DemoPlan(train_length=128, epochs=1, eval_length=12, sizes=(32, 64)))
    assert main(["demo", "--quick", "--no-progress", "--output", str(tmp_path / "demo")]) == 0
    assert "report:" in capsys.readouterr().out
    res = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    assert set(res) == {"lh-90", "rope-2d-mixed"}
    assert all(set(v["sizes"]) == {"32", "64"} for v in res.values())
    assert all(s["n"] == 12 for v in res.values() for s in v["sizes"].values())
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10000
    assert "`lookhere demo --quick --output " in (tmp_path / "demo" / "report" / "report.md").read_text()


def test_resumed_demo_counts_the_training_before_the_kill(tmp_path, monkeypatch):
    import torch

    from lookhere import demo
    from lookhere.evaluate import load_checkpoint

    tiny = demo.DemoPlan(train_length=64, epochs=1, eval_length=8, sizes=(32,), batch_size=32)
    monkeypatch.setattr(demo, "QUICK", tiny)
    out = tmp_path / "demo"
    first = demo.run_demo(out, quick=True, seed=1, progress=False)
    # both models train with the demo's LayerScale (a setting that reaches the model, not only the config)
    for name in ("lh-90", "rope-2d-mixed"):
        model, cfg = load_checkpoint(out / name)
        assert cfg.init_values == demo.DEMO_LAYERSCALE == 0.1
        assert all(block.ls1.gamma.shape == (model.embed_dim,) for block in model.blocks)
    # as a demo killed while lh-90 had not yet saved a checkpoint leaves it (its config.yaml written),
    # and rope-2d-mixed trained, with an hour of training on record
    for name in ("last", "best"):
        shutil.rmtree(out / "lh-90" / name)
    path = out / "rope-2d-mixed" / "last" / "state.pt"
    torch.save({**torch.load(path, weights_only=True), "train_s": 3600.0}, path)
    again = demo.run_demo(out, quick=True, seed=1, progress=False)
    assert again["summary"] == first["summary"]
    assert 60 <= again["minutes"] < 60 + 5
    report = (out / "report" / "report.md").read_text()
    assert f"{again['minutes']:.1f} minutes on this machine" in report
    assert f"`lookhere demo --quick --seed 1 --output {out}`" in report


# --- list labels (ImageNet-HR) and the paper's models ---------------------------------------------
def test_metrics_with_label_lists_match_hand_computation():
    from lookhere.evaluate import label_set_nll

    logits = torch.tensor([[2.0, 1.0, 0.1, -1.0, 0.0, 0.5, 0.2],
                           [0.2, 0.1, 3.0, -2.0, 0.0, 0.05, 0.1],
                           [1.0, 1.5, -0.5, 0.3, -0.2, -0.1, 0.9],
                           [0.1, 0.2, -1.0, -2.0, 4.0, 0.3, 0.4]])
    lists = [[3, 0], [3], [6, 5, 4], [2, 3]]  # hit, miss, top-5 hit only, miss
    labels = torch.tensor([lab + [-1] * (3 - len(lab)) for lab in lists])
    m = Metrics(7)
    m.update(logits, labels)
    out = m.compute()
    p = logits.double().softmax(-1)
    pred = p.argmax(-1).tolist()
    correct = [pred[i] in lists[i] for i in range(4)]
    top5 = [any(c in lists[i] for c in p[i].topk(5).indices.tolist()) for i in range(4)]
    assert correct == [True, False, False, False] and top5 == [True, False, True, False]
    assert out["top1"] == pytest.approx(sum(correct) / 4) and out["top5"] == pytest.approx(sum(top5) / 4)
    nll = -sum(math.log(sum(p[i, c] for c in lists[i])) for i in range(4)) / 4
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    conf = p.max(-1).values
    ece = sum(abs(float(conf[i]) - correct[i]) for i in range(4)) / 4  # four distinct 15-bin bins
    assert len({int(c * 15) for c in conf}) == 4 and out["ece"] == pytest.approx(float(ece), abs=1e-6)
    single = torch.tensor([0, 1, 0, 4])  # one label each: the cross-entropy
    assert float(label_set_nll(logits, single)) == pytest.approx(float(nn.functional.cross_entropy(logits, single)))


def _tiny_model_dir(path, seed=0, pos_encoding="lh-90"):
    import lookhere

    torch.manual_seed(seed)
    model = lookhere.create_vit(pos_encoding, img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=12,
                                num_classes=10)
    lookhere.save_model(model, path)
    return model.eval()


def _hr_labels(logits: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Lists built from the predictions: a hit, a miss outside the top five, a top-5-only hit, a hit."""
    order = logits.argsort(-1, descending=True).tolist()
    return [[order[0][0], order[0][-1]], [order[1][-1], order[1][-2]], [order[2][2]], [order[3][0]]]


def _expected(logits: torch.Tensor, lists) -> dict:
    p = logits.double().softmax(-1)
    top5 = p.topk(5).indices.tolist()
    return {"top1": sum(int(p[i].argmax()) in lab for i, lab in enumerate(lists)) / len(lists),
            "top5": sum(any(c in lab for c in top5[i]) for i, lab in enumerate(lists)) / len(lists),
            "nll": -sum(math.log(sum(p[i, c] for c in lab)) for i, lab in enumerate(lists)) / len(lists)}


def test_eval_scores_label_lists_of_an_imagenet_hr_folder(tmp_path):
    """`lookhere eval --checkpoint` on a local ImageNet-HR-layout folder: an image counts when its list
    holds the prediction (top-5: any of the five), at the training size (crop 0.875) and another."""
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    from conftest import direct_eval_tensor, hr_folder

    from lookhere.cli import main

    model = _tiny_model_dir(tmp_path / "model")
    images = hr_folder(tmp_path / "hr", [(48, 48)] * 4, [[0]] * 4)  # labels rewritten below
    direct = {s: torch.stack([direct_eval_tensor(images / "test" / f"{i}.png", s, 32) for i in range(4)])
              for s in (32, 48)}
    with torch.no_grad():
        logits = {s: model(x) for s, x in direct.items()}
    lists = _hr_labels(logits[32], 10)
    (images / "test" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "img_idx": i, "labels": lab}) + "\n" for i, lab in enumerate(lists)))
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", f"hf:{images}", "--split", "test",
                 "--data-root", str(tmp_path / "cache"), "--sizes", "32", "48", "--device", "cpu",
                 "--no-progress", "--output", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["train_size"] == 32 and "lists of valid classes" in res["label_lists"]
    assert res["sizes"]["32"]["top1"] == pytest.approx(0.5) and res["sizes"]["32"]["top5"] == pytest.approx(0.75)
    for size in (32, 48):
        want = _expected(logits[size], lists)
        got = res["sizes"][str(size)]
        assert got["n"] == 4 and (got["top1"], got["top5"]) == (pytest.approx(want["top1"]), pytest.approx(want["top5"]))
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert "lists of valid classes" in (out / "eval.md").read_text()


def test_eval_of_a_timm_model_with_a_pretrained_file(tmp_path, capsys):
    """`lookhere eval --model NAME --pretrained-file PATH` loads the file through timm's pretrained
    machinery and scores list labels from the model's own predictions."""
    pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    import timm
    from conftest import direct_eval_tensor, hr_folder

    from lookhere.cli import main

    name = "vit_tiny_patch16_lookhere_90"
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    crop = model.pretrained_cfg["crop_pct"]
    images = hr_folder(tmp_path / "hr", [(64, 64)] * 4, [[0]] * 4)
    with torch.no_grad():
        logits = {s: model(torch.stack([direct_eval_tensor(images / "test" / f"{i}.png", s, 224, crop_pct=crop)
                                        for i in range(4)])) for s in (224, 256)}
    lists = _hr_labels(logits[224], 1000)
    (images / "test" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "img_idx": i, "labels": lab}) + "\n" for i, lab in enumerate(lists)))
    out = tmp_path / "out"
    assert main(["eval", "--model", name, "--pretrained-file", str(tmp_path / "weights.pth"), "--data", f"hf:{images}",
                 "--data-root", str(tmp_path / "cache"), "--sizes", "224", "256", "--device", "cpu", "--no-progress",
                 "--output", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["train_size"] == 224
    for size in (224, 256):
        want, got = _expected(logits[size], lists), res["sizes"][str(size)]
        assert (got["top1"], got["top5"]) == (pytest.approx(want["top1"]), pytest.approx(want["top5"]))
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert f"| {name} | size | top-1 | top-5 | NLL | ECE |" in capsys.readouterr().out
    # A name without pretrained weights and no file, or a missing file, is refused with the flag named.
    assert main(["eval", "--model", name, "--data", f"hf:{images}", "--sizes", "224"]) == 2
    assert "--pretrained-file PATH" in capsys.readouterr().err
    assert main(["eval", "--model", name, "--pretrained-file", str(tmp_path / "none.pth"), "--data", "synthetic",
                 "--sizes", "224"]) == 2
    assert "--pretrained-file" in capsys.readouterr().err and (tmp_path / "none.pth").exists() is False
    _tiny_model_dir(tmp_path / "other")  # another architecture's weights
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "other" / "model.safetensors"), tmp_path / "other.pth")
    assert main(["eval", "--model", name, "--pretrained-file", str(tmp_path / "other.pth"), "--data", "synthetic",
                 "--sizes", "224"]) == 2
    assert f"--pretrained-file {tmp_path / 'other.pth'}: the weights do not load into {name}" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")  # a damaged download
    assert main(["eval", "--model", name, "--pretrained-file", str(tmp_path / "garbage.pth"), "--data", "synthetic",
                 "--sizes", "224"]) == 2
    err = capsys.readouterr().err
    assert f"--pretrained-file {tmp_path / 'garbage.pth'}: the weights do not load into {name}" in err
    assert "weights_only=False" not in err


def test_eval_takes_exactly_one_of_model_and_checkpoint(tmp_path, capsys):
    from lookhere.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--sizes", "32"])
    assert e.value.code == 2 and "--model --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "x", "--checkpoint", "y", "--sizes", "32"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- the command line: strict flags, clear failures -----------------------------------------------
def test_eval_and_analyze_default_to_device_auto():
    from lookhere.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--checkpoint", "x", "--sizes", "32"]).device == "auto"
    assert parser.parse_args(["analyze", "--checkpoint", "x", "--sizes", "32"]).device == "auto"


def test_a_misspelled_attack_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import lookhere.evaluate
    from lookhere.cli import main

    monkeypatch.setattr(lookhere.evaluate, "load_checkpoint", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(tmp_path), "--sizes", "32", "--adversarial", "fgsm,pdg"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--adversarial" in err and "pdg" in err and "allowed: fgsm, pgd" in err


@pytest.mark.parametrize("argv", [["example", "--patch-size", "0"], ["example", "--batch-size", "-1"],
                                  ["eval", "--checkpoint", "x", "--sizes", "32", "--train-size", "0"],
                                  ["analyze", "--checkpoint", "x", "--num-images", "0"],
                                  ["study", "--config", "x", "--output", "y", "--jobs", "0"]])
def test_counts_below_one_are_refused_by_the_parser(argv, capsys):
    from lookhere.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    flag = next(a for a in argv if a.startswith("--") and a not in ("--checkpoint", "--sizes", "--config", "--output"))
    assert e.value.code == 2 and f"argument {flag}: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--adversarial", "fgsm"], ["--by-object-size"]])
def test_an_output_that_cannot_be_produced_is_refused(tmp_path, capsys, monkeypatch, flag):
    """Attacks and object-size changes are measured at the training size: without it among --sizes the
    command refuses before evaluating anything (it used to finish without them)."""
    import lookhere.evaluate
    from lookhere.cli import main

    _tiny_model_dir(tmp_path / "model")
    monkeypatch.setattr(lookhere.evaluate, "evaluate_size", lambda *a, **k: pytest.fail("evaluated"))
    code = main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--sizes", "48", "64",
                 "--device", "cpu", "--output", str(tmp_path / "out"), *flag])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag[0]} measures at the training size, 32 px" in err and "--sizes 48 64" in err
    assert not (tmp_path / "out").exists()


def test_messages_name_flags(tmp_path, capsys):
    from lookhere.cli import main

    assert main(["example", "--img-size", "30", "--patch-size", "16"]) == 2
    assert "--img-size 30 is not a multiple of --patch-size 16" in capsys.readouterr().err
    _fake_eval(tmp_path / "a", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "b", [0.7, 0.6, 0.5])
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "only-one"]) == 2
    assert "--names: give one name per run (2 runs, 1 names)" in capsys.readouterr().err
    _tiny_model_dir(tmp_path / "model")
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--split", "train[99%:]",
                 "--sizes", "32", "--device", "cpu"]) == 2
    assert "--split 'train[99%:]': synthetic has the splits train, val, test" in capsys.readouterr().err


@pytest.mark.parametrize("pos_encoding,flag,knob,default,value", [
    ("lh-90", "--lh-global-slope 0.5", "config.global_slope", 2.0, 0.5),
    ("rope-2d-axial", "--rope-interpolate", "interpolate", False, True),
    ("learned-1d", "--pos-resample grid", "resample", "bicubic", "grid"),
    ("fire", "--fire-normalize train", "normalize", "test", "train"),
])
def test_eval_knob_flags_reach_the_model_that_is_evaluated(tmp_path, monkeypatch, pos_encoding, flag, knob, default,
                                                           value):
    """Each test-time knob flag sets the encoding of the model handed to the evaluation; without it the
    model keeps the setting it was saved with."""
    import operator

    import lookhere.evaluate
    from lookhere.cli import main

    _tiny_model_dir(tmp_path / "model", pos_encoding=pos_encoding)
    seen = []

    def record(model, settings, **kwargs):
        seen.append(operator.attrgetter(knob)(model.pos_encoding))
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(lookhere.evaluate, "run_eval", record)
    argv = ["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--sizes", "32", "--device", "cpu"]
    assert main(argv) == 1 and main([*argv, *flag.split()]) == 1
    assert seen == [default, value]


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_debug(tmp_path, capsys, monkeypatch):
    import lookhere.evaluate
    from lookhere.cli import main

    _tiny_model_dir(tmp_path / "model")

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(lookhere.evaluate, "run_eval", broken)
    argv = ["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--sizes", "32"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "unexpected error: RuntimeError: something inside broke" in err and "--debug" in err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors_exit_2_and_failures_1(tmp_path, capsys, monkeypatch):
    import lookhere.evaluate
    from lookhere.cli import main

    _tiny_model_dir(tmp_path / "model")
    argv = ["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--sizes", "32"]
    assert main([*argv[:-1], "36"]) == 2  # a bad flag value: not a multiple of the patch size
    assert "36 px is not a multiple of the patch size 8" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise ConnectionError("the Hub cannot be reached")

    monkeypatch.setattr(lookhere.evaluate, "run_eval", offline)
    assert main(argv) == 1  # the inputs are right; the work failed
    err = capsys.readouterr().err
    assert "failed: the Hub cannot be reached" in err and "Traceback" not in err


def test_eval_and_analyze_look_for_the_data_where_the_run_found_it(tmp_path, capsys):
    """A run trained with --data-root is evaluated and analysed on the data there, unless told otherwise."""
    import yaml

    from lookhere.cli import main
    from lookhere.io import save_model
    from lookhere.train import TrainConfig
    from lookhere.vit import create_vit

    run, root = tmp_path / "run", tmp_path / "elsewhere" / "fashion-mnist"
    save_model(create_vit("lh-90", img_size=28, patch_size=4, embed_dim=48, depth=1, num_classes=10), run / "best")
    cfg = TrainConfig(data="fashion-mnist", data_root=str(root), img_size=28, patch_size=4, embed_dim=48, depth=1)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for command in ("eval", "analyze"):
        assert main([command, "--checkpoint", str(run), "--sizes", "28", "--device", "cpu"]) == 2
        assert f"Fashion-MNIST folder {root} does not exist" in capsys.readouterr().err, command


# --- the command line and its pictures, as the review found them -----------------------------------
def _figures_left_open(monkeypatch) -> list:
    """The figures the code under test would close, kept open to read what each draws."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_the_accuracy_plot_draws_sizes_in_size_order_with_a_tick_at_each(tmp_path, monkeypatch):
    """`--sizes 64 32 48` gives one curve over size, not a zig-zag in flag order; every tested size is
    a labelled tick (the log2 axis alone labelled 32 and 64 only)."""
    import matplotlib.pyplot as plt

    from lookhere.evaluate import plot_accuracy

    real_close = plt.close
    figures = _figures_left_open(monkeypatch)
    runs = {"a": {"train_size": 32, "sizes": {str(s): {"top1": v} for s, v in ((64, 0.3), (32, 0.9), (48, 0.6))}},
            "b": {"train_size": 32, "sizes": {str(s): {"top1": v} for s, v in ((96, 0.1), (32, 0.8))}}}
    plot_accuracy(runs, tmp_path / "acc.png")
    (fig,) = figures
    ax = fig.axes[0]
    curves = {line.get_label(): line for line in ax.lines if line.get_label() in runs}
    assert list(curves["a"].get_xdata()) == [32, 48, 64] and list(curves["a"].get_ydata()) == [0.9, 0.6, 0.3]
    assert list(curves["b"].get_xdata()) == [32, 96] and list(curves["b"].get_ydata()) == [0.8, 0.1]
    assert list(ax.get_xticks()) == [32, 48, 64, 96] and len(ax.get_xticks(minor=True)) == 0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "48", "64", "96"]
    real_close(fig)


def test_compare_says_which_runs_were_measured_with_a_test_time_setting(tmp_path):
    """A knob given to `lookhere eval` (and a list-label note) stays beside the numbers it made in the
    report; the HTML page shows Markdown bold as bold."""
    from lookhere.evaluate import LABEL_LIST_METRICS

    _fake_eval(tmp_path / "interp", [0.8, 0.7, 0.6])
    _fake_eval(tmp_path / "plain", [0.75, 0.5, 0.3])
    path = tmp_path / "interp" / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "knobs_given": {"rope_interpolate": True},
                                "label_lists": LABEL_LIST_METRICS}))
    files = compare([tmp_path / "interp", tmp_path / "plain"], tmp_path / "report")
    md = Path(files["markdown"]).read_text()
    assert "**interp**: every size with the test-time setting given: rope_interpolate=True" in md
    assert "**plain**:" not in md and f"**interp**: {LABEL_LIST_METRICS}" in md
    page = Path(files["html"]).read_text()
    assert "<strong>interp</strong>: every size with the test-time setting given: rope_interpolate=True" in page
    assert "**" not in page


def test_compare_names_an_input_that_is_not_an_eval_json(tmp_path, capsys):
    from lookhere.cli import main

    _fake_eval(tmp_path / "a", [0.8, 0.7, 0.6])
    for name, content in (("config.yaml", b"data: synthetic\n"), ("truncated.json", b'{"train_size": 32, "siz'),
                          ("other.json", b'{"step": 3}'), ("list.json", b"[1, 2]"), ("picture.png", b"\x89PNG\xff\xfe")):
        (tmp_path / name).write_bytes(content)
        code = main(["compare", str(tmp_path / "a"), str(tmp_path / name), "--output", str(tmp_path / "report")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (name, err)
        assert err[0].startswith(f"lookhere compare: error: {tmp_path / name}: not ") and "eval.json" in err[0], err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("size", ["0", "-8"])
def test_analyze_sizes_below_one_are_refused_by_the_parser(size, capsys):
    from lookhere.cli import main

    with pytest.raises(SystemExit) as e:
        main(["analyze", "--checkpoint", "x", "--sizes", "32", size])
    assert e.value.code == 2 and f"argument --sizes: must be >= 1, got {size}" in capsys.readouterr().err


def test_analysis_pictures_count_layers_from_0_as_the_flag_and_the_table_do(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import lookhere
    from lookhere.analyze import run_analysis, table

    model = lookhere.create_vit("lh-90", img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12,
                                num_classes=10)
    real_close = plt.close
    figures = _figures_left_open(monkeypatch)
    res = run_analysis(model, {16: torch.randn(2, 3, 16, 16)}, tmp_path, layer=0)
    maps, metrics, fov = figures
    assert maps.get_suptitle().startswith("layer 0 (of layers 0 to 1): attention of the centre patch")
    assert ", layer 0 (of layers 0 to 1): global slope" in fov.get_suptitle()
    assert [row.split("|")[2].strip() for row in table(res["summary"]).splitlines()[2:]] == ["0", "1"]
    for ax in metrics.axes:
        assert all(float(t).is_integer() for t in ax.get_xticks()) and {0, 1} <= set(ax.get_xticks())
    for fig in figures:
        real_close(fig)


def test_reproduce_output_help_states_the_default_the_command_uses(tmp_path, monkeypatch):
    import argparse

    import lookhere.reproduce
    from lookhere.cli import build_parser, main

    used = []

    def record(cell, output):
        used.append(output)
        raise ValueError("stop")

    monkeypatch.setattr(lookhere.reproduce, "reproduce_cell", record)
    assert main(["reproduce", str(tmp_path / "synthetic-where" / "lh-90" / "seed0")]) == 2
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    output = next(a for a in sub.choices["reproduce"]._actions if a.dest == "output")
    assert "(default: reproduce-DATASET-ENCODING-seedN)" in output.help
    assert used == ["reproduce-synthetic-where-lh-90-seed0"]


@pytest.mark.parametrize("extra", [["--partition", "gpu"], ["--nodes-per-cell", "2"], ["--tasks-per-node", "4"],
                                   ["--time-min", "5"], ["--max-running", "2"], ["--slurm-arg", "account=x"]])
def test_study_report_refuses_every_flag_of_running_cells(tmp_path, capsys, extra):
    from lookhere.cli import main

    assert main(["study", "--report", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert "--report DIR aggregates a study's finished cells and runs nothing; leave out " + extra[0] in err


def test_a_demo_folder_of_other_settings_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    """`lookhere demo --quick` and then `lookhere demo` (or another --seed) in the same folder: one message
    that says so, not a --resume error about flags the demo does not have."""
    import yaml

    from lookhere import demo
    from lookhere.cli import main

    out = tmp_path / "demo"
    resumed = []

    def killed(cfg):  # a demo killed once its first run's config.yaml is written
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        resumed.append(cfg.resume)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train", killed)
    assert main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 130
    for other in ([], ["--quick", "--seed", "1"]):
        capsys.readouterr()
        assert main(["demo", *other, "--no-progress", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--output {out} holds a demo made with other settings" in err[0], err
        assert "--resume" not in err[0] and "--data-length" not in err[0]
    assert main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 130  # the same demo: resumed
    assert resumed == [None, str(out / "lh-90")]


def test_num_heads_is_refused_where_no_released_file_reads_it(tmp_path, capsys, monkeypatch, released_file):
    import lookhere.analyze
    import lookhere.evaluate
    from lookhere.cli import main
    from lookhere.evaluate import load_checkpoint

    _tiny_model_dir(tmp_path / "model")
    monkeypatch.setattr(lookhere.evaluate, "run_eval", lambda *a, **k: pytest.fail("evaluated"))
    monkeypatch.setattr(lookhere.analyze, "run_analysis", lambda *a, **k: pytest.fail("analysed"))
    for argv in (["eval", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic"],
                 ["analyze", "--checkpoint", str(tmp_path / "model"), "--data", "synthetic", "--num-images", "1"],
                 ["eval", "--model", "vit_tiny_patch16_lookhere_90", "--data", "synthetic"]):
        assert main([*argv, "--sizes", "32", "--num-heads", "6", "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--num-heads" in err[0] and "released .pth" in err[0], err
    path, _ = released_file  # a released file is read with the heads given (12 unless given)
    model, cfg = load_checkpoint(path, num_heads=16)
    assert cfg is None and model.blocks[0].attn.num_heads == 16
    assert load_checkpoint(path)[0].blocks[0].attn.num_heads == 12


def test_the_quick_demo_and_the_full_one_have_their_own_default_folders(monkeypatch):
    """`lookhere demo --quick`, then `lookhere demo`, as the README tells them: neither finds the other's runs."""
    import lookhere.demo
    from lookhere.cli import main

    folders = []

    def record(output, **kwargs):
        folders.append(output)
        raise ValueError("stop")

    monkeypatch.setattr(lookhere.demo, "run_demo", record)
    for argv in (["demo", "--quick"], ["demo"], ["demo", "--quick", "--output", "mine"]):
        assert main(argv) == 2
    assert folders == ["demo-quick", "demo", "mine"]
