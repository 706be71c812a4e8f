import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lookhere import create_vit
from lookhere.evaluate import EvalSettings, apply_knobs, evaluate_size, knob_grid, run_eval, slope_rule
from lookhere.data import DataSpec, build_dataset
from lookhere.environment import is_x86
from lookhere.study import StudyConfig, check_cells_match, resolve_identities
from lookhere.study_report import _setting_text, aggregate, paired, summarize

T_975_DF2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def test_summary_matches_hand_computation():
    s = summarize([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    assert summarize([0.4]) == {"n": 1, "mean": 0.4, "std": None, "ci95": [None, None]}
    assert summarize([float("nan"), 0.2, 0.4])["mean"] == pytest.approx(0.3)  # NaN cells are left out


def test_paired_comparison_matches_hand_computation():
    ref, other = [0.6, 0.7, 0.8], [0.5, 0.65, 0.6]
    d = np.array([0.1, 0.05, 0.2])
    c = paired(ref, other)
    sd = math.sqrt(((d - d.mean()) ** 2).sum() / 2)
    assert c["mean"] == pytest.approx(d.mean()) and c["std"] == pytest.approx(sd)
    t = d.mean() / (sd / math.sqrt(3))
    # two degrees of freedom: the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2)
    assert c["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert c["ci95"] == pytest.approx([d.mean() - T_975_DF2 * sd / math.sqrt(3), d.mean() + T_975_DF2 * sd / math.sqrt(3)])
    assert c["wins"] == 3 and c["ties"] == 0
    assert paired([0.5, 0.5], [0.5, 0.5])["p_value"] is None  # no spread, no test
    # Two images more on every seed, whether or not the float subtraction rounds to one value.
    for ref, other in (([86 / 150, 90 / 150, 99 / 150], [84 / 150, 88 / 150, 97 / 150]), ([.59, .61, .64], [.57, .59, .62])):
        c = paired(ref, other)
        assert c["p_value"] is None and c["std"] == 0.0 and c["ci95"] == [c["mean"], c["mean"]]


def _record(enc, seed, top1s, fgsm):
    sizes = {}
    for size, t in top1s.items():
        m = {"top1": t, "nll": 1 - t, "ece": t / 10}
        sizes[size] = {"default": m, "tuned": m, "setting": {}, "val_top1": {}}
    return {"dataset": "d", "encoding": enc, "seed": seed, "command": "x", "train_size": 16,
            "best_val_top1": top1s["16"], "sizes": sizes, "adversarial": {"n": 8, "fgsm@1/255": fgsm},
            "by_object_size": None}


def test_aggregate_over_seeds_and_against_the_reference():
    records = [_record("lh-90", s, {"16": 0.8 + 0.01 * s, "32": 0.7 + 0.02 * s}, 0.3) for s in range(3)]
    records += [_record("rope-2d-mixed", s, {"16": 0.78 + 0.03 * s, "32": 0.4 + 0.05 * s}, 0.2 + 0.01 * s)
                for s in range(3)]
    out = aggregate(records, "lh-90")["d"]
    rope = out["encodings"]["rope-2d-mixed"]["tuned"]["32"]["top1"]
    assert rope["mean"] == pytest.approx(0.45) and rope["std"] == pytest.approx(0.05)
    assert out["encodings"]["lh-90"]["adversarial"]["fgsm@1/255"]["std"] == pytest.approx(0.0)
    c = out["paired"]["rope-2d-mixed"]
    assert c["top1"]["32"]["mean"] == pytest.approx(0.7 + 0.02 - 0.45)  # mean of 0.30, 0.27, 0.24
    assert c["top1"]["32"]["wins"] == 3 and c["top1"]["16"]["wins"] == 1  # 0.02, 0.0, -0.02
    # NLL (1 - top-1 here) and ECE: lower wins; lh-90's NLL is lower on every seed at 32 px
    assert c["nll"]["32"]["wins"] == 3 and c["ece"]["32"]["wins"] == 0
    assert c["adversarial"]["fgsm@1/255"]["mean"] == pytest.approx(0.09)
    assert "lh-90" not in out["paired"]


def _tiny_lookhere(seed=0):
    torch.manual_seed(seed)
    return create_vit("lh-90", img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=12, num_classes=4).eval()


def test_knob_grids_and_bad_knobs():
    # The released presets' global slope is 2: its own setting first, then half and double.
    assert knob_grid(_tiny_lookhere(), (0.5, 2.0)) == [{"lh_global_slope": 2.0}, {"lh_global_slope": 1.0},
                                                        {"lh_global_slope": 4.0}]
    # and, given the ratio of the training size to the test size, the slope that counts penalties
    # in training-grid patches (once: at 2x that is the x0.5 setting; at the training size, its own)
    assert knob_grid(_tiny_lookhere(), (0.5, 2.0), size_ratio=0.25) == [
        {"lh_global_slope": 2.0}, {"lh_global_slope": 1.0}, {"lh_global_slope": 4.0}, {"lh_global_slope": 0.5}]
    assert len(knob_grid(_tiny_lookhere(), (0.5, 2.0), size_ratio=0.5)) == 3
    assert len(knob_grid(_tiny_lookhere(), (0.5, 2.0), size_ratio=1.0)) == 3
    assert slope_rule(2.0, 0.5, (0.5, 2.0), 0.25) == "size ratio"
    assert slope_rule(2.0, 1.0, (0.5, 2.0), 0.5) == "x0.5 = size ratio"
    assert slope_rule(2.0, 2.0, (0.5, 2.0), 0.5) == "own"
    assert slope_rule(2.0, 4.0, (0.5, 2.0), 0.25) == "x2"
    rope = create_vit("rope-2d-axial", img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12)
    assert knob_grid(rope) == [{"rope_interpolate": False}, {"rope_interpolate": True}]
    learned = create_vit("learned-1d", img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12)
    assert knob_grid(learned) == [{"pos_resample": "bicubic"}, {"pos_resample": "grid"}]
    assert knob_grid(create_vit("none", img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12)) == []
    # a knob is the encoding's own, whatever its attributes are called (factorized has a `resample`
    # method of its own, which is not the learned-1d knob; sincos-2d's `interpolate` is not RoPE's)
    for name, grid in [("factorized", []), ("sincos-2d", [{"sincos_interpolate": False}, {"sincos_interpolate": True}])]:
        model = create_vit(name, img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=12)
        assert knob_grid(model) == grid, name
        with pytest.raises(ValueError, match=f"pos_resample applies to learned-1d models, not {name}"):
            apply_knobs(model, pos_resample="grid")
        with pytest.raises(ValueError, match=f"rope_interpolate applies to RoPE models, not {name}"):
            apply_knobs(model, rope_interpolate=True)
    with pytest.raises(ValueError, match="sincos_interpolate applies to sincos-2d models, not rope-2d-axial"):
        apply_knobs(rope, sincos_interpolate=True)
    with pytest.raises(ValueError, match="rope_interpolate applies to RoPE models, not lh-90"):
        apply_knobs(_tiny_lookhere(), rope_interpolate=True)
    with pytest.raises(ValueError, match="pos_resample applies to learned-1d models"):
        apply_knobs(rope, pos_resample="grid")


def test_report_names_the_rule_that_gave_lookheres_slope():
    text = _setting_text({'{"lh_global_slope": 0.5, "rule": "size ratio"}': 2, '{"lh_global_slope": 2.0, "rule": "own"}': 1,
                          '{"rope_interpolate": true}': 3})
    assert text == "slope=0.5 [size ratio] (2); slope=2 [own] (1); interpolate=True (3)"


def test_tuned_setting_is_the_best_on_validation_and_its_test_metrics_are_that_settings():
    model = _tiny_lookhere()
    settings = EvalSettings(data="synthetic-where", sizes=[16, 64], train_size=16, length=24, seed=3,
                            tune_knobs=True, val_length=20, lh_slope_scales=(0.0, 0.5, 4.0))
    g0 = model.pos_encoding.config.global_slope
    res = run_eval(model, settings, progress=False)
    assert model.pos_encoding.config.global_slope == g0  # the model is left as it was
    choice = res["knobs"]["64"]
    val = build_dataset(DataSpec("synthetic-where", 64, None, 3), "val", train=False, length=20)
    test = build_dataset(DataSpec("synthetic-where", 64, None, 3), "test", train=False, length=24)
    expected = {}
    for g in (g0, 0.0, 0.5 * g0, 4.0 * g0, 0.25 * g0):  # the last: the size ratio, 16 / 64
        apply_knobs(model, lh_global_slope=g)
        expected[g] = evaluate_size(model, val, 4).compute()["top1"]
    assert choice["val_top1"] == {f"lh_global_slope={g:g}": v for g, v in expected.items()}
    best = max(expected.values())
    assert expected[choice["setting"]["lh_global_slope"]] == best
    assert list(expected.values()).index(best) == list(expected).index(choice["setting"]["lh_global_slope"])  # first best
    assert choice["rule"] == slope_rule(g0, choice["setting"]["lh_global_slope"], (0.0, 0.5, 4.0), 0.25)
    apply_knobs(model, **choice["setting"])
    direct = evaluate_size(model, test, 4).compute()
    assert res["tuned"]["64"] == direct
    assert res["tuned"]["16"] == res["sizes"]["16"] and res["knobs"]["16"]["val_top1"] == {}
    assert res["environment"]["torch"] == torch.__version__  # eval.json records what decides its digits


def test_a_study_file_that_is_not_yaml_is_one_message_naming_it(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("name: s\ndatasets: [synthetic\nseeds: a: b\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not valid YAML (")):
        StudyConfig.from_yaml(bad)


def test_study_config_errors(tmp_path):
    good = {"name": "s", "datasets": ["synthetic"], "encodings": ["lh-90"], "seeds": [0]}
    assert StudyConfig.from_dict(good).datasets == {"synthetic": {}}
    with pytest.raises(ValueError, match="unknown encoding 'lh-91'"):
        StudyConfig.from_dict({**good, "encodings": ["lh-91"]})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['seeds'\]"):
        StudyConfig.from_dict({k: v for k, v in good.items() if k != "seeds"})
    with pytest.raises(ValueError, match="unknown training setting"):
        StudyConfig.from_dict({**good, "train": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="size 30 is not a multiple of patch size 4"):
        StudyConfig.from_dict({**good, "eval": {"sizes": [30, 32]}})
    with pytest.raises(ValueError, match=r"sizes \[32, 128, 64\]: list each size once, smallest first"):
        StudyConfig.from_dict({**good, "eval": {"sizes": [32, 128, 64]}})
    with pytest.raises(ValueError, match=r"sizes \[64, 128\] leave out the training size 32"):
        StudyConfig.from_dict({**good, "eval": {"sizes": [64, 128]}})
    with pytest.raises(ValueError, match="unknown eval key"):
        StudyConfig.from_dict({**good, "eval": {"size": [32]}})
    # what each cell's eval command would refuse after its training is refused before any cell runs
    for plan, message in (({"adversarial": ["bogus"]}, "eval: argument --adversarial: 'bogus': unknown attack bogus; "
                                                       "allowed: fgsm, pgd"),
                          ({"eps": "1/0"}, "--eps '1/0': expected numbers"),
                          ({"pgd_steps": 0}, "eval: --pgd-steps must be >= 1, got 0"),
                          ({"batch_size": 0}, "eval: --batch-size must be >= 1, got 0"),
                          ({"tune_knobs": True, "val_length": 0}, "eval: --val-length must be >= 1, got 0"),
                          ({"lh_slope_scales": [-1]}, "eval: --lh-slope-scales -1: scales must be finite")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StudyConfig.from_dict({**good, "eval": plan})
    # settings of the wrong kind, refused rather than misread
    for bad, message in (({"datasets": "synthetic"}, "datasets must be a list of names or a mapping"),
                         ({"encodings": "lh-90"}, "encodings must be a list, got 'lh-90'"),
                         ({"seeds": 0}, "seeds must be a list, got 0"),
                         ({"seeds": ["01"]}, "seeds must be whole numbers >= 0, got ['01']"),
                         ({"eval": {"lh_slope_scales": 2}}, "lh_slope_scales must be a list, got 2"),
                         ({"train": {"seed": 3, "lr": 0.1}}, "train sets seed, which each cell sets itself")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StudyConfig.from_dict({**good, **bad})
    attack = {"adversarial": ["fgsm"]}  # eps is read only by an attack
    assert StudyConfig.from_dict({**good, "eval": {**attack, "eps": 0.004}}).eval["eps"] == "0.004"  # a YAML number
    # every digit of a YAML number is kept, as a list keeps it: 8/255 is not rounded to 7.99999/255
    eight = StudyConfig.from_dict({**good, "eval": {**attack, "eps": 8 / 255}})
    assert eight.eval["eps"] == "8/255" and eight.eval_settings("synthetic").eps == (8 / 255,)
    assert StudyConfig.from_dict({**good, "eval": {**attack, "eps": 1 / 300}}).eval_settings("synthetic").eps == (1 / 300,)
    listed = StudyConfig.from_dict({**good, "eval": {**attack, "eps": ["1/255", 2 / 255]}})  # a YAML list
    assert listed.eval_settings("synthetic").eps == (1 / 255, 2 / 255)
    with pytest.raises(ValueError, match=re.escape("eval: --eps 1/255 is read only by --adversarial")):
        StudyConfig.from_dict({**good, "eval": {"eps": "1/255"}})
    with pytest.raises(ValueError, match="reference 'lh90', the encoding the others are compared against, is not"):
        StudyConfig.from_dict({**good, "reference": "lh90"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StudyConfig.from_yaml(tmp_path / "missing.yaml")


def test_eval_settings_of_the_wrong_kind_are_refused_before_any_cell_trains():
    """Each cell's eval command runs after its training: a study ``eval:`` value that command would
    refuse, or read as another value, is refused by the study file, naming the setting."""
    for plan, message in (({"tune_knobs": True, "val_length": 16.0}, "s.yaml: eval: argument --val-length: invalid int "
                                                                      "value: '16.0'"),
                          ({"batch_size": "64"}, "s.yaml: eval: batch_size '64' is read back by the cells' eval "
                                                 "command as 64"),
                          ({"tune_knobs": "yes"}, "s.yaml: eval: tune_knobs 'yes' is read back by the cells' eval "
                                                  "command as True"),
                          ({"tune_knobs": 1}, "s.yaml: eval: tune_knobs 1 is read back by the cells' eval command "
                                              "as True")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StudyConfig.from_dict({**TINY, "eval": {**TINY["eval"], **plan}}, "s.yaml")


def test_malformed_study_files_are_one_message_naming_the_key():
    """A section or a dataset's settings that are not a mapping, sizes that are not whole numbers and a
    negative seed: each refused by the study file with the key at fault, not a TypeError from inside."""
    for bad, message in (({"eval": ["sizes"]}, "eval must be a mapping of settings, got ['sizes']"),
                         ({"train": ["epochs"]}, "train must be a mapping of settings, got ['epochs']"),
                         ({"variants": ["v"]}, "variants must be a mapping of settings, got ['v']"),
                         ({"cluster": "slurm"}, "cluster must be a mapping of settings, got 'slurm'"),
                         ({"datasets": {"synthetic-where": [16]}}, "datasets: synthetic-where must be a mapping of its "
                                                                   "settings (data_length, img_size, sizes...), got "
                                                                   "[16]"),
                         ({"datasets": {"synthetic-where": {"sizes": 32}}}, "synthetic-where sizes must be a list of "
                                                                             "whole numbers (px), got 32"),
                         ({"datasets": {"synthetic-where": {"sizes": [16, 32.0]}}}, "synthetic-where sizes must be a "
                                                                                     "list of whole numbers (px), got "
                                                                                     "[16, 32.0]"),
                         ({"eval": {**TINY["eval"], "sizes": [16, 32.0]}}, "eval sizes must be a list of whole "
                                                                           "numbers (px), got [16, 32.0]"),
                         ({"variants": {"v": ["lookhere"]}, "encodings": ["v"], "reference": "v"},
                          "variant 'v' must be a mapping of pos_encoding, lookhere_config, pos_options, got "
                          "['lookhere']"),
                         ({"seeds": [0, -1]}, "seeds must be whole numbers >= 0, got [0, -1]")):
        with pytest.raises(ValueError, match=re.escape(f"s.yaml: {message}")):
            StudyConfig.from_dict({**TINY, **bad}, "s.yaml")


def test_cli_names_the_key_of_a_malformed_study_file(tmp_path, capsys):
    from lookhere.cli import main

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({**TINY, "datasets": {"synthetic-where": {"sizes": 32}}}))
    assert main(["study", "--config", str(config), "--output", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lookhere study: error: {config}: synthetic-where sizes must be a list of whole numbers (px), got 32"


def test_eval_setting_given_under_both_its_names_is_refused():
    """``test_length`` is the old name of ``length``: given both, neither is dropped silently."""
    for ev in ({"test_length": 24, "length": 100}, {"length": 100, "test_length": 24}):
        with pytest.raises(ValueError, match=re.escape("s.yaml: eval sets both test_length and length (the same "
                                                       "setting); keep length")):
            StudyConfig.from_dict({**TINY, "eval": {**{k: v for k, v in TINY["eval"].items() if k != "test_length"},
                                                    **ev}}, "s.yaml")
    assert StudyConfig.from_dict(TINY).eval["length"] == 24  # the old name alone still reads


def test_a_study_evaluates_as_lookhere_eval_does():
    """One definition of the evaluation settings: a key a study leaves out is lookhere eval's default,
    and each cell's eval command, read back by the eval command's own parser, gives the study's settings."""
    from lookhere.evaluate import EvalSettings

    cfg = StudyConfig.from_dict({"name": "s", "datasets": {"synthetic": {}, "fashion-mnist": {"sizes": [28, 56]}},
                                 "encodings": ["lh-90"], "seeds": [3], "train": {"img_size": 28, "patch_size": 4},
                                 "eval": {"test_length": 24, "tune_knobs": True, "val_length": 8,
                                          "adversarial": "fgsm,pgd", "eps": 0.004}})
    default = EvalSettings(data="synthetic", sizes=[1])
    for dataset, sizes in (("synthetic", [28, 56, 112]), ("fashion-mnist", [28, 56])):
        settings = cfg.eval_settings(dataset)
        assert settings.sizes == sizes and settings.train_size == 28 and settings.length == 24
        assert settings.adversarial == ("fgsm", "pgd") and settings.eps == (0.004,)
        assert settings.by_object_size == (dataset == "synthetic")
        for name in ("adversarial_samples", "pgd_steps", "batch_size", "lh_slope_scales", "split"):
            assert getattr(settings, name) == getattr(default, name)
        argv = cfg.cells("root")[0 if dataset == "synthetic" else 1].commands()["eval"]
        assert argv[:2] == ["lookhere", "eval"]
        parsed, rest = EvalSettings.parse_argv(argv[2:], data=dataset)
        assert parsed == settings
        assert rest[:2] == ["--checkpoint", str(Path("root") / dataset / "lh-90" / "seed3" / "run")]
    # a setting the eval command would not read is refused, not dropped
    with pytest.raises(ValueError, match="--val-length 8 is read only by --tune-knobs"):
        StudyConfig.from_dict({**cfg.to_dict(), "eval": {"val_length": 8}})


def test_a_study_in_which_no_cell_finished_names_every_failure(tmp_path, monkeypatch, capsys):
    from lookhere import study
    from lookhere.cli import main

    def fail(cell, *args):
        raise RuntimeError(f"exit 1; see {cell.dir / 'log.txt'}")

    monkeypatch.setattr(study, "run_cell", fail)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "s", "datasets": ["synthetic"], "encodings": ["lh-90", "none"], "seeds": [0],
        "train": {"img_size": 16, "embed_dim": 48, "depth": 1, "data_length": 64}, "eval": {"sizes": [16]}}))
    assert main(["study", "--config", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    for key in ("synthetic/lh-90/seed0", "synthetic/none/seed0"):
        assert f"{key}: exit 1; see {tmp_path / 'out' / key / 'log.txt'}" in err
    assert "no finished cells" not in err


def test_shipped_studies_are_valid():
    root = Path(__file__).resolve().parents[1] / "studies"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert names == ["fashion-mnist.yaml", "paper-grid-multisize.yaml", "paper-grid.yaml", "synthetic.yaml"]
    for name in names:
        cfg = StudyConfig.from_yaml(root / name)
        assert len(cfg.seeds) >= 3 and cfg.reference in cfg.encodings
    assert set(StudyConfig.from_yaml(root / "synthetic.yaml").datasets) == {"synthetic", "synthetic-where"}
    # The several-size variant: the paper grid's scenes, model and test sizes, trained at three sizes.
    multi, single = (StudyConfig.from_yaml(root / f"{n}.yaml") for n in ("paper-grid-multisize", "paper-grid"))
    one = multi.train_config("synthetic-where", "lh-90", 0, "x")
    assert one.sizes == [56, 40, 72] and one.batch_sizes() == [32, 63, 19]
    assert {k: v for k, v in one.to_dict().items() if k != "img_size"} == \
        {k: v for k, v in single.train_config("synthetic-where", "lh-90", 0, "x").to_dict().items() if k != "img_size"}
    assert set(single.sizes("synthetic")) <= set(multi.sizes("synthetic"))
    # Its report is set against the paper-grid study's cells, where the docs keep both.
    from lookhere.study_report import base_study

    results = root.parent / "docs" / "results"
    assert base_study(results / "paper-grid-multisize", multi.compare_with) == (results / "paper-grid").resolve()


def test_stored_cells_still_match_their_study_files(tmp_path, monkeypatch):
    """The shipped studies' cells match their study files. A cell recorded with an eval command that
    spells out a default, in another order, asks for the same settings and is kept; another setting
    is refused."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the cells record the paths the docs' commands gave
    root = Path(".")
    for name in ("synthetic", "fashion-mnist", "paper-grid"):
        cells = StudyConfig.from_yaml(root / "studies" / f"{name}.yaml").cells(root / "docs" / "results" / name)
        assert sum((c.dir / "cell.json").is_file() for c in cells) > 0
        check_cells_match(cells)
    cfg = StudyConfig.from_yaml(root / "studies" / "synthetic.yaml")
    moved = cfg.cells(tmp_path)[0]
    moved.dir.mkdir(parents=True)
    train_part, eval_part = moved.command_line().split(" && ")
    assert " --batch-size " not in eval_part
    head, rest = eval_part.split(" lookhere eval ")
    line = f"{train_part} && {head} lookhere eval --batch-size 64 {rest}"  # the default, spelled out, first
    (moved.dir / "cell.json").write_text(json.dumps({"command": line, "identity": {}}))
    check_cells_match([moved])
    (moved.dir / "cell.json").write_text(json.dumps({"command": line.replace("--length 150", "--length 149"),
                                                     "identity": {}}))
    with pytest.raises(ValueError, match="made with other settings"):
        check_cells_match([moved])


TINY = {
    "name": "tiny",
    "datasets": {"synthetic-where": {}},
    "encodings": ["lh-90", "rope-2d-mixed"],
    "seeds": [0],
    "train": {"model": "micro", "embed_dim": 48, "depth": 1, "img_size": 16, "patch_size": 4, "data_length": 512,
              "epochs": 2, "batch_size": 16, "checkpoint_every": 2, "log_every": 4},
    "eval": {"sizes": [16, 32], "test_length": 24, "tune_knobs": True, "val_length": 16, "adversarial": ["fgsm", "pgd"],
             "eps": "1/255", "adversarial_samples": 8, "pgd_steps": 2},
}


def _study(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lookhere.cli", "study", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_a_setting_switched_off_reaches_the_cells_command():
    from lookhere.cli import _train_config, build_parser

    cfg = StudyConfig.from_dict({**TINY, "train": {**TINY["train"], "clip_grad": None, "init_values": None}})
    argv = cfg.cells("root")[0].commands()["train"]
    # clip_grad's default is on, so its off is spelled 0; no LayerScale is the default, so it is not spelled
    assert argv[argv.index("--clip-grad") + 1] == "0" and "--init-values" not in argv
    parsed = _train_config(build_parser().parse_args(argv[1:]))
    assert parsed.clip_grad == 0 and not parsed.init_values  # 0: no clipping; no LayerScale either way


def test_a_cells_train_command_reads_back_as_its_settings_for_a_fine_tune_and_a_registered_model():
    """``lookhere train`` fills what a command leaves out with the defaults of that kind of run (with
    --init-from, fine-tuning's learning rates and layer decay; with a registered --model, its own
    architecture): each cell's command, read back by the CLI's own parser, is the cell's settings."""
    from lookhere.cli import _train_config, build_parser
    from lookhere.train import FINETUNE_DEFAULTS
    from lookhere.vit import MODEL_NAMES

    registered = MODEL_NAMES[("base", "lh-180")]
    fine_tune = {"name": "ft", "datasets": {"synthetic": {"img_size": 32, "patch_size": 8, "sizes": [32, 64]}},
                 "encodings": ["lh-90", "rope-2d-axial"], "seeds": [0, 1],
                 # lr and min_lr as a from-scratch run's defaults, which are not fine-tuning's
                 "train": {"init_from": "/tmp/some_run", "lr": 1e-3, "min_lr": 1e-5, "layer_decay": 0.5, "epochs": 1}}
    from_registered = {"name": "reg", "datasets": {"synthetic": {"img_size": 224, "sizes": [224]}},
                       "encodings": ["lh-180"], "reference": "lh-180", "seeds": [0], "train": {"model": registered}}
    for d in (fine_tune, from_registered, TINY):
        for cell in StudyConfig.from_dict(d).cells("root"):
            argv = cell.commands()["train"]
            assert argv[:2] == ["lookhere", "train"]
            assert _train_config(build_parser().parse_args(argv[1:])) == cell.train_config(), (d["name"], argv)
    cell = StudyConfig.from_dict(fine_tune).cells("root")[0]
    assert cell.train_config().lr == 1e-3 != FINETUNE_DEFAULTS["lr"]
    for given in ("--model", "--weight-init"):  # the source's: unset, and not written
        assert given not in cell.commands()["train"]
    # a fine-tune without layer decay cannot be written as a `lookhere train` command: refused up front
    with pytest.raises(ValueError, match=re.escape("s.yaml: train: layer_decay null cannot be written in a cell's train command: "
                                                "--layer-decay has no value for unset, and left out it is 0.75")):
        StudyConfig.from_dict({**fine_tune, "train": {**fine_tune["train"], "layer_decay": None}}, "s.yaml")


def test_dry_run_lists_the_grid(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "seeds": [0, 1]}))
    out, err = _study(["--config", str(cfg), "--output", str(tmp_path / "s"), "--dry-run"]).communicate(timeout=300)
    assert "synthetic-where/lh-90/seed0" in out and "synthetic-where/rope-2d-mixed/seed1" in out, err
    assert "4 cells, 4 to run" in out and "CPU-hours" in out
    assert not (tmp_path / "s" / "synthetic-where").exists()  # nothing was run


def test_cells_made_by_other_settings_or_unreadable_are_named(tmp_path):
    cells = StudyConfig.from_dict(TINY).cells(tmp_path)
    check_cells_match(cells)  # nothing made yet
    for c in cells:
        c.dir.mkdir(parents=True)
        (c.dir / "cell.json").write_text(json.dumps({"command": c.command_line(), "identity": {}}))
    check_cells_match(cells)  # made by these very settings
    other = StudyConfig.from_dict({**TINY, "train": {**TINY["train"], "epochs": 3}}).cells(tmp_path)
    with pytest.raises(ValueError, match=r"2 cell\(s\) were made with other settings.*--output"):
        check_cells_match(other)
    (cells[1].dir / "cell.json").write_text('{"command": "OMP_NUM')  # cut short
    with pytest.raises(ValueError, match=r"(?s)1 cell\(s\).*rope-2d-mixed/seed0 \(cell.json unreadable\)"):
        check_cells_match(cells)
    # A cell made before identities were recorded: its two commands decide (the kernel pin came later).
    c = cells[1].commands()
    (cells[1].dir / "cell.json").write_text(json.dumps({"command": "OMP_NUM_THREADS=1 ...", "train_command": c["train"],
                                                        "eval_command": c["eval"]}))
    check_cells_match(cells)
    (cells[1].dir / "cell.json").write_text(json.dumps({"train_command": c["train"][:-1], "eval_command": c["eval"]}))
    with pytest.raises(ValueError, match=r"1 cell\(s\) were made with other settings"):
        check_cells_match(cells)


OLD_LH90 = {"global_slope": 1.0, "layer_slopes": [1.5, 0.5], "head_directions": "triangles-corners"}


def test_variants_and_the_kernel_pin_in_a_study_config():
    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90", "lh-90-all-masked"],
                                 "variants": {"lh-90-all-masked": {"pos_encoding": "lookhere", "lookhere_config": OLD_LH90}}})
    train = cfg.train_config("synthetic-where", "lh-90-all-masked", 0, "out")
    assert train.pos_encoding == "lookhere" and train.lookhere_config == OLD_LH90
    cell = cfg.cells("root")[1]
    assert cell.dir == Path("root/synthetic-where/lh-90-all-masked/seed0")
    assert cell.command_line().startswith(
        "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 lookhere train")
    if is_x86():  # what the cells run with is what the command line says
        assert cfg.cell_env() == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
                                  "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
    assert "--lookhere-config" in cell.commands()["train"]
    unpinned = StudyConfig.from_dict({**TINY, "cpu_capability": None})
    assert unpinned.cells("r")[0].command_line().startswith("OMP_NUM_THREADS=1 lookhere train")
    assert unpinned.cell_env() == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bad = [({"variants": {"lh-45": {"pos_encoding": "lookhere"}}}, "has the name of a registered encoding"),
           ({"variants": {"v": {"lookhere_config": OLD_LH90}}}, "variant 'v' needs pos_encoding"),
           ({"variants": {"v": {"pos_encoding": "lookhere", "lr": 1}}}, r"may set only pos_encoding"),
           ({"cpu_capability": "avx3"}, "cpu_capability 'avx3'; allowed: default, avx2, avx512 or null")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            StudyConfig.from_dict({**TINY, **change})
    # A variant the model refuses is named before any cell runs (resolving the identities builds it).
    contradicting = StudyConfig.from_dict({**TINY, "encodings": ["v"], "reference": "v", "variants": {
        "v": {"pos_encoding": "lh-90", "lookhere_config": OLD_LH90}}})
    with pytest.raises(RuntimeError, match="could not resolve the cells' settings: .*differs from the preset"):
        resolve_identities(contradicting, contradicting.cells("root"))


def test_identity_holds_the_resolved_preset_and_notices_an_initialisation_change(monkeypatch):
    from lookhere.position import Fourier
    from lookhere.study import identity_changes, resolved_identity

    cfg = StudyConfig.from_dict({**TINY, "encodings": ["lh-90", "lh-90-all-masked", "fourier"],
                                 "variants": {"lh-90-all-masked": {"pos_encoding": "lookhere", "lookhere_config": OLD_LH90}}})
    lh90, masked, fourier = (resolved_identity(c) for c in cfg.cells("root"))
    assert lh90["encoding"]["config"]["head_directions"] == "corners-triangles-none"
    assert lh90["encoding"]["config"]["global_slope"] == 2.0
    assert identity_changes(masked, lh90) == [
        'encoding.config.global_slope: 1.0 -> 2.0',
        'encoding.config.head_directions: "triangles-corners" -> "corners-triangles-none"',
        'encoding.name: "lookhere" -> "lh-90"', f'model.lookhere_config: {json.dumps(OLD_LH90)} -> null',
        'model.pos_encoding: "lookhere" -> "lh-90"']
    assert resolved_identity(cfg.cells("root")[2]) == fourier  # a function of the cell alone

    original = Fourier.init_weights

    def other_init(self):  # an initialisation change: another scale
        original(self)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(1.5)

    monkeypatch.setattr(Fourier, "init_weights", other_init)
    changed = resolved_identity(cfg.cells("root")[2])
    assert identity_changes(fourier, changed) == ["the initial weights differ (an initialisation change)"]


def test_identities_drawn_by_kernels_that_round_otherwise_are_the_same_cell():
    """A CPU of another make rounds a few initial draws otherwise (the learned table's erfinv): the
    digest changes, the moments agree, so a study does not make the cell again; an initialisation
    change still moves the moments."""
    from lookhere.environment import is_x86
    from lookhere.study import identity_changes, resolve_identities

    if not is_x86():
        pytest.skip("the kernel pins are x86-64's")
    ids = {}
    for capability in ("default", "avx2"):
        cfg = StudyConfig.from_dict({**TINY, "encodings": ["learned-1d"], "reference": "learned-1d", "cpu_capability": capability})
        cells = cfg.cells("root")
        ids[capability] = resolve_identities(cfg, cells)[cells[0].key]
    scalar, vector = ids["default"], ids["avx2"]
    if scalar["initial_weights"] == vector["initial_weights"]:
        pytest.skip("this CPU's scalar and AVX2 kernels draw the same bits")
    assert identity_changes(scalar, vector) == []
    assert scalar["initial_moments"] != vector["initial_moments"]  # not equal: close
    scaled = {**vector, "initial_weights": "0" * 16,
              "initial_moments": {k: [m[0] * 1.01, m[1] * 1.01 ** 2] if "pos" in k else m
                                  for k, m in vector["initial_moments"].items()}}
    assert identity_changes(scalar, scaled, other_cpu=True) == ["the initial weights differ (an initialisation change)"]


def test_a_record_from_before_moments_is_kept_only_when_made_on_another_cpu(tmp_path):
    import lookhere.study as study
    from lookhere.environment import cpu_model

    cfg = StudyConfig.from_dict(TINY)
    cell = cfg.cells(tmp_path)[0]
    new = {"initial_weights": "bbbb", "initial_moments": {"w": [1.0, 2.0]}, "data": "cccc", "data_moments": {"0": [3.0, 4.0]}}
    old = {"initial_weights": "aaaa", "data": "cccc"}
    cell.dir.mkdir(parents=True)
    for cpu, redo in ((cpu_model(), True), ("Another CPU", False)):
        (cell.dir / "cell.json").write_text(json.dumps({"command": cell.command_line(), "identity": old,
                                                        "environment": {"train": [{"cpu": cpu}]}}))
        assert study.cells_to_redo([cell], {cell.key: new}) == (
            {cell.key: ["the initial weights differ (an initialisation change)"]} if redo else {}), cpu
    # a part-made cell: its run's environment records say where it started
    (cell.dir / "cell.json").write_text(json.dumps({"command": cell.command_line(), "identity": old}))
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "environment", "cpu": "Another CPU"}) + "\n")
    assert study.cells_to_redo([cell], {cell.key: new}) == {}
    # with moments on both sides, another CPU is no excuse
    moved = {**old, "initial_moments": {"w": [1.5, 2.0]}, "data_moments": {"0": [3.0, 4.0]}}
    (cell.dir / "cell.json").write_text(json.dumps({"command": cell.command_line(), "identity": moved}))
    assert study.cells_to_redo([cell], {cell.key: new}) == {cell.key: ["the initial weights differ (an initialisation change)"]}


def test_made_again_names_only_the_cells_made_again_in_this_run(tmp_path, monkeypatch):
    """Cells cleared to be made again but left for a later run (``--until``) or failed are not said
    to be made again; the run that makes them says it."""
    import lookhere.study as study

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1]})
    cells = cfg.cells(tmp_path)
    lh90_0, rope_0, lh90_1, rope_1 = (f"synthetic-where/{e}/seed{s}" for s in (0, 1) for e in ("lh-90", "rope-2d-mixed"))
    redo = {c.key: ["a new setting"] for c in cells}
    monkeypatch.setattr(study, "start_study", lambda cfg, out: (cells, {c.key: {} for c in cells}, redo))
    monkeypatch.setattr(study, "expected_seconds", lambda cell, cells: 3000.0 if cell.key == rope_1 else 60.0)

    def run_cell(cell, *args, **kwargs):
        if cell.key == lh90_1:
            raise RuntimeError("training failed")
        (cell.dir / "eval").mkdir(parents=True)
        (cell.dir / "eval" / "eval.json").write_text("{}")
        return {"train_s": 1.0, "eval_s": 1.0}

    monkeypatch.setattr(study, "run_cell", run_cell)
    monkeypatch.setattr(study, "write_report", lambda out: {"report": "r", "results": "j"})
    result = study.run_study(cfg, tmp_path, until=time.time() + 600)
    assert set(result["failures"]) == {lh90_1} and set(result["not_started"]) == {rope_1}
    assert result["made_again"] == {lh90_0: ["a new setting"], rope_0: ["a new setting"]}


