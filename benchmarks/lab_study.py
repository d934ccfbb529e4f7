"""The controlled study: GRPO (t=0.6, t=1.0) against SFT, DPO and two null fine-tunes, from one base.

    python benchmarks/lab_study.py --out runs/study [--steps 30] [--save-every 10] [--n-boot 2000]

Every run starts from SmolLM2-135M-Instruct, trains on the same 180 `arith` train problems with the
same LoRA (r 8 on every projection), learning rate (3e-4, constant), seed (0), step count and
question budget (4 questions per step: GRPO 4 x 4 samples, the others batch 4), cap (64 new
tokens) and prompt:
  grpo-t0.6, grpo-t1.0    GRPO with the DAPO loss and dynamic sampling, temperature 0.6 / 1.0
  grpo-shuffled           grpo-t0.6 with the rewards permuted within each step (null control)
  sft                     SFT on the gold worked solutions
  dpo                     DPO on pairs from the base's own samples (4 per question at T 0.6)
  self-distill            SFT on the base's own greedy, finished, correct answers (null control)
Then `circuitdiff track` evaluates every checkpoint on the 183 `arith` test problems: accuracy, and
the metric differences on ONE fixed question set (chosen from the start and every checkpoint of
every run), objectives nll and logit, scales raw and unit. Each command resumes, so a killed study
reruns from where it stopped. Writes OUT/times.json, OUT/track/track.csv|png, and the study table
docs/results/lab_study.csv (--csv) with the columns the docs describe.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = ["--dataset", "arith", "--lr", "3e-4", "--max-completion-length", "64", "--seed", "0"]
RUNS = {
    "grpo-t0.6": ["grpo", "--temperature", "0.6", "--questions-per-step", "4", "--num-generations", "4"],
    "grpo-t1.0": ["grpo", "--temperature", "1.0", "--questions-per-step", "4", "--num-generations", "4"],
    "grpo-shuffled": ["grpo", "--temperature", "0.6", "--questions-per-step", "4", "--num-generations", "4",
                      "--shuffle-rewards"],
    "sft": ["sft", "--batch-size", "4"],
    "dpo": ["dpo", "--batch-size", "4", "--temperature", "0.6", "--dpo-samples", "4"],
    "self-distill": ["self-distill", "--batch-size", "4"],
}
STUDY_COLUMNS = ["method", "temperature", "shuffle_rewards", "step", "accuracy", "acc_ci_low", "acc_ci_high",
                 "n_questions", "metric", "scale", "objective", "text", "diff", "ci_low", "ci_high", "p_perm", "base", "tuned",
                 "n_samples", "n_set", "n_set_correct", "question_set", "range", "entries", "bins", "alpha"]


def timed(cmd: list[str], times: dict, name: str, out: Path) -> None:
    start = time.time()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    runs = times.get(name, [])  # seconds of each invocation: a resumed step adds to, never replaces, its first one
    times[name] = [*(runs if isinstance(runs, list) else [runs]), round(time.time() - start, 1)]
    (out / "times.json").write_text(json.dumps(times, indent=2))


def study_rows(track_csv: Path, text: str) -> list[dict]:
    with open(track_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"method": r["run"], "temperature": r["temperature"], "shuffle_rewards": r["shuffle_rewards"],
             "step": r["step"], "accuracy": r["accuracy"], "acc_ci_low": r["acc_ci_low"],
             "acc_ci_high": r["acc_ci_high"], "n_questions": r["total"], "metric": r["metric"], "scale": r["scale"],
             "objective": r["objective"], "text": r.get("text") or text, "diff": r["diff"], "ci_low": r["diff_ci_low"], "ci_high": r["diff_ci_high"],
             "p_perm": r["p_perm"], "base": r["base"], "tuned": r["tuned"], "n_samples": r["n_samples"],
             "n_set": r["n_set"], "n_set_correct": r["n_set_correct"], "question_set": r["question_set"],
             "range": r["range"], "entries": r["entries"], "bins": r["bins"], "alpha": r["alpha"]} for r in rows]


SUMMARY = [("nll", "raw", "activation_intensity", "Δ Intensity (nll, raw)"),
           ("nll", "unit", "information_complexity", "Δ Info. Complexity (nll, unit)"),
           ("logit", "raw", "activation_intensity", "Δ Intensity (logit, raw)"),
           ("logit", "unit", "information_complexity", "Δ Info. Complexity (logit, unit)"),
           ("nll", "raw", "distribution_kurtosis", "Δ Kurtosis (nll)"),
           ("logit", "raw", "distribution_kurtosis", "Δ Kurtosis (logit)"),
           ("nll", "raw", "diversity", "Δ Diversity (nll)")]


def summary_table(rows: list[dict], percent: bool = False, steps: list[str] | None = None) -> str:
    """Markdown: per method and checkpoint, accuracy [CI] and the SUMMARY differences [CI] (arrow: CI excludes 0);
    `percent`: differences in % of the start's value; `steps`: only these checkpoint steps."""
    def cell(r: dict) -> str:
        d, lo, hi = (float(r[k]) for k in ("diff", "ci_low", "ci_high"))
        if d != d:
            return "n/a"
        arrow = " ↑" if lo > 0 else " ↓" if hi < 0 else ""
        if percent:
            base = abs(float(r["base"]))
            return f"{100 * d / base:+.1f}% [{100 * lo / base:+.1f}, {100 * hi / base:+.1f}]{arrow}"
        return f"{d:+.3g} [{lo:+.3g}, {hi:+.3g}]{arrow}"

    head = "| method | step | accuracy [95% CI] | n | " + " | ".join(label for *_, label in SUMMARY) + " |"
    lines = [head, "|" + "---|" * (4 + len(SUMMARY))]
    index = {(r["method"], r["step"], r["objective"], r["scale"], r["metric"]): r for r in rows}
    for method, step in dict.fromkeys((r["method"], r["step"]) for r in rows if r["step"] != "0"):
        if steps and step not in steps:
            continue
        first = index[(method, step, *SUMMARY[0][:3])]
        acc = (f"{100 * float(first['accuracy']):.1f}% [{100 * float(first['acc_ci_low']):.1f}, "
               f"{100 * float(first['acc_ci_high']):.1f}]")
        cells = [cell(index[(method, step, o, sc, m)]) for o, sc, m, _ in SUMMARY]
        lines.append(f"| {method} | {step} | {acc} | {first['n_samples']} | " + " | ".join(cells) + " |")
    start = next(r for r in rows if r["step"] == "0")
    lines.append(f"\nstart (step 0): accuracy {100 * float(start['accuracy']):.1f}% "
                 f"[{100 * float(start['acc_ci_low']):.1f}, {100 * float(start['acc_ci_high']):.1f}] "
                 f"on {start['n_questions']} questions; metrics on the fixed set, {start.get('text', 'own')} answers, "
                 f"alpha {start['alpha']}, entries {start['entries']}, {start['bins']} bins"
                 + ("; differences in % of the start's value" if percent else ""))
    return "\n".join(lines)


