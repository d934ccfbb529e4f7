"""The method control on the demo pair: add EAP-IG W files to a copy of a demo run and compare.

    circuitdiff demo --out /tmp/demo
    python benchmarks/method_control.py /tmp/demo --out /tmp/demo_ig [--ig-steps 8]

Copies the demo run (nothing in it is recomputed: its EAP files stay up to date), runs the
attribution stage of the demo's config with `method: [eap, eap-ig]`, builds the report, and
prints benchmarks/controls_table.py for each alpha: every metric's direction under each method,
objective and text.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo_run")
    p.add_argument("--out", required=True)
    p.add_argument("--ig-steps", type=int, default=8)
    args = p.parse_args()

    from circuitdiff.config import override
    from circuitdiff.demo import demo_config
    from circuitdiff.pipeline import run
    from circuitdiff.report import build_report

    out = Path(args.out)
    if not out.exists():
        shutil.copytree(args.demo_run, out)
    config = override(demo_config(), {"method": ["eap", "eap-ig"], "ig_steps": args.ig_steps})
    start = time.perf_counter()
    run(config, out, until="attribute", progress=False, log=lambda line: None)
    print(f"attribution stage (EAP-IG K={args.ig_steps} files added): {time.perf_counter() - start:.0f} s")
    report = build_report(out)
    for alpha in config.alphas:
        table = Path(__file__).with_name("controls_table.py")
        subprocess.run([sys.executable, str(table), str(report / "metrics.csv"), "--alpha", repr(alpha)], check=True)
        print()


if __name__ == "__main__":
    main()