def test_until_takes_a_time_of_day_or_a_moment_and_refuses_a_past_one():
    import argparse
    from datetime import datetime

    from lookhere.flags import until

    now = datetime(2026, 12, 4, 10, 30)
    assert until("12:05", now) == datetime(2026, 12, 4, 12, 5)
    assert until("07:00", now) == datetime(2026, 12, 5, 7, 0)  # an hour past today is tomorrow's
    assert until("2026-12-06T18:30", now) == datetime(2026, 12, 6, 18, 30)
    for bad, message in [("2026-12-04T09:00", "is past"), ("25:00", "not a time of day"),
                         ("noon", "expected HH:MM or a date and time")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            until(bad, now)


def test_until_starts_only_the_cells_that_would_end_before_it(tmp_path, monkeypatch, capsys):
    """Expected from the study's finished cells (those of the same dataset and encoding, else the
    longest); a study with none finished starts every cell."""
    import lookhere.study as study
    from lookhere.cli import main

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1]})
    monkeypatch.setattr(study, "resolve_identities", lambda cfg, cells: {c.key: {} for c in cells})
    started = []
    monkeypatch.setattr(study, "run_cell", lambda cell, *a, **kw: started.append(cell.key) or {"train_s": 60.0, "eval_s": 30.0})
    monkeypatch.setattr(study, "write_report", lambda out: {"report": "r", "results": "j"})
    cells = {c.key: c for c in cfg.cells(tmp_path)}
    lh90_0, rope_0, lh90_1, rope_1 = (f"synthetic-where/{e}/seed{s}" for s in (0, 1) for e in ("lh-90", "rope-2d-mixed"))

    result = study.run_study(cfg, tmp_path, until=time.time() + 60)  # nothing finished: no estimate
    assert sorted(started) == sorted(cells) and result["not_started"] == {}

    def finish(key, seconds):
        c = cells[key]
        (c.dir / "eval").mkdir(parents=True, exist_ok=True)
        (c.dir / "eval" / "eval.json").write_text("{}")
        (c.dir / "cell.json").write_text(json.dumps({"command": c.command_line(), "identity": {}}))
        (c.dir / "timing.json").write_text(json.dumps({"train_s": seconds - 100.0, "eval_s": 100.0}))

    finish(lh90_0, 600.0)
    finish(rope_0, 3000.0)
    started.clear()
    result = study.run_study(cfg, tmp_path, until=time.time() + 1200)
    assert started == [lh90_1] and result["ran"] == 1
    assert result["not_started"] == {rope_1: 3000.0}
    started.clear()
    capsys.readouterr()
    result = study.run_study(cfg, tmp_path, until=time.time() + 4000, progress=False)
    assert started == [lh90_1, rope_1] and result["not_started"] == {}
    # without a bar, a line a cell
    assert capsys.readouterr().out.splitlines() == [f"tiny: 3 of 4 cells; {lh90_1} made in 1.5 minutes",
                                                    f"tiny: 4 of 4 cells; {rope_1} made in 1.5 minutes"]
    finish(lh90_1, 900.0)  # the mean of the same encoding's cells: 750 s
    assert study.expected_seconds(cells[lh90_0], list(cells.values())) == 750.0
    # A cell cleared to be made again is expected to take what it took last time, not the longest
    # cell's time (which would leave it for a later seed's cell in a short sitting)
    finish(rope_1, 2000.0)
    study._clear(cells[rope_0], ["a new setting"])
    assert cells[rope_0].status() == "todo"
    assert study.expected_seconds(cells[rope_0], list(cells.values())) == 3000.0
    study._clear(cells[rope_1], ["a new setting"])
    started.clear()
    result = study.run_study(cfg, tmp_path, until=time.time() + 2500)
    assert started == [rope_1] and result["not_started"] == {rope_0: 3000.0}
    finish(rope_0, 3000.0)
    (cells[rope_1].dir / "timing.json").unlink()  # rope_1 as never made: expected from rope_0

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seeds": [0, 1]}))
    base = ["study", "--config", str(config), "--output", str(tmp_path), "--no-progress"]
    soon = (datetime.now() + timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M")
    capsys.readouterr()
    assert main([*base, "--until", soon]) == 0
    out = capsys.readouterr().out
    assert f"1 cell(s) not started: each would end after --until {soon.replace('T', ' ')} (expected up to 50 " \
           f"minutes); run the same command again to go on" in out
    for extra, message in [(["--dry-run"], "--dry-run runs none"),
                           (["--executor", "submitit-local"], "with --executor submitit-local every cell is a job")]:
        assert main([*base, "--until", soon, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    # --report runs nothing: a flag for a run is refused, not ignored
    assert main(["study", "--report", str(tmp_path), "--until", soon, "--jobs", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("runs nothing; leave out --until, --jobs")


def test_until_expects_only_the_evaluation_of_a_cell_already_trained(tmp_path, monkeypatch):
    """A cell stopped during its evaluation has only that left to do: it is expected to take its own
    evaluation's time, else the mean of the finished cells' of its dataset and encoding (else the longest
    one's), as the dry run counts it, not a whole cell's."""
    import lookhere.study as study

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1]})
    cells = cfg.cells(tmp_path)
    lh90_0, rope_0, lh90_1, rope_1 = cells
    for c, timing in ((lh90_0, {"train_s": 2500.0, "eval_s": 500.0}), (rope_0, {"train_s": 2700.0, "eval_s": 300.0}),
                      (rope_1, {"train_s": 2700.0})):
        c.dir.mkdir(parents=True)
        (c.dir / "cell.json").write_text(json.dumps({"command": c.command_line(), "identity": {}}))
        (c.dir / "timing.json").write_text(json.dumps(timing))
        (c.dir / "train.json").write_text(json.dumps({"epochs": []}))
        if c is not rope_1:
            (c.dir / "eval").mkdir()
            (c.dir / "eval" / "eval.json").write_text("{}")
    assert rope_1.status() == "trained"
    assert study.expected_seconds(rope_1, cells) == 300.0  # rope-2d-mixed's evaluation, not its 3000 s cell
    assert study.expected_seconds(lh90_1, cells) == 3000.0  # a cell still to train: a whole lh-90 cell
    (rope_1.dir / "timing.json").write_text(json.dumps({"train_s": 2700.0, "eval_s": 200.0}))  # its own, from before
    assert study.expected_seconds(rope_1, cells) == 200.0
    monkeypatch.setattr(study, "resolve_identities", lambda cfg, cells: {c.key: {} for c in cells})
    monkeypatch.setattr(study, "write_report", lambda out: {"report": "r", "results": "j"})
    started = []
    monkeypatch.setattr(study, "run_cell", lambda cell, *a, **kw: started.append(cell.key) or {"eval_s": 200.0})
    result = study.run_study(cfg, tmp_path, until=time.time() + 600, progress=False)
    assert started == [rope_1.key] and result["not_started"] == {lh90_1.key: 3000.0}


def test_until_that_starts_no_cell_of_a_study_with_none_done_returns_the_cells_not_started(tmp_path, monkeypatch):
    """Every cell cleared to be made again and none of them fits before --until: no report (there are no
    finished cells to report), and the cells not started are returned for the run to say so."""
    import lookhere.study as study

    cfg = StudyConfig.from_dict(TINY)
    cells = cfg.cells(tmp_path)
    for c in cells:  # made with another identity, in 3000 s
        c.dir.mkdir(parents=True)
        (c.dir / "cell.json").write_text(json.dumps({"command": c.command_line(), "identity": {"data": "old"}}))
        (c.dir / "timing.json").write_text(json.dumps({"train_s": 2900.0, "eval_s": 100.0}))
    monkeypatch.setattr(study, "resolve_identities", lambda cfg, cells: {c.key: {"data": "new"} for c in cells})

    def run_cell(*args, **kwargs):
        raise AssertionError("no cell fits before --until")

    monkeypatch.setattr(study, "run_cell", run_cell)
    result = study.run_study(cfg, tmp_path, until=time.time() + 600, progress=False)
    assert result["not_started"] == {c.key: 3000.0 for c in cells} and result["ran"] == 0
    assert "report" not in result and not (tmp_path / "report.md").exists()


def test_a_dry_run_measures_each_dataset_and_encoding_once(tmp_path, monkeypatch):
    import lookhere.study as study

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1, 2]})
    monkeypatch.setattr(study, "resolve_identities", lambda cfg, cells: {c.key: {} for c in cells})
    measured = []

    def measure(cell):
        measured.append(cell.key)
        return {"step_s": 0.01, "per_image_s": {16: 1e-4, 32: 4e-4}, "train_len": 512, "cfg": cell.train_config(),
                "settings": 3}

    monkeypatch.setattr(study, "_measure", measure)
    est = study.estimate(cfg, tmp_path)
    assert measured == ["synthetic-where/lh-90/seed0", "synthetic-where/rope-2d-mixed/seed0"]
    assert len(est["rows"]) == 6 and len({r[2] for r in est["rows"]}) == 1 and est["rows"][0][2] > 0


