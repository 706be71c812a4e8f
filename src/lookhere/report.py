"""Side-by-side reports of several evaluated models: Markdown with PNG plots, and one HTML page."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from .evaluate import knob_label, plot_accuracy
from .io import write_atomic


def find_eval(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p, p / "eval.json", p / "eval" / "eval.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{p}: no eval.json (run `lookhere eval --checkpoint {p} --output {p}/eval` first)")


def read_eval(path: str | Path) -> dict[str, Any]:
    """The results of ``lookhere eval`` that ``path`` holds (a run, its ``eval`` folder or its eval.json)."""
    p = find_eval(path)
    try:
        results = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a readable eval.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("sizes"), dict):
        raise ValueError(f"{p}: not an eval.json written by lookhere eval (no sizes)")
    return results


def _run_name(path: str | Path) -> str:
    """The run's folder name, also when given its ``eval`` folder or ``eval.json``."""
    p = Path(path)
    if p.name == "eval.json":
        p = p.parent
    return p.parent.name if p.name == "eval" else p.name


def _metric_table(runs: dict[str, dict[str, Any]], metric: str, fmt: str = "{:.4f}") -> list[str]:
    sizes = sorted({int(s) for r in runs.values() for s in r["sizes"]})
    lines = ["| size | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for s in sizes:
        cells = []
        for r in runs.values():
            m = r["sizes"].get(str(s))
            cells.append(fmt.format(m[metric]) if m else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def compare(run_dirs: list[str | Path], out_dir: str | Path, names: list[str] | None = None,
            title: str = "Comparison", notes: str = "") -> dict[str, str]:
    """Write ``report.md``, ``report.html`` and plots comparing the runs' ``eval.json``."""
    names = list(names) if names else [_run_name(d) for d in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"--names: give one name per run ({len(run_dirs)} runs, {len(names)} names)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two or more runs are named {', '.join(repeated)}; name each with --names")
    runs = {name: read_eval(d) for name, d in zip(names, run_dirs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {m: plot_accuracy(runs, out / f"{m}_vs_size.png", metric=m) for m in ("top1", "nll", "ece")}
    md = [f"# {title}", ""]
    if notes:
        md += [notes, ""]
    # what every number of a run was measured with, beside those numbers (as each run's eval.md says it)
    for n, r in runs.items():
        if r.get("knobs_given"):
            md += [f"**{n}**: every size with the test-time setting given: {knob_label(r['knobs_given'])}", ""]
    lists = [n for n, r in runs.items() if r.get("label_lists")]
    if lists:
        md += [f"**{', '.join(lists)}**: {runs[lists[0]]['label_lists']}", ""]
    md += ["![top-1 vs size](top1_vs_size.png)", ""]
    for metric, label in (("top1", "Top-1 accuracy"), ("top5", "Top-5 accuracy"), ("nll", "NLL"),
                          ("ece", "Expected calibration error (15 bins)")):
        md += [f"## {label}", ""] + _metric_table(runs, metric) + [""]
    adv = {n: r["adversarial"] for n, r in runs.items() if r.get("adversarial")}
    if adv:
        keys = sorted({k for a in adv.values() for k in a if k != "n"})
        md += ["## Robust top-1 at the training size", "", "| attack | " + " | ".join(adv) + " |",
               "|---|" + "---:|" * len(adv)]
        md += [f"| {k} | " + " | ".join(f"{a.get(k, float('nan')):.4f}" for a in adv.values()) + " |" for k in keys]
        md.append("")
    obj = {n: r["by_object_size"] for n, r in runs.items() if r.get("by_object_size")}
    if obj:
        md += ["## Accuracy change from the training size, by object-size quintile", ""]
        for n, o in obj.items():
            e = o["quintile_edges"]
            md += [f"**{n}**", "", "| size | " + " | ".join(f"{e[i]:.2f}-{e[i + 1]:.2f}" for i in range(5)) + " |",
                   "|---:|" + "---:|" * 5]
            md += [f"| {s} | " + " | ".join(f"{v:+.4f}" for v in row) + " |" for s, row in o["accuracy_change"].items()]
            md.append("")
    md += ["## Other plots", "", "![NLL vs size](nll_vs_size.png)", "", "![ECE vs size](ece_vs_size.png)", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_html(text, out, title))
    write_atomic(out / "results.json", lambda p: p.write_text(json.dumps(runs, indent=2)))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), **plots}


def _html(markdown: str, folder: Path, title: str) -> str:
    """A self-contained page: tables and headings from the Markdown, images inlined as base64."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rest}</tbody></table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("!["):
            src = line[line.index("(") + 1: line.rindex(")")]
            data = base64.b64encode((folder / src).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(src)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(line)) + "</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
