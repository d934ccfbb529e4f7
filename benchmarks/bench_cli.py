"""How fast the command line answers when it does no work: `--help`, a subcommand's help, an argument error.

    python benchmarks/bench_cli.py [--reps 5]

Each case runs in a fresh process (best of reps); the baseline is a bare `python -c pass` and
`python -c "import torch"` in the same run, to show what importing torch up front would cost.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (what importing torch costs)": [sys.executable, "-c", "import torch"],
    "circuitdiff --help": [sys.executable, "-m", "circuitdiff", "--help"],
    "circuitdiff report --help": [sys.executable, "-m", "circuitdiff", "report", "--help"],
    "circuitdiff attribute (missing arguments: an argparse error)": [sys.executable, "-m", "circuitdiff", "attribute"],
    "circuitdiff run no-such-config (a one-line error)": [sys.executable, "-m", "circuitdiff", "run", "no-such-config"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    print("| command | exit | best of %d, s |" % args.reps)
    print("|---|---|---|")
    for name, cmd in CASES.items():
        times, code = [], None
        for _ in range(args.reps):
            t0 = time.perf_counter()
            code = subprocess.run(cmd, capture_output=True, cwd=ROOT).returncode
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {code} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
