"""The fault-injection table of docs/reliability.md: kill -9 at seeded write points of every stage, then
resume; damage every kind of artifact three ways, then rerun. The same cases as tests/test_faults.py.

    python benchmarks/faults_table.py [--per-stage 2] [--seed 0]

Prints two markdown tables (kill points; damaged artifacts) and the time they took. A small run of tiny
random models with every stage (validation and intervention included), the CLI in a fresh process per run,
two cases side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import faults  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-stage", type=int, default=2, help="kill points drawn per stage (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="circuitdiff-faults-"))
    started = time.time()
    try:
        config = faults.make_world(root)
        reference_run, log = root / "reference", root / "points.log"
        result = faults.run_all(config, reference_run, fault_log=log)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-2000:])
        reference = faults.snapshot(reference_run)
        n_points = len(log.read_text().splitlines())
        points = faults.kill_points(log, args.per_stage, args.seed)
        kills = faults.kill_cases(config, root, reference, points)
        print(f"Kill -9 at {len(points)} of the {n_points} write points of an uninterrupted run (seed {args.seed}), "
              "then the same command again; outcome against the uninterrupted run (every file but manifest.json, "
              "byte for byte):\n")
        print("| write point | stage | killed after | outcome |")
        print("|---|---|---|---|")
        for (number, stage, what), outcome in zip(points, kills):
            print(f"| {number} | {stage} | {what} | {outcome} |")

        outcomes = faults.damage_cases(config, root, reference_run, reference)
        print("\nOne artifact of a finished run damaged, then the same command again (recomputed: every output equal "
              "to the undamaged run again; error: the one line the command printed, exit 2):\n")
        print("| artifact | damage | outcome |")
        print("|---|---|---|")
        for (kind, how), outcome in outcomes.items():
            print(f"| {kind} (`{faults.ARTIFACTS[kind]}`) | {how} | {outcome.replace(str(root), '<tmp>')} |")
        print(f"\n{len(points)} kill cases and {len(outcomes)} damage cases in {time.time() - started:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
