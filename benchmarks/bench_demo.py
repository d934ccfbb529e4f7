"""The demo's time, stage by stage: `circuitdiff demo` in a fresh process, from a cold model cache by default.

Each stage (generate, grade, select, attribute, validation, intervention, report) and the model
loading inside them is timed in wall-clock seconds and in CPU seconds of the process (all its
threads): on a busy machine the wall clock grows with the other load, the CPU time much less.
The model cache ($CIRCUITDIFF_CACHE: the GGUF converted to safetensors) is a new empty folder
unless --warm; the run directory is always new.

    python benchmarks/bench_demo.py                         # this checkout, cold cache
    python benchmarks/bench_demo.py --warm --json t.json    # warm cache, JSON written
    python benchmarks/bench_demo.py --src OTHER/src         # another checkout's circuitdiff (before/after)

The goal (issue 16): under 300 s wall on a quiet 2-core AMD EPYC from a cold cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("generate", "grade", "select", "attribute", "validation", "intervention", "report")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _timed(table: dict, name: str, fn):
    depth = [0]  # a LoRA load calls load_model for its base: count the outer call only

    def wrapper(*args, **kwargs):
        wall, cpu = _clock()
        depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                w, c = _clock()
                entry = table.setdefault(name, {"wall": 0.0, "cpu": 0.0, "calls": 0})
                entry["wall"] += w - wall
                entry["cpu"] += c - cpu
                entry["calls"] += 1

    return wrapper


def child(out: str) -> dict:
    """Run the demo into `out` with every stage, the report and the model loads timed."""
    import circuitdiff.demo as demo_module
    import circuitdiff.models.loading as loading
    import circuitdiff.pipeline as pipeline
    import circuitdiff.report as report

    times: dict = {}
    stage_functions = pipeline.stage_functions
    pipeline.stage_functions = lambda: {k: _timed(times, k, f) for k, f in stage_functions().items()}
    import circuitdiff.models as models

    models.load_model = loading.load_model = _timed(times, "load_model (inside the stages)", loading.load_model)
    loading._converted_gguf = _timed(times, "GGUF conversion (cold cache)", loading._converted_gguf)
    report.build_report = _timed(times, "report", report.build_report)
    wall, cpu = _clock()
    lines: list[str] = []
    demo_module.demo(out, progress=False, log=lines.append)
    w, c = _clock()
    times["total"] = {"wall": w - wall, "cpu": c - cpu, "calls": 1}
    return {"times": times, "last_lines": lines[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="keep the user's model cache (default: a new, empty one)")
    parser.add_argument("--out", help="run directory (default: a new temporary one)")
    parser.add_argument("--src", help="import circuitdiff from this src folder (another checkout)")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)))
        return

    env = dict(os.environ)
    scratch = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    if not args.warm:
        env["CIRCUITDIFF_CACHE"] = str(scratch / "cache")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.src).resolve()), env.get("PYTHONPATH")]))
    out = args.out or str(scratch / "demo")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_wall"] = time.perf_counter() - started
    times = result["times"]
    import platform

    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"circuitdiff demo, {'warm' if args.warm else 'cold'} model cache, {os.cpu_count()} CPUs ({cpu_name}); "
          f"load average before: {os.getloadavg()[0]:.1f}; wall = elapsed seconds, CPU = process CPU seconds "
          "(all threads)")
    print(f"{'part':<32} {'wall s':>8} {'CPU s':>8} {'share of wall':>14}")
    total = times["total"]["wall"]
    for name in [*STAGES, "load_model (inside the stages)", "GGUF conversion (cold cache)", "total"]:
        if name in times:
            t = times[name]
            print(f"{name:<32} {t['wall']:>8.1f} {t['cpu']:>8.1f} {t['wall'] / total:>13.0%}")
    print(f"process start to end (imports included): {result['process_wall']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "cold_cache": not args.warm, "cpu": cpu_name,
                                               "src": args.src}, indent=2))


if __name__ == "__main__":
    main()