def test_two_cell_study_and_a_killed_study_resumes_to_the_same_results(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = _study(["--config", str(cfg), "--output", str(straight), "--no-progress"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results = json.loads((straight / "results.json").read_text())
    assert [(c["encoding"], c["seed"]) for c in results["cells"]] == [("lh-90", 0), ("rope-2d-mixed", 0)]
    cell = results["cells"][0]
    assert cell["command"].startswith("OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                                      "MKL_CBWR=AVX2 lookhere train --data synthetic-where")
    assert "--pos-encoding lh-90" in cell["command"] and "--tune-knobs" in cell["command"]
    assert set(cell["sizes"]) == {"16", "32"} and set(cell["adversarial"]) == {"n", "fgsm@1/255", "pgd@1/255"}
    assert set(results["summary"]["synthetic-where"]["paired"]) == {"rope-2d-mixed"}
    report = (straight / "report.md").read_text()
    assert "## synthetic-where (trained at 16 px)" in report and "Paired over seeds: lh-90 minus" in report
    assert (straight / "top1_vs_size.png").stat().st_size > 10000

    # A recorded cell made again elsewhere, from its cell.json alone: the same eval.json, bit for bit.
    lh_straight = straight / "synthetic-where" / "lh-90" / "seed0"
    again_dir = tmp_path / "again"
    p = subprocess.run([sys.executable, "-m", "lookhere.cli", "reproduce", str(lh_straight), "--output", str(again_dir)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "identical to the recorded one" in p.stdout and "environment: as recorded" in p.stdout, p.stdout
    assert "--output " + str(again_dir / "eval") in (again_dir / "log.txt").read_text()
    assert json.loads((again_dir / "reproduce.json").read_text())["identical"] is True

    # The same study, killed (SIGKILL to its whole process group) while its first cell trains.
    p = _study(["--config", str(cfg), "--output", str(killed), "--no-progress"], start_new_session=True)
    state = killed / "synthetic-where" / "lh-90" / "seed0" / "run" / "last" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert state.exists() and not (killed / "synthetic-where" / "lh-90" / "seed0" / "train.json").exists()
    rerun = _study(["--config", str(cfg), "--output", str(killed), "--no-progress"])
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    log = (killed / "synthetic-where" / "lh-90" / "seed0" / "log.txt").read_text()
    assert "--resume" in log  # it picked up the checkpoint rather than starting over
    # Its training time is the run's own count over both stretches, not the resumed stretch's alone.
    lh_killed = killed / "synthetic-where" / "lh-90" / "seed0"
    assert (json.loads((lh_killed / "timing.json").read_text())["train_s"]
            == json.loads((lh_killed / "train.json").read_text())["epochs"][-1]["train_s"])
    again = json.loads((killed / "results.json").read_text())
    for c in again["cells"]:  # the commands name their own directories; everything else is equal
        c["command"] = c["command"].replace(str(killed), str(straight))
    assert again == results

    # Finished cells are not run again.
    t = time.time()
    out, err = _study(["--config", str(cfg), "--output", str(killed), "--no-progress"]).communicate(timeout=300)
    assert "0 run now" in out and time.time() - t < 60

    # A cell made when its preset resolved otherwise (here: half the global slope) is made again, alone.
    lh_cell, rope_cell = (killed / "synthetic-where" / pe / "seed0" for pe in ("lh-90", "rope-2d-mixed"))
    made = json.loads((lh_cell / "cell.json").read_text())
    assert made["identity"]["encoding"]["config"]["global_slope"] == 2.0
    assert made["environment"]["eval"]["settings"]["ATEN_CPU_CAPABILITY"] == "avx2" or not is_x86()
    made["identity"]["encoding"]["config"]["global_slope"] = 1.0
    (lh_cell / "cell.json").write_text(json.dumps(made))
    rope_eval = (rope_cell / "eval" / "eval.json").stat().st_mtime_ns
    out, err = _study(["--config", str(cfg), "--output", str(killed), "--no-progress"]).communicate(timeout=600)
    assert "cell synthetic-where/lh-90/seed0 was made again: encoding.config.global_slope: 1.0 -> 2.0" in out, err
    assert (rope_cell / "eval" / "eval.json").stat().st_mtime_ns == rope_eval  # the other cell was kept
    remade = json.loads((lh_cell / "cell.json").read_text())
    assert remade["made_again"] == ["encoding.config.global_slope: 1.0 -> 2.0"]
    assert remade["identity"] == {**made["identity"], "encoding": {**made["identity"]["encoding"], "config": {
        **made["identity"]["encoding"]["config"], "global_slope": 2.0}}}
    assert "lh-90/seed0: encoding.config.global_slope: 1.0 -> 2.0" in (killed / "report.md").read_text()
    again = json.loads((killed / "results.json").read_text())  # made again from scratch: the same numbers
    for c in again["cells"]:
        c["command"] = c["command"].replace(str(killed), str(straight))
        c["made_again"] = None
    assert again["cells"] == results["cells"]

    # The same directory under other settings is refused, not silently reused.
    before = (killed / "results.json").read_text()
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 3}}))
    p = _study(["--config", str(changed), "--output", str(killed), "--no-progress"])
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "2 cell(s) were made with other settings" in err, (out, err)
    p = _study(["--config", str(changed), "--output", str(killed), "--dry-run"])
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "2 cell(s) were made with other settings" in err, (out, err)
    assert (killed / "results.json").read_text() == before  # nothing was touched
    assert yaml.safe_load((killed / "study.yaml").read_text())["train"]["epochs"] == 2


def _summary_row(top1_by_size: dict[str, float]) -> dict:
    cell = {s: {"top1": {"mean": v, "ci95": [v - 0.05, v + 0.05]}} for s, v in top1_by_size.items()}
    return {"tuned": cell, "default": cell}


def test_headline_keeps_each_familys_best_extrapolator_and_its_legends_clear_the_lines(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection, PolyCollection

    from lookhere.study_report import headline, plot_headline

    ds = {"sizes": ["24", "48", "96"], "train_size": 24, "encodings": {
        "lh-90": _summary_row({"24": 0.9, "48": 0.8, "96": 0.7}),
        # rope-2d-axial wins at the training size, rope-2d-mixed above it: the headline is about size.
        "rope-2d-axial": _summary_row({"24": 0.95, "48": 0.5, "96": 0.3}),
        "rope-2d-mixed": _summary_row({"24": 0.85, "48": 0.6, "96": 0.4}),
        "fire": _summary_row({"24": 0.8, "48": 0.7, "96": 0.6}),
        "none": _summary_row({"24": 0.5, "48": 0.5, "96": 0.5}),
    }}
    assert headline(ds, "tuned") == [("lh-90", "lh-90"), ("RoPE: rope-2d-mixed", "rope-2d-mixed"),
                                     ("fire", "fire"), ("none", "none")]

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to measure it
    # lh-90's seeds, one that learned and two that did not: each a dot beside its line
    per_seed = [{"24": 0.99, "48": 0.98, "96": 0.97}, {"24": 0.3, "48": 0.3, "96": 0.3}, {"24": 0.25, "48": 0.2, "96": 0.2}]
    records = [{"dataset": "synthetic", "encoding": "lh-90", "seed": i,
                "sizes": {s: {"tuned": {"top1": v}, "default": {"top1": v}} for s, v in top1.items()}}
               for i, top1 in enumerate(per_seed)] + [{"dataset": "other", "encoding": "lh-90", "seed": 0, "sizes": {}}]
    path = plot_headline({"synthetic": ds}, tmp_path / "headline.png", records)
    assert Path(path).stat().st_size > 0
    fig = kept[0]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        # Intervals as bars, one set per line (bands of seven lines cover each other): lh-90's span its ci95.
        assert len(ax.containers) == 4 and not any(isinstance(c, PolyCollection) for c in ax.collections)
        spans = [sorted(seg[:, 1]) for seg in ax.containers[0].lines[2][0].get_segments()]
        np.testing.assert_allclose(spans, [[85, 95], [75, 85], [65, 75]], atol=1e-9)
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(scatters) == 1  # lh-90's alone: the other lines have no records
        dots = scatters[0].get_offsets()
        x_line = ax.containers[0].lines[0].get_xdata()
        np.testing.assert_allclose(sorted(map(tuple, dots)),
                                   sorted((x_line[i] * 2 ** 0.012, 100 * t[s]) for t in per_seed
                                          for i, s in enumerate(ds["sizes"])))
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()][0] == "lh-90"
        # No legend sits over any panel's plotting area.
        for other in fig.axes:
            assert not legend.get_window_extent(renderer).overlaps(other.get_window_extent(renderer))
    plt.close(fig)


def _finished_cell(root: Path, encoding: str, seed: int, val_accs: list) -> None:
    """A finished cell as a study leaves it; ``val_accs`` are (epoch, top-1) as metrics.jsonl logged them."""
    d = root / "synthetic-where" / encoding / f"seed{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"command": f"lookhere train --pos-encoding {encoding} --seed {seed}"}))
    m = {"top1": 0.9, "nll": 0.3, "ece": 0.02}
    (d / "eval" / "eval.json").write_text(json.dumps({"train_size": 16, "sizes": {"16": m, "32": m}}))
    (d / "train.json").write_text(json.dumps({"epochs": [{"kind": "epoch", "epoch": e, "val_acc": a} for e, a in val_accs]}))


def test_the_reports_cpu_hours_count_the_finished_cells_of_the_study(tmp_path):
    from lookhere.study_report import write_report

    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "t", "datasets": {"synthetic-where": {}}, "encodings": ["lh-90"], "seeds": [0, 1], "reference": "lh-90"}))
    _finished_cell(tmp_path, "lh-90", 0, [(0, 0.9)])
    (tmp_path / "synthetic-where" / "lh-90" / "seed0" / "timing.json").write_text(json.dumps({"train_s": 5400, "eval_s": 1800}))
    for unfinished in ("lh-90/seed1", "fire/seed0"):  # trained, not yet evaluated; a cell no longer in the study
        d = tmp_path / "synthetic-where" / unfinished
        d.mkdir(parents=True)
        (d / "timing.json").write_text(json.dumps({"train_s": 36000}))
    report = Path(write_report(tmp_path)["report"]).read_text()
    assert "Cells finished: 1 of 2 (2.0 CPU-hours of one-thread cells)." in report


