"""Task accuracy of base and tuned on the same questions, paired (from the run's generations files).

Reads both models' generations files, pairs the rows by question idx, and gives each
model's accuracy with a Wilson 95% interval and tuned - base with a paired bootstrap CI and an
exact McNemar p (`circuitdiff.stats.accuracy_difference`).
"""

from __future__ import annotations

from pathlib import Path

from circuitdiff.grade import accuracy
from circuitdiff.report.html import Section, Table
from circuitdiff.stats import accuracy_difference
from circuitdiff.store import artifacts, layout

N_BOOT = 10000


def accuracy_rows(run_dir: str | Path, n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """One row per dataset answered by both models: accuracies, their CIs, the paired difference."""
    run_dir = Path(run_dir)
    rows = []
    tuned_files = layout.find_generations(run_dir, "tuned")
    for dataset in layout.find_generations(run_dir, "base"):
        if dataset not in tuned_files:
            continue
        base = {r["idx"]: bool(r["correct"]) for r in artifacts.read_generations(run_dir, "base", dataset)}
        tuned = {r["idx"]: bool(r["correct"]) for r in artifacts.read_generations(run_dir, "tuned", dataset)}
        common = sorted(set(base) & set(tuned))
        if not common:
            continue
        b, t = [base[i] for i in common], [tuned[i] for i in common]
        acc_b, acc_t = accuracy(b), accuracy(t)
        d = accuracy_difference(b, t, n_boot=n_boot, seed=seed)
        rows.append({
            "dataset": dataset, "n_questions": d.n,
            "base": acc_b.accuracy, "base_ci_low": acc_b.ci_low, "base_ci_high": acc_b.ci_high,
            "tuned": acc_t.accuracy, "tuned_ci_low": acc_t.ci_low, "tuned_ci_high": acc_t.ci_high,
            "diff": d.diff, "diff_ci_low": d.diff_ci[0], "diff_ci_high": d.diff_ci[1],
            "only_base": d.base_only, "only_tuned": d.tuned_only, "p_mcnemar": d.p_mcnemar,
            "conventions": (f"greedy answers graded by circuitdiff.grade; per-model CI: Wilson 95%; diff CI: paired "
                            f"bootstrap percentile 95% over questions ({n_boot} resamples, seed {seed}); exact McNemar"),
        })  # fmt: skip
    return rows


def accuracy_section(ctx) -> list[Section]:
    rows = accuracy_rows(ctx.run_dir, seed=ctx.settings.seed)
    if not rows:
        return []
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    table = Table(
        ["dataset", "n", "base [95% CI]", "tuned [95% CI]", "tuned - base [95% CI]", "only base / only tuned", "McNemar p"],
        [[r["dataset"], str(r["n_questions"]),
          f"{pct(r['base'])} [{pct(r['base_ci_low'])}, {pct(r['base_ci_high'])}]",
          f"{pct(r['tuned'])} [{pct(r['tuned_ci_low'])}, {pct(r['tuned_ci_high'])}]",
          f"{100 * r['diff']:+.1f} pts [{100 * r['diff_ci_low']:+.1f}, {100 * r['diff_ci_high']:+.1f}]",
          f"{r['only_base']} / {r['only_tuned']}", f"{r['p_mcnemar']:.3g}"] for r in rows],
    )  # fmt: skip
    return [Section("Task accuracy", "Both models, the same questions: " + rows[0]["conventions"] + ".",
                    [table])]
