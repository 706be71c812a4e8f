"""A study's aggregation: means, deviations and 95% intervals over seeds, paired comparisons against
the reference encoding, plots with error bands, ``report.md`` and ``results.json``.

``results.json`` holds one record per cell (dataset, encoding, seed, the exact command, every
metric per size) and the summaries; it depends only on the cells' metrics, so a study that was
killed and resumed gives the same file as one that ran straight through.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .io import write_atomic
from .study_files import STUDY_FILE, CellFiles, read_study_file

METRICS = ("top1", "nll", "ece")


# --- statistics ---------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% Student-t interval of the mean."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": [None, None]}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": [None, None]}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired(reference: Sequence[float], other: Sequence[float], higher_is_better: bool = True) -> dict[str, Any]:
    """Reference minus other, seed by seed: the mean difference, its 95% interval, the paired
    t-test's two-sided p-value and how many seeds the reference won (for NLL and ECE, lower wins)."""
    from scipy import stats

    a, b = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    d = a - b
    out = summarize(d)
    # The same difference on every seed (k/n accuracies subtract to it up to rounding): no spread, no test.
    if len(d) > 1 and np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        out.update(std=0.0, ci95=[out["mean"], out["mean"]])
    out["p_value"] = float(stats.ttest_rel(a, b).pvalue) if len(d) > 1 and out["std"] > 0 else None
    out["wins"] = int((d > 0).sum() if higher_is_better else (d < 0).sum())
    out["ties"] = int((d == 0).sum())
    return out


