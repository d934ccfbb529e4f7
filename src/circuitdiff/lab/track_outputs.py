"""track.csv and track.png: one row per (training run, step, metric), rebuilt from the track directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.store import layout

TRACK_METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis")
CSV_COLUMNS = [
    "run", "algorithm", "temperature", "step", "accuracy", "acc_ci_low", "acc_ci_high", "correct", "total",
    "metric", "diff", "diff_ci_low", "diff_ci_high", "base", "tuned", "p_perm",
    "entries", "bins", "range", "log_base", "alpha", "n_samples", "n_requested", "loss", "ci_method",
    "dataset", "checkpoint", "note",
]  # fmt: skip


def rows(out: Path, registry: dict, s, ds: str, starts: dict[str, Path]) -> list[dict]:
    """track.csv's rows: step 0 (the start's accuracy, differences 0) then every evaluated checkpoint."""
    rows = []
    for label, info in registry["runs"].items():
        common = {"run": label, "algorithm": info["algorithm"], "temperature": info["temperature"],
                  "entries": s.entries, "bins": s.bins, "log_base": s.log_base, "alpha": s.alpha,
                  "n_requested": s.n_samples, "dataset": ds}
        start = starts[label]
        if layout.generations_meta(start, "base", ds).exists():
            acc = io.read_json(layout.generations_meta(start, "base", ds))["accuracy"]
            for metric in TRACK_METRICS:
                rows.append({**common, **_acc_cols(acc), "step": 0, "metric": metric, "diff": 0.0,
                             "diff_ci_low": 0.0, "diff_ci_high": 0.0, "checkpoint": info["base"],
                             "note": "the starting model: difference 0 by definition"})
        results = [io.read_json(path) for path in layout.find_track_results(out, label)]
        for r in sorted(results, key=lambda r: r["step"]):
            for metric in TRACK_METRICS:
                m = (r.get("metrics") or {}).get(metric)
                nan = float("nan")
                rows.append({**common, **_acc_cols(r["accuracy"]), "step": r["step"], "metric": metric,
                             "diff": m["diff"] if m else nan, "diff_ci_low": m["diff_ci"][0] if m else nan,
                             "diff_ci_high": m["diff_ci"][1] if m else nan, "base": m["base"] if m else nan,
                             "tuned": m["tuned"] if m else nan, "p_perm": m["p_perm"] if m else nan,
                             "range": r.get("range", ""), "n_samples": r.get("n_samples", 0),
                             "loss": r.get("loss", ""), "ci_method": r.get("ci_method", ""),
                             "checkpoint": r["checkpoint"], "note": r.get("note", "")})
    return rows


def _acc_cols(acc: dict) -> dict:
    return {"accuracy": acc["accuracy"], "acc_ci_low": acc["ci_low"], "acc_ci_high": acc["ci_high"],
            "correct": acc["correct"], "total": acc["total"]}


def write_outputs(out: Path, registry: dict, s, ds: str, starts: dict[str, Path]) -> Path:
    """Rebuild track.csv and track.png (atomically) from what the track directory holds."""
    from circuitdiff.report.tables import to_csv

    table = rows(out, registry, s, ds, starts)
    io.write_text(layout.track_csv(out), to_csv(table, CSV_COLUMNS))
    io.write_bytes(layout.track_figure(out), figure(table, s))
    return layout.track_csv(out)


def figure(rows: list[dict], s) -> bytes:
    """Accuracy and each metric difference vs step, one line per training run, 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from circuitdiff.metrics import METRIC_LABELS
    from circuitdiff.report.figures import to_png

    panels = [("accuracy", "Test accuracy")] + [(m, f"Δ {METRIC_LABELS[m]} (checkpoint − start)") for m in TRACK_METRICS]
    fig, grid = plt.subplots(2, 2, figsize=(9.5, 7.0))
    axes = list(grid.ravel())
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        first = mine[0]
        name = f"{run} ({first['algorithm']}, T={first['temperature']:g})"
        color = colors[k % len(colors)]
        for ax, (key, _) in zip(axes, panels):
            if key == "accuracy":
                pts = [r for r in mine if r["metric"] == TRACK_METRICS[0]]
                y, lo, hi = ("accuracy", "acc_ci_low", "acc_ci_high")
            else:
                pts = [r for r in mine if r["metric"] == key]
                y, lo, hi = ("diff", "diff_ci_low", "diff_ci_high")
            x = np.array([r["step"] for r in pts], dtype=float)
            v = np.array([r[y] for r in pts], dtype=float)
            ax.plot(x, v, "o-", color=color, label=name, ms=4)
            ax.fill_between(x, [r[lo] for r in pts], [r[hi] for r in pts], color=color, alpha=0.2, lw=0)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "accuracy":
            ax.axhline(0.0, color="0.5", lw=0.8)
    if runs:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{s.dataset} {s.split}: greedy accuracy (95% Wilson CI)\nmetric differences at alpha={s.alpha} "
                 f"(entries={s.entries}, {s.bins} bins, paired bootstrap 95% CI)", fontsize=9)
    fig.tight_layout()
    return to_png(fig)


def describe(label: str, r: dict, s, seconds: float) -> str:
    acc = r["accuracy"]
    text = f"track {label} step {r['step']}: accuracy {acc['accuracy']:.1%} ({acc['correct']}/{acc['total']})"
    if r.get("metrics"):
        text += "; " + ", ".join(f"Δ{m.split('_')[1][:4]} {r['metrics'][m]['diff']:+.3g}" for m in TRACK_METRICS)
        text += f" (n={r['n_samples']}, alpha={s.alpha})"
    else:
        text += f"; {r['note']}"
    return text + f" [{seconds:.0f}s]"