def test_learning_speed_per_seed_in_the_report_and_its_figure(tmp_path):
    from lookhere.study_report import first_epoch_at, write_report

    assert first_epoch_at([0.25, 0.89, 0.9, 0.95], 0.9) == 3 and first_epoch_at([0.25, 0.5], 0.9) is None
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "t", "datasets": {"synthetic-where": {}}, "encodings": ["lh-90", "none"], "seeds": [0, 1],
        "reference": "lh-90"}))
    # Seed 1 was killed after logging its second epoch and before the checkpoint: the resumed run
    # logged that epoch again, with the same number. It is one epoch, not two.
    _finished_cell(tmp_path, "lh-90", 0, [(0, 0.25), (1, 0.91), (2, 0.97)])
    _finished_cell(tmp_path, "lh-90", 1, [(0, 0.26), (1, 0.55), (1, 0.55), (2, 0.93)])
    _finished_cell(tmp_path, "none", 0, [(0, 0.25), (1, 0.3), (2, 0.4)])
    _finished_cell(tmp_path, "none", 1, [(0, 0.24), (1, 0.28), (2, 0.35)])
    files = write_report(tmp_path)
    e = json.loads(Path(files["results"]).read_text())["summary"]["synthetic-where"]["encodings"]
    assert [s["mean"] for s in e["lh-90"]["val_curve"]] == pytest.approx([0.255, 0.73, 0.95])
    assert e["lh-90"]["first_epoch_learned"] == [2, 3] and e["none"]["first_epoch_learned"] == [None, None]
    report = Path(files["report"]).read_text()
    assert "| encoding | 1 | 2 | 3 | first epoch at 90%, per seed |" in report
    assert "| lh-90 | 26 | 73 | 95 | 2, 3 |" in report and "| none | 24 | 29 | 38 | never, never |" in report
    assert "![validation top-1 against epoch](learning.png)" in report
    assert Path(files["learning"]).stat().st_size > 10000

    # Where no seed passes the bar, the column would only say "never": it is left out.
    for enc in ("lh-90", "none"):
        for seed in (0, 1):
            curve = tmp_path / "synthetic-where" / enc / f"seed{seed}" / "train.json"
            curve.write_text(json.dumps({"epochs": [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.6}]}))
    report = Path(write_report(tmp_path)["report"]).read_text()
    assert "| encoding | 1 | 2 |\n" in report and "| lh-90 | 50 | 60 |\n" in report and "first epoch at" not in report