def losses(track_dir: Path, step: int) -> str:
    """Per run at `step`: the mean objective (nll) of the scored answers and the nll raw intensity, as ratios to the
    start's, from the W files (their `loss` and `scores`)."""
    import numpy as np

    from circuitdiff.lab.settings import TrackSettings
    from circuitdiff.store import layout
    from circuitdiff.store.artifacts import Attribution

    (start,) = track_dir.glob("start-*")
    text = json.loads(layout.track_question_set(start).read_text()).get("text", "own")
    scored = TrackSettings(text=text).scored_text()
    base = Attribution.load(layout.attribution(start, "base", "arith", 0.1, objective="nll"))
    lines = [f"start: mean NLL {np.mean(base.loss):.3f} nats, mean |W| {np.abs(base.scores).mean():.4g} ({text} answers)"]
    for run in sorted((track_dir / "runs").iterdir()):
        path = layout.attribution(layout.track_checkpoint(track_dir, run.name, step), "tuned", "arith", 0.1, scored,
                                  objective="nll")
        if path.exists():
            w = Attribution.load(path)
            lines.append(f"{run.name} step {step}: mean NLL {np.mean(w.loss):.3f} (x{np.mean(w.loss) / np.mean(base.loss):.2f}), "
                         f"mean |W| x{np.abs(w.scores).mean() / np.abs(base.scores).mean():.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the study folder (required unless --table)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--csv", default="docs/results/lab_study.csv")
    p.add_argument("--text", choices=["own", "start"], default="start",
                   help="start (default): every checkpoint scored on the start model's answers (the fixed set then "
                        "needs only the start correct); own: each on its own answers (the set needs every checkpoint "
                        "correct: 3 questions here)")
    p.add_argument("--table", help="only print the summary table of this study csv")
    p.add_argument("--losses", help="print each run's mean NLL and nll intensity vs the start's from this track folder")
    p.add_argument("--percent", action="store_true", help="with --table: differences in % of the start's value")
    p.add_argument("--table-steps", nargs="+", help="with --table: only these checkpoint steps")
    args = p.parse_args()
    if args.losses:
        print(losses(Path(args.losses), int((args.table_steps or ["30"])[0])))
        return
    if args.table:
        with open(args.table, newline="") as f:
            print(summary_table(list(csv.DictReader(f)), args.percent, args.table_steps))
        return
    if not args.out:
        p.error("--out is required (the study folder)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    exe = [sys.executable, "-m", "circuitdiff"]
    for name in args.runs:
        cmd = exe + ["train", *RUNS[name], *RECIPE, "--steps", str(args.steps), "--save-every", str(args.save_every),
                     "--out", str(out / name)]
        timed(cmd, times, f"train {name}", out)
    track_out = out / ("track" if args.text == "own" else f"track-{args.text}")
    track = exe + ["track", *[str(out / name) for name in args.runs], "--dataset", "arith", "--n-boot",
                   str(args.n_boot), "--text", args.text, "--out", str(track_out)]
    timed(track, times, f"track {args.text}", out)
    rows = study_rows(track_out / "track.csv", args.text)
    target = Path(args.csv)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, STUDY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(summary_table(rows))
    print(f"wrote {target} ({len(rows)} rows); times (s): {json.dumps(times)}")


if __name__ == "__main__":
    main()
