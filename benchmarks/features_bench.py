"""Benchmark `circuitdiff features` and print its numbers as markdown: time per step, peak memory, the
crosscoder's quality, the classes beside the null control, the compact set and the interventions.

    python benchmarks/features_bench.py RUN_DIR --out DIR [any `circuitdiff features` option ...]
    python benchmarks/features_bench.py --table DIR          (print the tables of a finished folder)

The demo benchmark of docs/features.md: `python benchmarks/features_bench.py runs/demo --out
runs/demo-features --tokens 250000 --dict-size 8 --k 32` (the middle layer, 15, by default).
"""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from pathlib import Path


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def table(folder: Path) -> str:
    from circuitdiff.store import layout

    s = json.loads(layout.features_file(folder, "summary").read_text())
    timings = json.loads(layout.features_file(folder, "timings").read_text())
    null = s["null"]
    st = s["settings"]
    out = [f"layer {s['layer']} of {s['n_layers']}, d_model {s['d_model']}, {s['n_latents']} latents "
           f"({st['dict_size']}x), k {st['k']}, {s['tokens']['train']} training + {s['tokens']['held_out']} held-out "
           f"tokens per model (sources {s['tokens']['sources']}), {st['epochs']} epochs of batch {st['batch_size']}, "
           f"lr {st['lr']}, models {', '.join(m['label'] + '=' + m['spec'] for m in s['models'])}", "",
           "| step | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    out += ["", "| crosscoder | model | FVU (held out) | dead fraction |", "|---|---|---|---|"]
    out += [f"| main | {k} | {v:.3f} | {s['dead_fraction']:.3f} |" for k, v in s["fvu"].items()]
    out += [f"| null | {k} | {v:.3f} | {null['dead_fraction']:.3f} |" for k, v in null["fvu"].items()]
    out += ["", "| class | latents | null crosscoder (base vs null model) |", "|---|---|---|"]
    classes = sorted(set(s["counts"]) | set(null["counts"]))
    out += [f"| {c} | {s['counts'].get(c, 0)} | {null['counts'].get(c, 0)} |" for c in classes]
    out += ["", f"model-only latents: {s['model_only']} beside {null['spurious_model_only']} spurious model-only in the "
            f"null ({null['null_model_only']}); by decoder norms alone: {s['norm_counts']} vs the null's "
            f"{null['null_norm_model_only']} norm-only model-only latents"]
    attribution = rows(layout.features_file(folder, "attribution"))
    compact = [r for r in attribution if r["in_compact_set"] == "True"]
    if compact:
        kinds: dict[str, int] = {}
        for r in compact:
            kinds[r["class"]] = kinds.get(r["class"], 0) + 1
        out += ["", f"compact set: {len(compact)} latents from {compact[0]['n_questions']} tuned-only questions "
                f"({compact[0]['dataset']}); classes {kinds}; attributions "
                f"{', '.join(r['latent'] + ': ' + format(float(r['attribution']), '.3g') for r in compact[:10])}"]
    effects = [r for r in rows(layout.features_file(folder, "interventions"))
               if r["condition"] in ("none", "targeted", "random", "targeted-minus-random")]
    if effects:
        out += ["", "| model | factor | measure | condition | value | effect vs none [95% CI] | McNemar p | random draws "
                "| size ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in effects:
            ci = "" if r["condition"] == "none" else f"{float(r['effect']):+.3f} [{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}]"
            draws = f"{float(r['draws_min']):+.3f} .. {float(r['draws_max']):+.3f}" if r.get("draws_min") else ""
            p = r["p_mcnemar"] if r["p_mcnemar"] not in ("", "nan") else ""
            ratio = f"{float(r['magnitude_ratio']):.2f}" if r.get("magnitude_ratio") else ""
            out.append(f"| {r['model']} | {r['factor']} | {r['measure']} | {r['condition']} | {float(r['value']):.3f} | "
                       f"{ci} | {p and format(float(p), '.3g')} | {draws} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        print(table(Path(argv[1])))
        return 0
    from circuitdiff.cli import main as cli_main

    if "--out" not in argv:
        print("give --out DIR (the benchmark writes there, not into the run)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    code = cli_main(["features", *argv])
    wall = time.perf_counter() - t0
    if code:
        return code
    folder = Path(argv[argv.index("--out") + 1])
    print(table(folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nwall clock {wall:.0f} s, peak RSS {peak:.0f} MB (`circuitdiff features {' '.join(argv)}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