# --- loading -------------------------------------------------------------------------------------
def _cells(root: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per finished cell of the study in ``root`` (its config ``cfg``), in its file's order."""
    records = []
    for dataset in cfg["datasets"]:
        for encoding in cfg["encodings"]:
            for seed in cfg["seeds"]:
                files = CellFiles.of(root, dataset, encoding, seed)
                if files.status() != "done":
                    continue
                cell, ev, epochs = files.record(), files.evaluation(), files.epochs()
                curve = {e["epoch"]: e["val_acc"] for e in epochs}  # a resumed run may log an epoch twice
                sizes = {}
                for size, m in ev["sizes"].items():
                    tuned = ev.get("tuned", {}).get(size, m)
                    knob = ev.get("knobs", {}).get(size, {})
                    # LookHere's slope also says which rule gave it (own, x0.5, x2, the size ratio)
                    setting = {**knob.get("setting", {}), **({"rule": knob["rule"]} if "rule" in knob else {})}
                    sizes[size] = {"default": m, "tuned": tuned, "setting": setting,
                                   "val_top1": knob.get("val_top1", {})}
                records.append({
                    "dataset": dataset, "encoding": encoding, "seed": seed, "command": cell["command"],
                    "train_size": ev["train_size"],
                    "final_val_top1": epochs[-1]["val_acc"] if epochs else None,
                    "best_val_top1": max((e["val_acc"] for e in epochs), default=None),
                    "val_curve": [curve[k] for k in sorted(curve)],
                    "sizes": sizes, "adversarial": ev.get("adversarial") or {},
                    "by_object_size": ev.get("by_object_size"),
                    "identity": cell.get("identity"), "made_again": cell.get("made_again"),
                    "environment": cell.get("environment"),
                })
    return records


# --- aggregation ----------------------------------------------------------------------------------
# Validation top-1 at which a task counts as learned (the where task's bar for RoPE and LookHere).
LEARNED = 0.9


def first_epoch_at(curve: Sequence[float], threshold: float) -> Optional[int]:
    """The first epoch (counted from 1) whose validation top-1 reaches ``threshold``; None if none does."""
    return next((i + 1 for i, v in enumerate(curve) if v >= threshold), None)


def aggregate(records: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Summaries per dataset, encoding and size; paired differences against ``reference``."""
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        encodings = list(dict.fromkeys(r["encoding"] for r in rows))
        sizes = sorted(rows[0]["sizes"], key=int)
        ds: dict[str, Any] = {"train_size": rows[0]["train_size"], "sizes": sizes, "encodings": {}, "paired": {}}
        for enc in encodings:
            runs = [r for r in rows if r["encoding"] == enc]
            e: dict[str, Any] = {"seeds": [r["seed"] for r in runs],
                                 "best_val_top1": summarize([r["best_val_top1"] for r in runs]),
                                 "default": {}, "tuned": {}, "settings": {}, "adversarial": {},
                                 "object_size_change": None}
            for variant in ("default", "tuned"):
                for size in sizes:
                    e[variant][size] = {m: summarize([r["sizes"][size][variant][m] for r in runs]) for m in METRICS}
            for size in sizes:
                chosen = Counter(json.dumps(r["sizes"][size]["setting"], sort_keys=True) for r in runs)
                e["settings"][size] = {k: v for k, v in chosen.most_common()}
            for attack in runs[0]["adversarial"]:
                if attack != "n":
                    e["adversarial"][attack] = summarize([r["adversarial"][attack] for r in runs])
            if all(r["by_object_size"] for r in runs):
                key = "accuracy_change_tuned" if "accuracy_change_tuned" in runs[0]["by_object_size"] else "accuracy_change"
                e["object_size_change"] = {
                    size: [summarize([r["by_object_size"][key][size][q] for r in runs]) for q in range(5)]
                    for size in sizes}
            curves = [r.get("val_curve") or [] for r in runs]
            e["val_curve"] = [summarize([c[i] for c in curves if len(c) > i]) for i in range(max(map(len, curves)))]
            e["first_epoch_learned"] = [first_epoch_at(c, LEARNED) for c in curves]
            ds["encodings"][enc] = e
        if reference in encodings:
            ref = {r["seed"]: r for r in rows if r["encoding"] == reference}
            for enc in encodings:
                if enc == reference:
                    continue
                other = {r["seed"]: r for r in rows if r["encoding"] == enc}
                seeds = sorted(set(ref) & set(other))
                cmp: dict[str, Any] = {"seeds": seeds, "top1": {}, "nll": {}, "ece": {}, "adversarial": {}}
                for size in sizes:
                    for m in METRICS:
                        cmp[m][size] = paired([ref[s]["sizes"][size]["tuned"][m] for s in seeds],
                                              [other[s]["sizes"][size]["tuned"][m] for s in seeds],
                                              higher_is_better=m == "top1")
                for attack in ref[seeds[0]]["adversarial"] if seeds else ():
                    if attack != "n":
                        cmp["adversarial"][attack] = paired([ref[s]["adversarial"][attack] for s in seeds],
                                                            [other[s]["adversarial"][attack] for s in seeds])
                ds["paired"][enc] = cmp
        out[dataset] = ds
    return out


def against_base(records: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """This study against ``base``, the records of the study it varies (``compare_with``): per dataset
    both ran and encoding both have, top-1 here and there and the change (here minus there, seed by
    seed over the seeds both finished) at each test size both have, tuned and at the defaults."""
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        here = {(r["encoding"], r["seed"]): r for r in records if r["dataset"] == dataset}
        there = {(r["encoding"], r["seed"]): r for r in base if r["dataset"] == dataset}
        pairs = [key for key in here if key in there]
        if not pairs:
            continue
        sizes = sorted(set.intersection(*(set(here[k]["sizes"]) & set(there[k]["sizes"]) for k in pairs)), key=int)
        if not sizes:
            continue
        encodings: dict[str, Any] = {}
        for enc in dict.fromkeys(e for e, _ in pairs):
            seeds = [s for e, s in pairs if e == enc]
            encodings[enc] = {"seeds": seeds}
            for variant in ("tuned", "default"):
                a = {size: [here[enc, s]["sizes"][size][variant]["top1"] for s in seeds] for size in sizes}
                b = {size: [there[enc, s]["sizes"][size][variant]["top1"] for s in seeds] for size in sizes}
                encodings[enc][variant] = {size: {"here": summarize(a[size]), "there": summarize(b[size]),
                                                  "change": paired(a[size], b[size])} for size in sizes}
        # Who is best at the largest size, here and there: ranked over the seeds every encoding has finished
        # in both, so that no mean over more seeds is ranked against one over fewer.
        last, common = sizes[-1], sorted(set.intersection(*(set(e["seeds"]) for e in encodings.values())))
        rank: dict[str, Any] = {"seeds": common}
        for variant in ("tuned", "default") if common else ():
            rank[variant] = {}
            for side, cells in (("here", here), ("there", there)):
                mean = {enc: np.mean([cells[enc, s]["sizes"][last][variant]["top1"] for s in common]) for enc in encodings}
                rank[variant][side] = {enc: i + 1 for i, enc in enumerate(sorted(encodings, key=lambda e: -mean[e]))}
        out[dataset] = {"train_size": {"here": here[pairs[0]]["train_size"], "there": there[pairs[0]]["train_size"]},
                        "sizes": sizes, "encodings": encodings, "rank": rank}
    return out


# --- writing ---------------------------------------------------------------------------------------
def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± half-width of the 95% interval`` (in percent for accuracies; ``signed`` for differences)."""
    if s["mean"] is None:
        return "-"
    mean = f"{s['mean'] * scale:{'+' if signed else ''}.{digits}f}"
    if s["ci95"][0] is None:
        return mean
    half = (s["ci95"][1] - s["ci95"][0]) / 2
    return f"{mean} ± {half * scale:.{digits}f}"


def _setting_text(settings: dict[str, int]) -> str:
    """``{'{"lh_global_slope": 0.5, "rule": "size ratio"}': 3}`` -> ``slope=0.5 [size ratio] (3)``."""
    from .position import registered_knobs

    short = {knob.key: knob.label for knob in registered_knobs()}
    parts = []
    for key, count in settings.items():
        setting = json.loads(key)
        rule = setting.pop("rule", None)
        label = ", ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                          for k, v in setting.items()) or "-"
        label += f" [{rule}]" if rule else ""
        parts.append(f"{label} ({count})")
    return "; ".join(parts)


def plot_study(summary: dict[str, Any], path: Path, tuned: bool = True) -> str:
    """Top-1 against test size, one line per encoding (the mean over seeds: the intervals of a dozen
    lines would hide each other; the headline figure and the tables give them); one column per
    dataset, with each encoding's knob tuned on validation (top row; where ``tuned``) and at its defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    variants = {**({"tuned": "knob tuned on validation"} if tuned else {}), "default": "defaults, no knob"}
    fig, axes = plt.subplots(len(variants), len(names), figsize=(5.8 * len(names), 4.2 * len(variants)),
                             squeeze=False, sharey=True)
    for col, dataset in enumerate(names):
        ds = summary[dataset]
        sizes = [int(s) for s in ds["sizes"]]
        styles = _styles(list(ds["encodings"]))
        for ax, (variant, title) in zip(axes[:, col], variants.items()):
            for enc, e in ds["encodings"].items():
                ax.plot(sizes, _interval(e, variant, sizes)[0], marker="o", ms=3, label=enc, **styles[enc])
            _size_axis(ax, sizes, ds["train_size"])
            ax.set_ylabel("top-1 (%), mean over seeds")
            ax.set_title(f"{dataset}: {title}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


LOOKHERE = ("lh-180", "lh-90", "lh-45")
LOOKHERE_COLORS = dict(zip(LOOKHERE, ("#08306b", "#2171b5", "#6baed6")))
# Every other encoding in a colour of its own that is not LookHere's blue (tab10 without blue, then more).
OTHER_COLORS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf", "#000000", "#fdbf6f", "#b15928", "#cab2d6")


def _styles(encodings: list[str]) -> dict[str, dict[str, Any]]:
    """One line style per encoding, the same in every figure of a study: LookHere's presets solid in
    blues, their ablations dotted in the preset's blue, the rest dashed in other colours."""
    out, others = {}, [e for e in encodings if not e.startswith("lh-")]
    for enc in encodings:
        base = next((p for p in LOOKHERE if enc == p or enc.startswith(p + "-")), None)
        if base == enc:
            out[enc] = dict(color=LOOKHERE_COLORS[enc], lw=2.2, ls="-")
        elif base is not None:
            out[enc] = dict(color=LOOKHERE_COLORS[base], lw=1.6, ls=":")
        elif enc.startswith("lh-"):
            out[enc] = dict(color=LOOKHERE_COLORS["lh-90"], lw=1.6, ls="-.")
        else:
            out[enc] = dict(color=OTHER_COLORS[others.index(enc) % len(OTHER_COLORS)], lw=1.2, ls="--")
    return out


# The families the headline figure draws one line for (their best member), in drawing order.
FAMILIES = {
    "RoPE": ("rope-2d-axial", "rope-2d-mixed", "rope-2d-dinov3"),
    "attention bias": ("rpe-learned", "alibi-2d", "fire", "pape"),
    "absolute": ("learned-1d", "sincos-2d", "factorized", "fourier"),
    "none": ("none",),
}


def _extrapolation_mean(e: dict[str, Any], variant: str, sizes: list[str], train_size: int) -> float:
    larger = [s for s in sizes if int(s) > train_size] or sizes
    return float(np.mean([e[variant][s]["top1"]["mean"] for s in larger]))


def headline(ds: dict[str, Any], variant: str) -> list[tuple[str, str]]:
    """(label, encoding) for LookHere's presets and each family's best member by mean top-1 over
    the test sizes above the training size."""
    encodings, sizes = ds["encodings"], ds["sizes"]
    lines = [(enc, enc) for enc in LOOKHERE if enc in encodings]
    for family, members in FAMILIES.items():
        present = [m for m in members if m in encodings]
        if present:
            best = max(present, key=lambda m: _extrapolation_mean(encodings[m], variant, sizes, ds["train_size"]))
            lines.append((f"{family}: {best}" if len(present) > 1 else best, best))
    return lines


# The paper's headline numbers (ViT-B/16 on ImageNet-1k, trained at 224 px), in points.
PAPER_CLAIMS = {"accuracy": 1.6, "robustness": 5.4, "calibration": -1.5, "extrapolation": 21.7}
# The 2D-RoPE of the paper's comparison (Heo et al.'s axial and mixed frequencies), and the encodings
# that came after it, which the paper's claim says nothing about and the report sets apart.
PAPER_ROPES = ("rope-2d-axial", "rope-2d-mixed")
# The encodings the paper sets LookHere against (no position encoding is not one of them).
PAPER_BASELINES = ("learned-1d", "sincos-2d", "factorized", "fourier", "rpe-learned", "alibi-2d", *PAPER_ROPES)
NEWER = ("rope-2d-dinov3", "fire", "pape")


def paper_claims(records: list[dict[str, Any]], encodings: list[str], tuned: bool = True) -> dict[str, Any]:
    """The paper's four contrasts, per dataset: seed by seed, the mean of LookHere's released presets
    minus the mean of the paper's other encodings at the training size (top-1 and ECE at the
    defaults, accuracy under each attack), and minus the best of the paper's 2D-RoPEs at the largest
    test size (at the defaults, and with each one's knob tuned where ``tuned``); then mean and 95% interval over the
    seeds on which every one of the study's ``encodings`` has finished. Beside them, not a claim of
    the paper: the same largest-size contrast against the best of the newer encodings (``newer``),
    which are in neither mean, nor are no position encoding and the ablations."""
    out: dict[str, Any] = {}
    lookhere = [e for e in LOOKHERE if e in encodings]
    others = [e for e in encodings if e in PAPER_BASELINES]
    ropes = [e for e in PAPER_ROPES if e in others]
    newer = [e for e in NEWER if e in encodings]
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        by = {(r["encoding"], r["seed"]): r for r in rows}
        seeds = sorted(s for s in dict.fromkeys(r["seed"] for r in rows)
                       if all((e, s) in by for e in encodings))
        if not lookhere or not others or not seeds:
            continue
        train, last = str(rows[0]["train_size"]), max(rows[0]["sizes"], key=int)

        def contrast(value, group: list[str]) -> dict[str, Any]:
            return summarize([float(np.mean([value(by[e, s]) for e in lookhere]) - np.mean([value(by[e, s]) for e in group]))
                              for s in seeds])

        ds: dict[str, Any] = {
            "seeds": seeds, "lookhere": lookhere, "others": others, "newer_encodings": newer, "train_size": int(train), "largest": int(last),
            "accuracy": contrast(lambda r: r["sizes"][train]["default"]["top1"], others),
            "calibration": contrast(lambda r: r["sizes"][train]["default"]["ece"], others),
            "robustness": {a: contrast(lambda r, a=a: r["adversarial"][a], others)
                           for a in by[lookhere[0], seeds[0]]["adversarial"] if a != "n"},
            "extrapolation": {}, "newer": {},
        }
        variants = ("default", "tuned") if tuned else ("default",)
        for key, group in (("extrapolation", ropes), ("newer", newer)):
            for variant in variants if group else ():
                best = max(group, key=lambda e: np.mean([by[e, s]["sizes"][last][variant]["top1"] for s in seeds]))
                ds[key][variant] = {"against": best, **contrast(lambda r: r["sizes"][last][variant]["top1"], [best])}
        out[dataset] = ds
    return out


def claims_markdown(claims: dict[str, Any]) -> str:
    """The paper's claims next to this study's contrasts, one column per dataset."""
    if not claims:
        return ""
    names = list(claims)
    first = claims[names[0]]
    tuned = any("tuned" in claims[d][key] for d in names for key in ("extrapolation", "newer"))

    def col(f) -> str:
        return " | ".join(f(claims[d]) for d in names)

    def rob(c: dict[str, Any]) -> str:
        return "; ".join(f"{a} {_pm(s, signed=True)}" for a, s in c["robustness"].items()) or "-"

    def extra(c: dict[str, Any], key: str = "extrapolation") -> str:
        e = c[key]
        return "; ".join(f"{label}: {_pm(e[v], signed=True)} (vs {e[v]['against']})" for v, label in (("default", "defaults"), ("tuned", "tuned"))
                         if v in e) or "-"

    newer = [f"| not a claim of the paper: top-1 at the largest size, LookHere minus the best of the newer "
             f"encodings ({', '.join(first['newer_encodings'])}) | "
             + col(lambda c: f"at {c['largest']} px: {extra(c, 'newer')}") + " |"] if any(claims[d]["newer"] for d in names) else []

    lines = ["## The paper's claims in this study", "",
             "| the paper (ViT-B/16, ImageNet-1k, trained at 224 px) | " +
             " | ".join(f"{d} (trained at {claims[d]['train_size']} px; {len(claims[d]['seeds'])} seed{'s' if len(claims[d]['seeds']) != 1 else ''})" for d in names) + " |",
             "|---|" + "---|" * len(names),
             f"| top-1 at the training size, LookHere minus the others: +{PAPER_CLAIMS['accuracy']} | "
             + col(lambda c: _pm(c["accuracy"], signed=True)) + " |",
             f"| accuracy under attack, LookHere minus the others: +{PAPER_CLAIMS['robustness']} | " + col(rob) + " |",
             f"| ECE at the training size, LookHere minus the others: {PAPER_CLAIMS['calibration']} | "
             + col(lambda c: _pm(c["calibration"], signed=True)) + " |",
             f"| top-1 at 1024 px (4.6x), LookHere minus 2D-RoPE: +{PAPER_CLAIMS['extrapolation']} | "
             + col(lambda c: f"at {c['largest']} px ({c['largest'] / c['train_size']:.1f}x): {extra(c)}") + " |",
             *newer,
             "",
             f"Points; mean over seeds ± the half-width of the 95% interval of the per-seed contrast, over "
             f"the seeds every encoding has finished. LookHere: the mean of {', '.join(first['lookhere'])}; the others: the "
             f"mean of {', '.join(first['others'])} (the paper's encodings; "
             + (f"the newer encodings, {', '.join(first['newer_encodings'])}, " if first["newer_encodings"] else "")
             + "no position encoding and the ablations are in neither mean). At the training size every encoding runs at its defaults; at the "
             f"largest size LookHere is set against the better of the paper's 2D-RoPEs ({' and '.join(PAPER_ROPES)}, by "
             "mean top-1 there; the newer encodings in a row of their own), "
             + ("both at their defaults and with each encoding's knob chosen on validation." if tuned else
                "at their defaults."), ""]
    return "\n".join(lines)


def _interval(e: dict[str, Any], variant: str, sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 (%) at each size: the mean and its 95% interval, clipped to 0-100 (a t-interval over 3
    seeds can pass 0% or 100%; accuracy cannot); one seed: no interval."""
    rows = [e[variant][str(s)]["top1"] for s in sizes]
    mean = np.array([r["mean"] for r in rows], dtype=float) * 100
    lo = np.array([r["ci95"][0] if r["ci95"][0] is not None else r["mean"] for r in rows], dtype=float) * 100
    hi = np.array([r["ci95"][1] if r["ci95"][1] is not None else r["mean"] for r in rows], dtype=float) * 100
    return mean, np.clip(lo, 0, 100), np.clip(hi, 0, 100)


def _size_axis(ax, sizes: list[int], train_size: int, accuracy: bool = True,
               marked: str = "training size") -> None:
    """Test sizes on a log axis, ``train_size`` dotted; ``accuracy``: a 0-100% y axis (else a change)."""
    ax.axvline(train_size, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    if accuracy:
        ax.set_ylim(0, 100)
    else:
        ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(f"test image size (px); dotted: {marked}")
    ax.grid(alpha=0.3)


def plot_headline(summary: dict[str, Any], path: Path, records: Sequence[dict[str, Any]] = (),
                  tuned: bool = True) -> str:
    """LookHere's three presets against the best member of each other family, with the knob tuned
    on validation (left; where ``tuned``) and at the defaults (right); one row per dataset. The 95% intervals are bars,
    each line's set a little aside, so that seven lines' intervals stay readable where bands would
    cover each other; each seed of ``records`` is a faint dot beside them, for runs that split into
    those that learned a task and those that did not, which a mean and its interval hide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    # Constrained layout makes room for the legends under the panels, off the lines.
    variants = ((("tuned", "knob tuned on validation"),) if tuned else ()) + (("default", "defaults"),)
    fig, axes = plt.subplots(len(names), len(variants), figsize=(5.5 * len(variants), 5.0 * len(names)),
                             squeeze=False, sharey=True, layout="constrained")
    family_colors = dict(zip(FAMILIES, ("#d94801", "#238b45", "#6a51a3", "#525252")))
    for row, dataset in enumerate(names):
        ds = summary[dataset]
        sizes = [int(s) for s in ds["sizes"]]
        for ax, (variant, title) in zip(axes[row], variants):
            lines = headline(ds, variant)
            for i, (label, enc) in enumerate(lines):
                family = next((f for f, m in FAMILIES.items() if enc in m), None)
                style = (dict(color=LOOKHERE_COLORS[enc], lw=2.4, ls="-") if family is None else
                         dict(color=family_colors[family], lw=1.6, ls="--"))
                mean, lo, hi = _interval(ds["encodings"][enc], variant, sizes)
                aside = 2.0 ** (0.03 * (i - (len(lines) - 1) / 2))  # the x axis is logarithmic
                ax.errorbar([s * aside for s in sizes], mean, yerr=[mean - lo, hi - mean], marker="o", ms=3,
                            capsize=2, elinewidth=0.9, label=label, **style)
                seeds = [(s * aside * 2.0 ** 0.012, 100 * r["sizes"][str(s)][variant]["top1"]) for r in records
                         if r["dataset"] == dataset and r["encoding"] == enc for s in sizes]
                if seeds:  # just right of the line's own bar, before the next line's
                    ax.scatter(*zip(*seeds), s=16, color=style["color"], alpha=0.6, linewidths=0, zorder=3)
            _size_axis(ax, sizes, ds["train_size"])
            ax.set_title(f"{dataset}: {title}")
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        axes[row][0].set_ylabel("top-1 (%), mean and 95% interval")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_learning(summary: dict[str, Any], path: Path) -> str:
    """Validation top-1 against epoch at the training size, one panel per dataset; LookHere's presets
    solid, the others dashed; means over seeds (the report's table gives each seed's epoch of passing
    LEARNED, which bands over three seeds would hide). Shows which encodings learn a task late."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(5.8 * len(names), 4.4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, dataset in zip(axes[0], names):
        styles = _styles(list(summary[dataset]["encodings"]))
        for enc, e in summary[dataset]["encodings"].items():
            if not e["val_curve"]:
                continue
            epochs = np.arange(1, len(e["val_curve"]) + 1)
            mean = np.array([s["mean"] for s in e["val_curve"]]) * 100
            ax.plot(epochs, mean, marker="o", ms=3, label=enc, **styles[enc])
        ax.axhline(LEARNED * 100, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 100)
        ax.set_xlabel("epoch; dotted: the bar for a learned task")
        ax.set_title(f"{dataset}: validation at {summary[dataset]['train_size']} px")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation top-1 (%), mean over seeds")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def markdown(name: str, summary: dict[str, Any], reference: str, notes: str = "", progress: str = "",
             plot: str = "", headline_plot: str = "", claims: Optional[dict[str, Any]] = None,
             learning_plot: str = "", tuned: bool = True) -> str:
    """The report; ``tuned``: whether the study tuned each encoding's test-time knob (else every
    number is at the defaults, and no table or panel says tuned)."""
    lines = [f"# Study: {name}", ""]
    if progress:
        lines += [progress, ""]
    if notes:
        lines += [notes, ""]
    lines += ["Numbers are means over seeds ± the half-width of the 95% Student-t interval, in percent "
              "(NLL in nats). " + ("\"Tuned\": each encoding's test-time knob set per size on the validation "
                                   "split (LookHere global slope, RoPE coordinate interpolation, learned-1d "
                                   "resampling, FIRE normaliser)." if tuned else
                                   "No test-time knob was tuned in this study (its eval sets no tune_knobs): "
                                   "every encoding is at its defaults."), ""]
    if headline_plot:
        lines += [f"![LookHere's presets against the best of each family]({headline_plot})", "",
                  "LookHere's three presets against the best member of each other family (chosen by mean top-1 "
                  "over the sizes above the training size" + (", separately with and without knobs" if tuned else "") +
                  "): mean, 95% interval "
                  "and, as dots, each seed. Every encoding (means over seeds):", ""]
    if plot:
        lines += [f"![top-1 against test size: {'knobs tuned (top), defaults (bottom)' if tuned else 'defaults'}]({plot})", ""]
    if learning_plot:
        lines += ["How fast each encoding learns each task (validation top-1 after each epoch):", "",
                  f"![validation top-1 against epoch]({learning_plot})", ""]
    if claims:
        lines += [claims_markdown(claims)]
    for dataset, ds in summary.items():
        sizes = ds["sizes"]
        t = ds["train_size"]
        last = max(sizes, key=int)
        lines += [f"## {dataset} (trained at {t} px)", ""]
        if tuned:
            lines += ["### Top-1 (%) by test size, tuned", "",
                      "| encoding | best val top-1 | " + " | ".join(f"{s} px" for s in sizes) + " |",
                      "|---|---:|" + "---:|" * len(sizes)]
            for enc, e in ds["encodings"].items():
                lines.append(f"| {enc} | {_pm(e['best_val_top1'])} | " +
                             " | ".join(_pm(e["tuned"][s]["top1"]) for s in sizes) + " |")
            lines.append("")
        lines += ["### Top-1 (%) with the encoding's defaults (no knob)", "",
                  "| encoding | " + " | ".join(f"{s} px" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for enc, e in ds["encodings"].items():
            lines.append(f"| {enc} | " + " | ".join(_pm(e["default"][s]["top1"]) for s in sizes) + " |")
        lines += _learning_table(ds)
        if tuned:
            lines += ["", "### Settings chosen on validation (count of seeds)", "",
                      "| encoding | " + " | ".join(f"{s} px" for s in sizes if int(s) != t) + " |",
                      "|---|" + "---|" * (len(sizes) - 1)]
            for enc, e in ds["encodings"].items():
                lines.append(f"| {enc} | " + " | ".join(_setting_text(e["settings"][s]) for s in sizes if int(s) != t) + " |")
        attacks = list(next(iter(ds["encodings"].values()))["adversarial"])
        lines += ["", f"### Calibration and robustness at the training size ({t} px) and at {last} px", "",
                  f"| encoding | NLL {t} | ECE {t} (%) | NLL {last} | ECE {last} (%) | " +
                  " | ".join(f"{a} (%)" for a in attacks) + " |", "|---|" + "---:|" * (4 + len(attacks))]
        for enc, e in ds["encodings"].items():
            lines.append(f"| {enc} | {_pm(e['tuned'][str(t)]['nll'], 1, 3)} | {_pm(e['tuned'][str(t)]['ece'])} | "
                         f"{_pm(e['tuned'][last]['nll'], 1, 3)} | {_pm(e['tuned'][last]['ece'])} | " +
                         " | ".join(_pm(e["adversarial"][a]) for a in attacks) + " |")
        if all(e["object_size_change"] for e in ds["encodings"].values()):
            lines += ["", f"### Top-1 change from {t} px to {last} px by object-size quintile (points, smallest first)", "",
                      "| encoding | Q1 | Q2 | Q3 | Q4 | Q5 |", "|---|---:|---:|---:|---:|---:|"]
            for enc, e in ds["encodings"].items():
                lines.append(f"| {enc} | " + " | ".join(_pm(q) for q in e["object_size_change"][last]) + " |")
        if ds["paired"]:
            lines += ["", f"### Paired over seeds: {reference} minus each encoding ({'tuned' if tuned else 'defaults'}, points of top-1)", "",
                      "| encoding | " + " | ".join(f"{s} px" for s in sizes) + " | " +
                      " | ".join(f"{a}" for a in attacks) + " |", "|---|" + "---:|" * (len(sizes) + len(attacks))]
            for enc, c in ds["paired"].items():
                cells = [f"{_pm(c['top1'][s])} (p={_p(c['top1'][s]['p_value'])}, {c['top1'][s]['wins']}/{len(c['seeds'])})"
                         for s in sizes]
                cells += [f"{_pm(c['adversarial'][a])}" for a in attacks]
                lines.append(f"| {enc} | " + " | ".join(cells) + " |")
            lines += ["", f"Each entry: mean difference ± 95% interval half-width (p: paired t-test; "
                      f"k/n: seeds where {reference} was ahead)."]
        lines.append("")
    return "\n".join(lines)


def against_markdown(base_name: str, where: str, cmp: dict[str, Any], tuned: bool = True, plot: str = "") -> str:
    """The section that sets this study against the one it varies: per dataset and variant, top-1 here
    and there at the base's training size and the largest size both tested, the change, and each
    encoding's rank at the largest size in either study (who extrapolates best, and whether that moved)."""
    lines = [f"## Against {base_name}, the study this one varies (`compare_with: {where}`)", ""]
    if not cmp:
        return "\n".join(lines + [f"Nothing to set side by side yet: no finished cell here has a finished counterpart in "
                                     f"{base_name} tested at a size both studies use.", ""])
    lines += ["Top-1 (%) here and there, over the seeds both studies have finished, and the change (here minus "
              "there, points: the mean ± 95% interval of the per-seed difference; p: paired t-test; k/n: seeds "
              "where it rose). Rank: among the encodings listed, by mean top-1 at the largest size over the seeds "
              "every one of them has finished in both studies, here / there.", ""]
    if plot:
        lines += [f"![change in top-1 against test size]({plot})", ""]
    variants = (("tuned", "tuned"),) if tuned else ()
    variants += (("default", "defaults, no knob"),)
    for dataset, ds in cmp.items():
        t = str(ds["train_size"]["there"])
        last = ds["sizes"][-1]
        shown = ([t] if t in ds["sizes"] and t != last else []) + [last]
        common = ds["rank"]["seeds"]
        for variant, label in variants:
            encs = ds["encodings"]
            rank = ds["rank"].get(variant, {"here": {}, "there": {}})
            seeds = f"seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))}" if common else "no seed in common"
            lines += [f"### {dataset}: {label} (there trained at {t} px)", "",
                      "| encoding | seeds | " + " | ".join(f"{s} px here | there | change" for s in shown) +
                      f" | rank at {last} px ({seeds}) |", "|---|---:|" + "---:|---:|---:|" * len(shown) + "---:|"]
            for enc, e in encs.items():
                cells = []
                for size in shown:
                    c = e[variant][size]
                    ch = c["change"]
                    cells += [_pm(c["here"]), _pm(c["there"]),
                              f"{_pm(ch, signed=True)} (p={_p(ch['p_value'])}, {ch['wins']}/{len(e['seeds'])})"]
                lines.append(f"| {enc} | {len(e['seeds'])} | " + " | ".join(cells) +
                             (f" | {rank['here'][enc]} / {rank['there'][enc]} |" if common else " | - |"))
            if common:
                best = {side: min(rank[side], key=rank[side].get) for side in rank}
                lines += ["", f"Best at {last} px ({label}, {seeds}): {best['here']} here, {best['there']} there.", ""]
            else:
                lines += ["", "No seed is finished for every encoding in both studies yet: no ranking.", ""]
    return "\n".join(lines)


def plot_against(cmp: dict[str, Any], path: Path, base_name: str, tuned: bool = True) -> str:
    """The change in top-1 (here minus the base study) against test size, one line per encoding with
    its 95% interval; one row per dataset, tuned (where ``tuned``) and defaults side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ((("tuned", "knob tuned on validation"),) if tuned else ()) + (("default", "defaults"),)
    fig, axes = plt.subplots(len(cmp), len(variants), figsize=(5.5 * len(variants), 4.6 * len(cmp)),
                             squeeze=False, sharey=True, layout="constrained")
    for row, (dataset, ds) in enumerate(cmp.items()):
        sizes = [int(s) for s in ds["sizes"]]
        styles = _styles(list(ds["encodings"]))
        for ax, (variant, title) in zip(axes[row], variants):
            for i, (enc, e) in enumerate(ds["encodings"].items()):
                change = [e[variant][str(s)]["change"] for s in sizes]
                mean = np.array([c["mean"] for c in change]) * 100
                # clipped as accuracies are: a t-interval over two or three seeds can pass what a change can be
                lo = np.clip(np.array([c["mean"] if c["ci95"][0] is None else c["ci95"][0] for c in change]) * 100, -100, 100)
                hi = np.clip(np.array([c["mean"] if c["ci95"][1] is None else c["ci95"][1] for c in change]) * 100, -100, 100)
                aside = 2.0 ** (0.025 * (i - (len(ds["encodings"]) - 1) / 2))  # the x axis is logarithmic
                ax.errorbar([s * aside for s in sizes], mean, yerr=[mean - lo, hi - mean], marker="o", ms=3,
                            capsize=2, elinewidth=0.8, label=enc, **styles[enc])
            _size_axis(ax, sizes, ds["train_size"]["there"], accuracy=False, marked="the base study's training size")
            ax.set_title(f"{dataset}: {title}")
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        axes[row][0].set_ylabel(f"top-1 here minus {base_name} (points)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _learning_table(ds: dict[str, Any]) -> list[str]:
    """Validation top-1 after each epoch (mean over seeds), and the epoch each seed reached LEARNED
    (a column only where some seed did: on a task no encoding passes it would say nothing)."""
    epochs = max(len(e["val_curve"]) for e in ds["encodings"].values())
    if not epochs:
        return []
    passed = any(n is not None for e in ds["encodings"].values() for n in e["first_epoch_learned"])
    lines = ["", f"### Learning: validation top-1 (%) after each epoch at {ds['train_size']} px, mean over seeds", "",
             "| encoding | " + " | ".join(str(i + 1) for i in range(epochs)) +
             (f" | first epoch at {LEARNED:.0%}, per seed |" if passed else " |"),
             "|---|" + "---:|" * epochs + ("---|" if passed else "")]
    for enc, e in ds["encodings"].items():
        cells = [f"{s['mean'] * 100:.0f}" for s in e["val_curve"]] + ["-"] * (epochs - len(e["val_curve"]))
        if passed:
            cells.append(", ".join("never" if n is None else str(n) for n in e["first_epoch_learned"]))
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return lines


def provenance(records: list[dict[str, Any]]) -> str:
    """Which cells were made again and why, which predate recorded identities, and the environments
    the cells ran in (what a rerun elsewhere must match to give the same digits)."""
    from .environment import describe

    lines = ["## Provenance", ""]
    again = [r for r in records if r.get("made_again")]
    if again:
        lines += [f"Made again because what their command resolves to had changed ({len(again)} cells):", ""]
        for r in again:
            lines.append(f"- {r['dataset']}/{r['encoding']}/seed{r['seed']}: {'; '.join(r['made_again'])}")
        lines.append("")
    legacy = [r for r in records if not r.get("identity")]
    if legacy:
        by_encoding = Counter(f"{r['dataset']}/{r['encoding']}" for r in legacy)
        lines += [f"Made before cell identities and environments were recorded, kept because their commands "
                  f"match ({len(legacy)} cells): " + ", ".join(f"{k} ({n})" for k, n in by_encoding.items()) +
                  ". A rerun of their command need not repeat their digits (see the notes).", ""]
    environments: Counter = Counter()
    for r in records:
        env = r.get("environment") or {}
        for e in [*env.get("train", []), env.get("eval")]:
            if e:
                environments[describe(e)] += 1
    if environments:
        lines += ["Environments (count of training stretches and evaluations):", ""]
        lines += [f"- {text}: {n}" for text, n in environments.most_common()]
        lines.append("")
    return "\n".join(lines)


def _p(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.2g}"


def base_study(root: Path, compare_with: str) -> Path:
    """The output directory of the study ``root`` varies, named relative to ``root``."""
    base = (root / compare_with).resolve()
    if base == root.resolve():
        raise ValueError(f"{root}: compare_with {compare_with!r} names this study itself; name the output "
                         f"directory of the study it varies, relative to {root}")
    if not (base / STUDY_FILE).is_file():
        raise FileNotFoundError(f"{root}: compare_with {compare_with!r} is {base}, not a study directory (no "
                                f"{STUDY_FILE}); name the output directory of the study this one varies, relative "
                                f"to {root}")
    return base


def write_report(output: str | Path, notes: str = "") -> dict[str, str]:
    """Aggregate a study directory into ``results.json``, ``report.md`` and its figures: top-1 against
    size (``top1_vs_size.png``, ``headline.png``) and validation top-1 against epoch (``learning.png``)."""
    root = Path(output)
    cfg = read_study_file(root)
    records = _cells(root, cfg)
    if not records:
        raise FileNotFoundError(f"{root}: no finished cells yet")
    summary = aggregate(records, cfg.get("reference", "lh-90"))
    tuned = bool((cfg.get("eval") or {}).get("tune_knobs"))  # else "tuned" numbers are the defaults
    plot = plot_study(summary, root / "top1_vs_size.png", tuned)
    top = plot_headline(summary, root / "headline.png", records, tuned)
    learning = plot_learning(summary, root / "learning.png")
    notes_file = root / "notes.md"
    if not notes and notes_file.is_file():
        notes = notes_file.read_text().strip()
    claims = paper_claims(records, cfg["encodings"], tuned)
    results = {"study": cfg["name"], "config": cfg, "reference": cfg.get("reference", "lh-90"),
               "cells": records, "summary": summary, "paper_claims": claims}
    section = figure = ""
    if cfg.get("compare_with"):
        base = base_study(root, cfg["compare_with"])
        base_cfg = read_study_file(base)
        # "tuned" is set against "tuned" only where both studies tuned their knobs (else it is the defaults there)
        both_tuned = tuned and bool((base_cfg.get("eval") or {}).get("tune_knobs"))
        cmp = against_base(records, _cells(base, base_cfg))
        figure = plot_against(cmp, root / "against.png", base_cfg["name"], both_tuned) if cmp else ""
        results["against"] = {"study": base_cfg["name"], "compare_with": cfg["compare_with"], "tuned": both_tuned,
                              "datasets": cmp}
        section = against_markdown(base_cfg["name"], cfg["compare_with"], cmp, both_tuned,
                                   Path(figure).name if figure else "")
    write_atomic(root / "results.json", lambda p: p.write_text(json.dumps(results, indent=1)))
    planned = len(cfg["datasets"]) * len(cfg["encodings"]) * len(cfg["seeds"])
    seconds = sum(sum(CellFiles.of(root, r["dataset"], r["encoding"], r["seed"]).timing().values())
                  for r in records)  # finished cells only
    progress = f"Cells finished: {len(records)} of {planned} ({seconds / 3600:.1f} CPU-hours of one-thread cells)."
    if len(records) < planned:
        progress += " The study is not complete: rerun its command to finish it; intervals are over the seeds done."
    (root / "report.md").write_text(markdown(cfg["name"], summary, results["reference"], notes, progress,
                                             plot=Path(plot).name, headline_plot=Path(top).name, claims=claims,
                                             learning_plot=Path(learning).name, tuned=tuned)
                                    + "\n" + (section + "\n" if section else "") + provenance(records))
    return {"results": str(root / "results.json"), "report": str(root / "report.md"), "plot": plot, "headline": top,
            "learning": learning, **({"against": figure} if figure else {})}