def _cell_with_top1(root: Path, encoding: str, seed: int, train_size: int, default: dict, tuned: dict) -> None:
    """A finished cell of the what task whose top-1 at each size is given, at the defaults and tuned."""
    d = root / "synthetic" / encoding / f"seed{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"command": f"lookhere train --pos-encoding {encoding} --seed {seed}"}))
    m = lambda v: {"top1": v, "nll": 0.5, "ece": 0.05}
    (d / "eval" / "eval.json").write_text(json.dumps({"train_size": train_size, "sizes": {s: m(v) for s, v in default.items()},
                                                      "tuned": {s: m(v) for s, v in tuned.items()}}))
    (d / "train.json").write_text(json.dumps({"epochs": [{"kind": "epoch", "epoch": 0, "val_acc": 0.5}]}))


def test_a_study_that_varies_another_is_set_against_it_seed_by_seed(tmp_path, monkeypatch, capsys):
    """``compare_with``: the report sets each encoding's top-1 against the base study's over the seeds both
    finished, at the sizes both tested, with the paired interval, and says who is best at the largest
    size in each (the question a variant such as training at several sizes asks)."""
    from scipy import stats

    from lookhere.study import StudyConfig, prepare
    from lookhere.study_report import write_report

    study = lambda name, **kw: {"name": name, "datasets": {"synthetic": {}}, "encodings": ["lh-90", "rope-2d-axial", "fire"],
                                "seeds": [0, 1, 2], "reference": "lh-90", "eval": {"tune_knobs": True}, **kw}
    base, multi = tmp_path / "results" / "base", tmp_path / "results" / "multi"
    base.mkdir(parents=True)
    multi.mkdir()
    (base / "study.yaml").write_text(yaml.safe_dump(study("one-size")))
    (multi / "study.yaml").write_text(yaml.safe_dump(study("several-sizes", compare_with="../base")))
    # Base: lh-90 best at 64 px; the variant: rope-2d-axial rises past it. lh-90's seed 2 is not done
    # here, rope-2d-axial's seed 2 not there: each pairs over seeds 0 and 1 only. FIRE has seed 0 alone in
    # both, so the ranking is over seed 0: there FIRE is first by its one seed but second to rope-2d-axial
    # by their own means (71.5 against 72 at 64 px).
    there = {("lh-90", 0): (0.80, 0.60), ("lh-90", 1): (0.82, 0.62), ("lh-90", 2): (0.84, 0.64),
             ("rope-2d-axial", 0): (0.70, 0.30), ("rope-2d-axial", 1): (0.72, 0.34), ("fire", 0): (0.6, 0.5)}
    here = {("lh-90", 0): (0.81, 0.61), ("lh-90", 1): (0.80, 0.66), ("fire", 0): (0.6, 0.715),
            ("rope-2d-axial", 0): (0.75, 0.70), ("rope-2d-axial", 1): (0.76, 0.74), ("rope-2d-axial", 2): (0.7, 0.7)}
    for root, cells, sizes in ((base, there, ("16", "32", "64")), (multi, here, ("12", "16", "32", "64"))):
        for (enc, seed), (at16, at64) in cells.items():
            default = {s: {"16": at16, "64": at64}.get(s, 0.5) for s in sizes}
            tuned = {**default, "64": at64 + 0.1}  # a knob that adds ten points at 64 px
            _cell_with_top1(root, enc, seed, 16, default, tuned)

    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    files = write_report(multi)
    monkeypatch.setattr(plt, "close", close)
    cmp = json.loads(Path(files["results"]).read_text())["against"]
    assert cmp["study"] == "one-size" and cmp["compare_with"] == "../base"
    ds = cmp["datasets"]["synthetic"]
    assert ds["sizes"] == ["16", "32", "64"] and ds["train_size"] == {"here": 16, "there": 16}
    assert ds["encodings"]["lh-90"]["seeds"] == [0, 1] and ds["encodings"]["rope-2d-axial"]["seeds"] == [0, 1]
    assert ds["encodings"]["fire"]["seeds"] == [0] and ds["rank"]["seeds"] == [0]
    assert ds["rank"]["tuned"] == {"here": {"fire": 1, "rope-2d-axial": 2, "lh-90": 3},
                                   "there": {"lh-90": 1, "fire": 2, "rope-2d-axial": 3}}
    for enc in ("lh-90", "rope-2d-axial"):
        for variant, lift in (("default", 0.0), ("tuned", 0.1)):
            d = np.array([here[enc, s][1] - there[enc, s][1] for s in (0, 1)], dtype=np.float64)
            half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
            c = ds["encodings"][enc][variant]["64"]
            assert c["change"]["mean"] == pytest.approx(d.mean(), abs=1e-12)
            assert c["change"]["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-12)
            assert c["here"]["mean"] == pytest.approx(np.mean([here[enc, s][1] for s in (0, 1)]) + lift, abs=1e-12)
            assert c["there"]["mean"] == pytest.approx(np.mean([there[enc, s][1] for s in (0, 1)]) + lift, abs=1e-12)

    report = Path(files["report"]).read_text()
    assert "## Against one-size, the study this one varies (`compare_with: ../base`)" in report
    assert "### synthetic: tuned (there trained at 16 px)" in report
    assert ("| encoding | seeds | 16 px here | there | change | 64 px here | there | change | rank at 64 px (seed 0) |"
            in report)
    # rope-2d-axial, tuned, over seeds 0 and 1 (t(0.975, 1 dof) = 12.706): at 16 px 75 and 76 here, 70 and 72
    # there, 5 and 4 points up; at 64 px 80 and 84 here, 40 and 44 there, 40 up on both (no spread); 1st here, 2nd there
    assert "| rope-2d-axial | 2 | 75.5 ± 6.4 | 71.0 ± 12.7 | +4.5 ± 6.4 (p=0.07, 2/2) |" in report
    assert "| 82.0 ± 25.4 | 42.0 ± 25.4 | +40.0 ± 0.0 (p=-, 2/2) | 2 / 3 |" in report
    assert "| fire | 1 | 60.0 | 60.0 | +0.0 (p=-, 0/1) | 81.5 | 60.0 | +21.5 (p=-, 1/1) | 1 / 2 |" in report
    assert "Best at 64 px (tuned, seed 0): fire here, lh-90 there." in report
    assert "Best at 64 px (defaults, no knob, seed 0): fire here, lh-90 there." in report
    assert "![change in top-1 against test size](against.png)" in report
    assert Path(files["against"]).stat().st_size > 10000
    against = figures[-1]  # its last figure: the change against test size, tuned and at the defaults
    assert [ax.get_title() for ax in against.axes] == ["synthetic: knob tuned on validation", "synthetic: defaults"]
    for ax in against.axes:
        lines = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
        np.testing.assert_allclose(lines["rope-2d-axial"], [4.5, 0.0, 40.0], atol=1e-9)
        np.testing.assert_allclose(lines["lh-90"], [-0.5, 0.0, 2.5], atol=1e-9)
    for f in figures:
        close(f)

    from lookhere.cli import main

    assert main(["study", "--report", str(multi)]) == 0  # says every file it wrote, the comparison's figure too
    assert capsys.readouterr().out.strip().endswith(f"learning.png and {multi / 'against.png'}")

    # A base study that tuned no knob has no tuned numbers: only the defaults are set against it.
    (base / "study.yaml").write_text(yaml.safe_dump(study("one-size", eval={"tune_knobs": False})))
    files = write_report(multi)
    section = Path(files["report"]).read_text().split("## Against one-size")[1]
    assert "### synthetic: defaults, no knob" in section and "tuned" not in section
    assert json.loads(Path(files["results"]).read_text())["against"]["tuned"] is False
    (base / "study.yaml").write_text(yaml.safe_dump(study("one-size")))

    # Studies with no test size in common have nothing to set side by side (and the report still writes).
    from lookhere.study_report import against_base

    record = lambda sizes: {"dataset": "synthetic", "encoding": "lh-90", "seed": 0, "train_size": 16,
                            "sizes": {s: {"tuned": {"top1": 0.5}, "default": {"top1": 0.5}} for s in sizes}}
    assert against_base([record(["16", "32"])], [record(["24", "48"])]) == {}

    # A path to no study is one message, at the report and before a run starts any cell.
    for wrong, error, said in (("../nowhere", FileNotFoundError, "not a study directory (no study.yaml)"),
                               (".", ValueError, "names this study itself")):
        (multi / "study.yaml").write_text(yaml.safe_dump(study("several-sizes", compare_with=wrong)))
        with pytest.raises(error, match=re.escape(said)):
            write_report(multi)
        with pytest.raises(error, match=re.escape(said)):
            prepare(StudyConfig.from_dict(study("several-sizes", compare_with=wrong)), multi)
    with pytest.raises(ValueError, match="compare_with must be the output directory"):
        StudyConfig.from_dict(study("several-sizes", compare_with=3))
    # A damaged base study file is one message naming it (not a YAML or key error from inside the report).
    (multi / "study.yaml").write_text(yaml.safe_dump(study("several-sizes", compare_with="../base")))
    (base / "study.yaml").write_text("name: [one-size\n")
    with pytest.raises(ValueError, match=re.escape(f"{base / 'study.yaml'} is damaged: not valid YAML")):
        write_report(multi)


def test_the_study_file_is_written_whole_or_not_at_all_and_a_damaged_one_is_one_message(tmp_path, monkeypatch):
    """``study.yaml`` is what the report and every later run read: a kill while it is rewritten must
    leave the old one, and a file that is not a study's config is named, with how to write it again."""
    import lookhere.io
    from lookhere.study import start_study
    from lookhere.study_files import read_study_file
    from lookhere.study_report import write_report

    out = tmp_path / "tiny"
    first = StudyConfig.from_dict(TINY)
    start_study(first, out)
    assert read_study_file(out) == first.to_dict()

    def killed(*args):  # the process dies after writing the new file, before it takes the old one's place
        raise KeyboardInterrupt

    monkeypatch.setattr(lookhere.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        start_study(StudyConfig.from_dict({**TINY, "seeds": [0, 1]}), out)
    monkeypatch.undo()
    assert read_study_file(out) == first.to_dict()

    path = out / "study.yaml"
    for text, said in (("name: [tiny\n", "is damaged: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
                       ("- tiny\n", "is damaged: not a study's config (no name, datasets, encodings, seeds)"),
                       (yaml.safe_dump({"name": "tiny", "seeds": [0]}), "is damaged: not a study's config (no datasets, encodings)")):
        path.write_text(text)
        for read in (read_study_file, write_report):
            with pytest.raises(ValueError, match=re.escape(f"{path} {said}; run `lookhere study --config FILE --output {out}`")):
                read(out)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{out}: not a study directory (no study.yaml)")):
        write_report(out)


def test_a_study_that_tunes_no_knob_reports_its_defaults_as_defaults(tmp_path, monkeypatch):
    """Without ``tune_knobs`` there are no tuned numbers: nothing is labelled tuned, and the figures
    keep the defaults' panels alone (not the same numbers twice, one pair called tuned)."""
    import matplotlib.pyplot as plt

    from lookhere.study_report import write_report

    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "name": "t", "datasets": {"synthetic-where": {}}, "encodings": ["lh-90", "rope-2d-axial"], "seeds": [0],
        "reference": "lh-90", "eval": {"tune_knobs": False}}))
    _finished_cell(tmp_path, "lh-90", 0, [(0, 0.9)])
    _finished_cell(tmp_path, "rope-2d-axial", 0, [(0, 0.9)])
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    files = write_report(tmp_path)
    report = Path(files["report"]).read_text()
    said = "No test-time knob was tuned in this study (its eval sets no tune_knobs): every encoding is at its defaults."
    assert report.count(said) == 1
    assert "tuned" not in report.replace(said, "").lower() and "chosen on validation" not in report
    assert "### Top-1 (%) with the encoding's defaults (no knob)" in report
    assert "### Paired over seeds: lh-90 minus each encoding (defaults, points of top-1)" in report
    panels = {i: [ax.get_title() for ax in f.axes] for i, f in enumerate(figures)}
    assert [len(p) for p in panels.values()] == [1, 1, 1], panels  # sizes, headline, learning: one dataset each
    assert not any("tuned" in t or "knob" in t and "no knob" not in t for p in panels.values() for t in p), panels
    for f in figures:
        close(f)


