"""Evaluation reports: what `lmforge eval run --out DIR` writes, and `lmforge eval compare DIR_A DIR_B`.

    write_report(results, "out/", model="runs/tiny", settings={...})   # results: harness.TaskResult list
    print(compare("out_a/", "out_b/"))

DIR gets:
- `results.json`: per task its metrics, each with a 95% confidence interval, the chance level of a multiple-
  choice task, item count, few-shot count, timing; the settings and the bootstrap's own settings.
- `items.jsonl`: one record per item (prompt, choices and each one's log-likelihood, pick, gold; or the
  generated text and its references; per-item scores).
- `report.md`: one table to read at a glance; `results.png`: a bar per task and metric with CI whiskers.

Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13): resample the
items with replacement `RESAMPLES` times with a fixed seed, recompute the metric on each resample (the mean
for per-item metrics; the whole corpus score for BLEU, chrF and ECE, as Koehn 2004 does for BLEU), and take
the 2.5th and 97.5th percentiles. They measure the uncertainty from the finite set of items, not from the
model's training. `compare` adds a paired bootstrap of the difference when both runs scored the same items.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import __version__
from lmforge.common import LmforgeError, atomic_open, atomic_write_text, read_text_file

RESAMPLES = 1000
SEED = 1234
CONFIDENCE = 0.95
RESULTS, ITEMS, REPORT, CHART = "results.json", "items.jsonl", "report.md", "results.png"


def bootstrap_ci(metric: Any, n_items: int, resamples: int = RESAMPLES, seed: int = SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` (a harness.Metric: per-item `values` or a `corpus` function)."""
    if n_items < 2 or resamples < 1:
        v = metric.value()
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_items, size=(resamples, n_items))  # (B, n): row b is resample b's item indices
    if metric.values is not None:
        stats = np.asarray(metric.values, dtype=np.float64)[idx].mean(axis=1)
    else:
        stats = np.array([metric.value(row.tolist()) for row in idx])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def summarize(results: Sequence[Any], resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """results.json's "tasks": name -> {kind, n_items, fewshot, chance, seconds, metrics: {m: value, CI}}."""
    tasks = {}
    for r in results:
        n = len(r.records)
        metrics = {}
        for name, metric in r.metrics.items():
            low, high = bootstrap_ci(metric, n, resamples, seed)
            metrics[name] = {"value": metric.value(), "ci_low": low, "ci_high": high}
        tasks[r.task.name] = {
            "kind": r.task.kind, "source": r.task.source, "n_items": n, "fewshot": r.fewshot,
            "chance": r.task.chance(), "metrics": metrics, "skipped_metrics": list(r.task.skipped_metrics),
            "seconds": round(r.seconds, 3), "items_per_second": round(n / r.seconds, 2) if r.seconds > 0 else None}
    return tasks


def write_report(results: Sequence[Any], out: str | Path, *, model: str, settings: dict | None = None,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Write results.json, items.jsonl, report.md and results.png into `out`; returns the results.json content."""
    out = Path(out)
    doc = {"lmforge_version": __version__, "model": model, "settings": settings or {},
           "bootstrap": {"method": "percentile", "resamples": resamples, "confidence": CONFIDENCE, "seed": seed},
           "tasks": summarize(results, resamples, seed)}
    atomic_write_text(out / RESULTS, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    with atomic_open(out / ITEMS) as f:
        for r in results:
            for rec in r.records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_text(out / REPORT, markdown(doc))
    plot(doc, out / CHART)
    return doc


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.4f}"


def markdown(doc: dict) -> str:
    """report.md: a header saying what was evaluated and how, then one row per task and metric."""
    b = doc["bootstrap"]
    lines = [f"# Evaluation: `{doc['model']}`", "",
             f"lmforge {doc['lmforge_version']}; {round(b['confidence'] * 100)}% confidence intervals by "
             f"{b['method']} bootstrap over items ({b['resamples']} resamples, seed {b['seed']}). "
             "Per-item metrics are fractions (1.0 = all right); BLEU and chrF are 0-100.", "",
             "| task | items | shots | metric | score | 95% CI | chance |", "|---|---:|---:|---|---:|---|---:|"]
    for name, t in doc["tasks"].items():
        for metric, m in t["metrics"].items():
            chance = _fmt(t["chance"]) if metric in ("acc", "acc_norm", "grade") else ""
            lines.append(f"| {name} | {t['n_items']} | {t['fewshot']} | {metric} | {_fmt(m['value'])} | "
                         f"{_fmt(m['ci_low'])} – {_fmt(m['ci_high'])} | {chance} |")
    skipped = {n: t["skipped_metrics"] for n, t in doc["tasks"].items() if t.get("skipped_metrics")}
    if skipped:
        lines += ["", "Not computed (no lmforge implementation): " +
                  "; ".join(f"{n}: {', '.join(s)}" for n, s in skipped.items())]
    settings = ", ".join(f"{k}={v}" for k, v in doc.get("settings", {}).items() if v is not None)
    if settings:
        lines += ["", f"Settings: {settings}."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> Path:
    """results.png: one panel per metric, a bar per task with its CI as whiskers, chance as a dashed tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(m for t in doc["tasks"].values() for m in t["metrics"]))
    cols = min(4, max(1, len(names)))
    rows_n = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(1.5 + 2.6 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, names):
        rows = [(task, t) for task, t in doc["tasks"].items() if metric in t["metrics"]]
        x = np.arange(len(rows))
        vals = [t["metrics"][metric]["value"] for _, t in rows]
        err = [[v - t["metrics"][metric]["ci_low"] for v, (_, t) in zip(vals, rows)],
               [t["metrics"][metric]["ci_high"] - v for v, (_, t) in zip(vals, rows)]]
        ax.bar(x, vals, yerr=err, capsize=4, color="#4c72b0")
        for i, (_, t) in enumerate(rows):
            if t.get("chance") is not None and metric in ("acc", "acc_norm", "grade"):
                ax.hlines(t["chance"], i - 0.4, i + 0.4, colors="#c44e52", linestyles="dashed",
                          label="chance" if i == 0 else None)
        ax.set_xticks(x, [task for task, _ in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.set_ylim(0, 100 if metric in ("bleu", "chrf", "chrf++") else 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- compare

def load_results(folder: str | Path) -> dict:
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise LmforgeError(f"{folder} has no {RESULTS} (the --out directory of `lmforge eval run`)")
    try:
        doc = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict):
        raise LmforgeError(f"{path}: not an lmforge results file (no 'tasks')")
    return doc


def _item_scores(folder: Path) -> dict[tuple[str, int], dict]:
    """(task, index) -> per-item scores from items.jsonl ({} when the file is missing)."""
    path = folder / ITEMS
    out: dict[tuple[str, int], dict] = {}
    if path.is_file():
        for line in read_text_file(path).splitlines():
            if line.strip():
                rec = json.loads(line)
                out[(rec["task"], rec["index"])] = rec.get("scores", {})
    return out


def paired_delta_ci(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                    seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b - a) over items both runs scored (the same resample for both)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()), float(d.mean())
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(d[idx].mean(axis=1), [tail, 100 - tail])
    return float(low), float(high)


def compare(dir_a: str | Path, dir_b: str | Path) -> str:
    """Both reports side by side: per task and metric A, B (each with its CI) and B - A. When both scored the
    same items, the delta's CI is a paired bootstrap; an interval excluding 0 is marked with *."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    a, b = load_results(dir_a), load_results(dir_b)
    items_a, items_b = _item_scores(dir_a), _item_scores(dir_b)
    header = ["task", "metric", "A", "A 95% CI", "B", "B 95% CI", "B - A", "paired 95% CI"]
    rows = []
    for task in dict.fromkeys([*a["tasks"], *b["tasks"]]):
        ta, tb = a["tasks"].get(task, {}), b["tasks"].get(task, {})
        for metric in dict.fromkeys([*ta.get("metrics", {}), *tb.get("metrics", {})]):
            ma, mb = ta.get("metrics", {}).get(metric), tb.get("metrics", {}).get(metric)
            row = [task, metric]
            for m in (ma, mb):
                row += [_fmt(m["value"]), f"{_fmt(m['ci_low'])} – {_fmt(m['ci_high'])}"] if m else ["—", ""]
            if ma and mb:
                row.append(f"{mb['value'] - ma['value']:+.4f}")
                keys = sorted(k for k in items_a if k[0] == task and k in items_b
                              and metric in items_a[k] and metric in items_b[k])
                if keys and len(keys) == ta["n_items"] == tb["n_items"]:
                    low, high = paired_delta_ci([items_a[k][metric] for k in keys], [items_b[k][metric] for k in keys])
                    row.append(f"{low:+.4f} – {high:+.4f}" + (" *" if low > 0 or high < 0 else ""))
                else:
                    row.append("")
            else:
                row += ["", ""]
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"A: {dir_a}  ({a.get('model', '?')})", f"B: {dir_b}  ({b.get('model', '?')})", "",
             "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


__all__ = ["bootstrap_ci", "compare", "load_results", "markdown", "paired_delta_ci", "plot", "summarize",
           "write_report"]
