"""The direction of every tuned - base difference under each control, from a report's metrics.csv.

    python benchmarks/controls_table.py runs/demo/report/metrics.csv [--alpha 0.1] [--entries all]

Rows: method (eap, and eap-ig when the run has it) x objective (nll, logit) x text (own; same text = both models on the base's / the tuned
model's answers). Columns: Activation Intensity (raw; on the unit scale it is 1 by
construction), Information Complexity on the raw and the unit scale, Distribution Kurtosis and
Diversity (both scale-free: their raw and unit values agree). A cell is tuned - base as a
percentage of the base value, with the 95% paired-bootstrap CI of the difference divided by the
same base value, and an arrow where that CI excludes 0. The last row says, per column, in how
many rows the change is up / down / not resolved.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter

COLUMNS = [("activation_intensity", "raw", "Act. Intensity"), ("information_complexity", "raw", "Info. Complexity (raw)"),
           ("information_complexity", "unit", "Info. Complexity (unit)"),
           ("distribution_kurtosis", "raw", "Dist. Kurtosis"), ("diversity", "raw", "Diversity")]
TEXTS = {"own": "own text", "base": "same text: base's answers", "tuned": "same text: tuned's answers"}


def cell(diff: dict, base: dict) -> tuple[str, str]:
    b = float(base["value"])
    pct = lambda x: 100 * float(x) / abs(b)  # noqa: E731
    lo, hi = float(diff["ci_low"]), float(diff["ci_high"])
    arrow = "↑" if lo > 0 else "↓" if hi < 0 else ""
    return f"{pct(diff['value']):+.1f}% [{pct(lo):+.1f}, {pct(hi):+.1f}] {arrow}".rstrip(), arrow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics_csv")
    p.add_argument("--alpha", default="0.1")
    p.add_argument("--entries", default="all")
    p.add_argument("--dataset", help="default: the first in the file")
    args = p.parse_args()
    with open(args.metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["alpha"] == args.alpha and r["entries"] == args.entries]
    dataset = args.dataset or rows[0]["dataset"]
    method = lambda r: r.get("method") or "eap"  # noqa: E731  (files from before the method column: EAP)
    index = {(method(r), r["objective"], r["text"], r["metric"], r["scale"], r["role"]): r
             for r in rows if r["dataset"] == dataset}
    methods = sorted({key[0] for key in index}, key=lambda m: (m != "eap", m))
    n = {r["n_samples"] for r in rows if r["dataset"] == dataset}
    print(f"{dataset}, alpha {args.alpha}, entries {args.entries}, n = {'/'.join(sorted(n))}: tuned - base in % of "
          "the base value [95% CI]; arrow where the CI excludes 0\n")
    print("| method | objective | text | " + " | ".join(label for *_, label in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    tally: dict[str, Counter] = {label: Counter() for *_, label in COLUMNS}
    for m in methods:
        for objective in ("nll", "logit"):
            for text, title in TEXTS.items():
                if (m, objective, text, "activation_intensity", "raw", "diff") not in index:
                    continue
                cells = []
                for metric, scale, label in COLUMNS:
                    text_cell, arrow = cell(index[(m, objective, text, metric, scale, "diff")],
                                            index[(m, objective, text, metric, scale, "base")])
                    cells.append(text_cell)
                    tally[label][{"↑": "up", "↓": "down", "": "not resolved"}[arrow]] += 1
                print(f"| {m} | {objective} | {title} | " + " | ".join(cells) + " |")
    summary = [", ".join(f"{k} {v}" for k, v in sorted(tally[label].items())) for *_, label in COLUMNS]
    print("| **all controls** | | | " + " | ".join(summary) + " |")


if __name__ == "__main__":
    main()