def test_reproduce_reads_the_record_and_names_every_difference(tmp_path):
    from lookhere.reproduce import command_env, compare, environment_changes, recorded_cell, relocate

    line = "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 lookhere train --seed 0 && X=1 lookhere eval"
    assert command_env(line) == {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"}
    assert relocate(["--output", "a/b/run", "--checkpoint", "a/b", "a/bc/run", "x"], "a/b", "/tmp/c") == [
        "--output", "/tmp/c/run", "--checkpoint", "/tmp/c", "a/bc/run", "x"]
    recorded = {"sizes": {"24": {"top1": 0.5, "n": 150}}, "adversarial": {"fgsm": [0.25, 0.5]},
                "environment": {"torch": "2.14.1", "settings": {"MKL_CBWR": "AVX2"}}}
    assert compare(recorded, json.loads(json.dumps(recorded))) == []
    rerun = {"sizes": {"24": {"top1": 0.5 + 2 ** -40, "n": 150}}, "adversarial": {"fgsm": [0.25]},
             "environment": {"torch": "2.15.0", "settings": {}}}
    assert compare(recorded, rerun) == [
        {"key": "adversarial.fgsm[1]", "recorded": 0.5, "rerun": None},
        {"key": "sizes.24.top1", "recorded": 0.5, "rerun": 0.5 + 2 ** -40}]  # environment is not a result
    assert environment_changes(recorded["environment"], rerun["environment"]) == [
        "MKL_CBWR: AVX2 -> None", "torch: 2.14.1 -> 2.15.0"]
    assert environment_changes(None, rerun["environment"]) == ["the recorded cell has no environment record"]

    cell = tmp_path / "cell"
    with pytest.raises(ValueError, match="not a finished study cell"):
        recorded_cell(cell)
    (cell / "eval").mkdir(parents=True)
    (cell / "eval" / "eval.json").write_text("{}")
    (cell / "cell.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        recorded_cell(cell)
    (cell / "cell.json").write_text(json.dumps({"command": "lookhere train"}))
    with pytest.raises(ValueError, match="records no train_command, eval_command"):
        recorded_cell(cell)

    # A recorded command that fails here: one line that names the log with its output.
    (cell / "cell.json").write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 lookhere train --data nowhere", "eval_command": ["lookhere", "eval"],
        "train_command": ["lookhere", "train", "--data", "nowhere", "--output", str(cell / "run")]}))
    p = subprocess.run([sys.executable, "-m", "lookhere.cli", "reproduce", str(cell), "--output", str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().endswith(f"see {tmp_path / 'again' / 'log.txt'}"), p.stderr
    assert "--data nowhere" in (tmp_path / "again" / "log.txt").read_text()
    # That folder holds this cell's rerun: another cell's is refused there, rather than compared with it.
    from lookhere.reproduce import reproduce_cell

    other = tmp_path / "other"
    shutil.copytree(cell, other)
    (other / "cell.json").write_text((cell / "cell.json").read_text().replace("--data nowhere", "--data elsewhere"))
    with pytest.raises(ValueError, match=f"--output {tmp_path / 'again'} holds something other than a rerun of {other}"):
        reproduce_cell(other, tmp_path / "again")


def _claims_record(encoding, seed, top1_train, ece_train, fgsm, top1_large_default, top1_large_tuned):
    return {"dataset": "d", "encoding": encoding, "seed": seed, "train_size": 24, "adversarial": {"n": 8, "fgsm": fgsm},
            "sizes": {"24": {"default": {"top1": top1_train, "ece": ece_train}, "tuned": {"top1": top1_train}},
                      "96": {"default": {"top1": top1_large_default}, "tuned": {"top1": top1_large_tuned}}}}


def test_the_papers_contrasts_are_per_seed_means_of_lookhere_minus_the_others():
    from lookhere.study_report import claims_markdown, paper_claims

    records = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        records += [
            _claims_record("lh-90", seed, 0.8 + shift, 0.05, 0.6, 0.7, 0.7),
            _claims_record("lh-45", seed, 0.6 + shift, 0.07, 0.4, 0.5, 0.6),
            _claims_record("lh-90-all-masked", seed, 0.0, 0.9, 0.0, 0.0, 0.0),  # an ablation: neither side
            _claims_record("rope-2d-axial", seed, 0.9, 0.02, 0.3, 0.2, 0.5 + shift),
            _claims_record("rope-2d-mixed", seed, 0.5, 0.04, 0.5, 0.3, 0.4),
            _claims_record("none", seed, 0.4, 0.09, 0.1, 0.4, 0.4),
            # A newer RoPE, the best at 96 px: not the 2D-RoPE of the paper's claim, set apart.
            _claims_record("rope-2d-dinov3", seed, 0.7, 0.03, 0.2, 0.8, 0.8),
        ]
    # A study part-way through seed 2: the contrasts use the seeds every encoding has finished.
    records.append(_claims_record("lh-90", 2, 0.9, 0.1, 0.9, 0.9, 0.9))
    planned = list(dict.fromkeys(r["encoding"] for r in records))
    c = paper_claims(records, planned)["d"]
    assert c["seeds"] == [0, 1] and c["lookhere"] == ["lh-90", "lh-45"]
    # The paper's contrasts are against the paper's encodings: the newer ones, no position encoding
    # and the ablation are in neither mean.
    assert c["others"] == ["rope-2d-axial", "rope-2d-mixed"] and c["newer_encodings"] == ["rope-2d-dinov3"]
    # seed 0: LookHere (0.8 + 0.6) / 2 = 0.7, the others (0.9 + 0.5) / 2 = 0.7; seed 1: 0.8 - 0.7.
    assert c["accuracy"]["mean"] == pytest.approx(0.05) and c["accuracy"]["std"] == pytest.approx(0.1 / math.sqrt(2))
    assert c["calibration"]["mean"] == pytest.approx(0.06 - 0.03)
    assert set(c["robustness"]) == {"fgsm"} and c["robustness"]["fgsm"]["mean"] == pytest.approx(0.5 - 0.4)
    # At 96 px the better of the paper's RoPEs is rope-2d-mixed at the defaults (0.3 > 0.2), rope-2d-axial tuned.
    assert c["extrapolation"]["default"]["against"] == "rope-2d-mixed"
    assert c["extrapolation"]["default"]["mean"] == pytest.approx(0.6 - 0.3)
    assert c["extrapolation"]["tuned"]["against"] == "rope-2d-axial"
    assert c["extrapolation"]["tuned"]["mean"] == pytest.approx(0.65 - 0.55)
    assert c["newer"]["default"]["against"] == c["newer"]["tuned"]["against"] == "rope-2d-dinov3"
    assert c["newer"]["default"]["mean"] == pytest.approx(0.6 - 0.8) and c["newer"]["tuned"]["mean"] == pytest.approx(0.65 - 0.8)
    table = claims_markdown({"d": c})
    assert "| top-1 at the training size, LookHere minus the others: +1.6 | +5.0 ± " in table
    assert "the others: the mean of rope-2d-axial, rope-2d-mixed (the paper's encodings; the newer encodings, " \
           "rope-2d-dinov3, no position encoding and the ablations are in neither mean)" in table
    assert "at 96 px (4.0x): defaults: +30.0 ± 0.0 (vs rope-2d-mixed); tuned: +10.0 ± " in table
    assert ("| not a claim of the paper: top-1 at the largest size, LookHere minus the best of the newer encodings "
            "(rope-2d-dinov3) | at 96 px: defaults: -20.0 ± 0.0 (vs rope-2d-dinov3); tuned: -15.0 ± ") in table
    assert paper_claims([r for r in records if not r["encoding"].startswith("lh")], planned) == {}
    # An encoding of the study with no finished cell yet: no seed has them all, so no contrast yet,
    # rather than one against fewer encodings than the caption names.
    assert paper_claims(records, planned + ["sincos-2d"]) == {}
    partial = [r for r in records if not (r["encoding"] == "none" and r["seed"] == 1)]
    assert paper_claims(partial, planned)["d"]["seeds"] == [0]
    # the ablation is in neither mean, but its seeds count: every planned encoding has finished
    partial = [r for r in records if not (r["encoding"] == "lh-90-all-masked" and r["seed"] == 1)]
    assert paper_claims(partial, planned)["d"]["seeds"] == [0]


def test_a_stopped_study_still_says_why_its_cells_were_made_again(tmp_path, monkeypatch):
    """Cells cleared to be made again keep the reason through a kill: the one that had started, and
    the ones that had not."""
    import lookhere.study as study

    cfg = StudyConfig.from_dict({**TINY, "seeds": [0, 1]})
    cells = cfg.cells(tmp_path)
    old, new = {"initial_weights": "aaaa"}, {"initial_weights": "bbbb"}
    for c in cells:  # made when the initial weights were drawn otherwise
        (c.dir / "eval").mkdir(parents=True)
        (c.dir / "eval" / "eval.json").write_text("{}")
        (c.dir / "cell.json").write_text(json.dumps({"command": c.command_line(), "identity": old}))
    identities = {c.key: new for c in cells}
    why = ["the initial weights differ (an initialisation change)"]
    assert study.cells_to_redo(cells, identities) == {c.key: why for c in cells}

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(study, "run_command", killed)
    for c in cells:
        study._clear(c, why)
        study._clear(c, why)  # a study stopped before the cell started clears it again when rerun
        assert (c.dir / "log.txt").read_text().count("# made again") == 1
    with pytest.raises(Killed):  # the first cell starts and the study is killed
        study.run_cell(cells[0], new, why)

    redo = study.cells_to_redo(cells, identities)  # the study is run again
    for c in cells:
        with pytest.raises(Killed):
            study.run_cell(c, new, redo.get(c.key))
        assert json.loads((c.dir / "cell.json").read_text())["made_again"] == why, c.key


def test_every_encoding_keeps_one_distinct_style_across_a_studys_figures():
    """LookHere's presets in blues, their ablations dotted in the same blue, no other encoding in a blue
    or in another encoding's colour (the synthetic study has nine others and three ablations)."""
    from lookhere.study_report import LOOKHERE_COLORS, _styles

    others = ["none", "learned-1d", "sincos-2d", "factorized", "fourier", "rpe-learned", "alibi-2d",
              "rope-2d-axial", "rope-2d-mixed", "rope-2d-dinov3", "fire", "pape"]
    ablations = ["lh-180-all-masked", "lh-90-all-masked", "lh-45-all-masked"]
    styles = _styles(others + list(LOOKHERE_COLORS) + ablations)
    for preset, blue in LOOKHERE_COLORS.items():
        assert styles[preset] == {"color": blue, "lw": 2.2, "ls": "-"}
        assert styles[f"{preset}-all-masked"]["color"] == blue and styles[f"{preset}-all-masked"]["ls"] == ":"
    colors = [styles[e]["color"] for e in others]
    assert len(set(colors)) == len(others) and not set(colors) & set(LOOKHERE_COLORS.values())
    assert {styles[e]["ls"] for e in others} == {"--"}
