"""track.csv and track.png: one row per (training run, step, objective, scale, metric), rebuilt from the
track directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.metrics import METRIC_LABELS, SCALE_FREE, SCALED_METRICS
from circuitdiff.store import layout

SCALES = ("raw", "unit")
CSV_COLUMNS = [
    "run", "algorithm", "temperature", "shuffle_rewards", "step", "accuracy", "acc_ci_low", "acc_ci_high", "correct",
    "total", "objective", "scale", "metric", "diff", "diff_ci_low", "diff_ci_high", "base", "tuned", "p_perm",
    "question_set", "text", "n_samples", "n_set", "n_set_correct", "entries", "bins", "range", "log_base", "alpha",
    "n_requested", "loss", "ci_method", "dataset", "checkpoint", "note",
]  # fmt: skip


def combos(objectives) -> list[tuple[str, str, str]]:
    """(objective, scale, metric) of every tracked number."""
    return [(o, sc, m) for o in objectives for sc in SCALES for m in SCALED_METRICS[sc]]


def rows(out: Path, registry: dict, s, ds: str, starts: dict[str, Path]) -> list[dict]:
    """track.csv's rows: step 0 (the start's accuracy, differences 0) then every evaluated checkpoint."""
    rows = []
    nan = float("nan")
    for label, info in registry["runs"].items():
        common = {"run": label, "algorithm": info["algorithm"], "temperature": info["temperature"],
                  "shuffle_rewards": info.get("shuffle_rewards", False), "entries": s.entries, "bins": s.bins,
                  "log_base": s.log_base, "alpha": s.alpha, "n_requested": s.n_samples, "dataset": ds,
                  "question_set": s.question_set, "text": s.text}
        start = starts[label]
        if layout.generations_meta(start, "base", ds).exists():
            acc = io.read_json(layout.generations_meta(start, "base", ds))["accuracy"]
            for objective, scale, metric in combos(s.objectives):
                rows.append({**common, **_acc_cols(acc), "step": 0, "objective": objective, "scale": scale,
                             "metric": metric, "diff": 0.0, "diff_ci_low": 0.0, "diff_ci_high": 0.0,
                             "checkpoint": info["base"], "note": "the starting model: difference 0 by definition"})
        results = [io.read_json(path) for path in layout.find_track_results(out, label)]
        for r in sorted(results, key=lambda r: r["step"]):
            for objective, scale, metric in combos(s.objectives):
                m = ((r.get("metrics") or {}).get(objective) or {}).get(scale, {}).get(metric)
                rows.append({**common, **_acc_cols(r["accuracy"]), "step": r["step"], "objective": objective,
                             "scale": scale, "metric": metric,
                             "diff": m["diff"] if m else nan, "diff_ci_low": m["diff_ci"][0] if m else nan,
                             "diff_ci_high": m["diff_ci"][1] if m else nan, "base": m["base"] if m else nan,
                             "tuned": m["tuned"] if m else nan, "p_perm": m["p_perm"] if m else nan,
                             "range": (r.get("range") or {}).get(objective, "") if scale == "raw" else "shared by the pair",
                             "n_samples": r.get("n_samples", 0), "n_set": r.get("n_set", ""),
                             "n_set_correct": r.get("n_set_correct", ""), "loss": (r.get("loss") or {}).get(objective, ""),
                             "ci_method": r.get("ci_method", ""), "checkpoint": r["checkpoint"],
                             "note": r.get("note", "")})
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


def panels(objectives) -> list[tuple]:
    """(objective, scale, metric) of each figure panel after accuracy: scale-free metrics once (raw)."""
    return [(o, sc, m) for o, sc, m in combos(objectives) if not (sc == "unit" and m in SCALE_FREE)]


def figure(rows: list[dict], s) -> bytes:
    """Accuracy and each metric difference vs step, one line per training run, 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from circuitdiff.report.figures import to_png

    keys = [None] + panels(s.objectives)
    ncol = 3
    nrow = -(-len(keys) // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    axes = list(grid.ravel())
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first_combo = combos(s.objectives)[0]
    for k, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        head = mine[0]
        name = f"{run} ({head['algorithm']}{', shuffled' if head['shuffle_rewards'] else ''}, T={head['temperature']:g})"
        color = colors[k % len(colors)]
        for ax, key in zip(axes, keys):
            if key is None:
                pts = [r for r in mine if (r["objective"], r["scale"], r["metric"]) == first_combo]
                y, lo, hi = ("accuracy", "acc_ci_low", "acc_ci_high")
            else:
                pts = [r for r in mine if (r["objective"], r["scale"], r["metric"]) == key]
                y, lo, hi = ("diff", "diff_ci_low", "diff_ci_high")
            x = np.array([r["step"] for r in pts], dtype=float)
            ax.plot(x, np.array([r[y] for r in pts], dtype=float), "o-", color=color, label=name, ms=3)
            ax.fill_between(x, [r[lo] for r in pts], [r[hi] for r in pts], color=color, alpha=0.15, lw=0)
    for ax, key in zip(axes, keys):
        if key is None:
            ax.set_title("test accuracy (95% Wilson CI)", fontsize=8)
        else:
            objective, scale, metric = key
            scale_text = "scale-free" if metric in SCALE_FREE else f"{scale} scale"
            ax.set_title(f"Δ {METRIC_LABELS[metric]} ({objective}, {scale_text})", fontsize=8)
            ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("training step", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys):]:
        ax.axis("off")
    if runs:
        axes[0].legend(fontsize=6)
    fig.suptitle(f"{s.dataset} {s.split}: checkpoint − start at alpha={s.alpha}, {s.question_set} question set, {s.text} answers "
                 f"(entries={s.entries}, {s.bins} bins, paired bootstrap 95% CI)", fontsize=9)
    fig.tight_layout()
    return to_png(fig)


def describe(label: str, r: dict, s, seconds: float) -> str:
    acc = r["accuracy"]
    text = f"track {label} step {r['step']}: accuracy {acc['accuracy']:.1%} ({acc['correct']}/{acc['total']})"
    if r.get("metrics"):
        raw = r["metrics"][s.objectives[0]]["raw"]
        text += f"; {s.objectives[0]}, raw: " + ", ".join(f"Δ{METRIC_LABELS[m]} {v['diff']:+.3g}" for m, v in raw.items())
        text += f" (n={r['n_samples']}, alpha={s.alpha}, {s.question_set} set, {s.text} answers)"
    if r.get("note"):
        text += f"; {r['note']}"
    return text + f" [{seconds:.0f}s]"
