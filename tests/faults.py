"""Fault injection for a small run: kill -9 at chosen write points, damage an artifact, and compare.

A "world" is two tiny saved models, a dataset and a config with every stage (validation and
intervention included); `run_all` runs the pipeline and the report in a fresh process, optionally
killed at the N-th write point (io.py's CIRCUITDIFF_KILL_AT). `snapshot` reads a run directory
into {relative path: bytes} for comparison: the manifest (timestamps) is left out, and the
wall-clock timings inside the validation and intervention results are removed; nothing else.
Used by tests/test_faults.py and benchmarks/faults_table.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_OF = [("generations", ".jsonl", "generate"), ("generations", ".meta.json", "grade"), ("selection", "", "select"),
            ("attribution", "", "attribute"), ("validation", "", "validate"), ("intervention", "", "intervene"),
            ("report", "", "report")]
SCRIPT = """
import sys
from circuitdiff.cli import main
code = main(["run", sys.argv[1], "--out", sys.argv[2], "--no-progress"])
sys.exit(code or main(["report", sys.argv[2], "--n-boot", "200", "--n-perm", "200"]))
"""


def make_world(root: Path) -> Path:
    """Two tiny models (same weights but the EOS row), a GSM8K-style file whose golds are the base's own
    answers, and a config with every stage; returns the config path."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pipeline_helpers import save_tiny_lm, write_gsm8k_file

    from circuitdiff.decoding import HFBackend
    from circuitdiff.grade import extract_answer
    from circuitdiff.models import load_model
    from circuitdiff.prompts import encode

    base, tuned = save_tiny_lm(root / "base", seed=0, eos_scale=3.0), save_tiny_lm(root / "tuned", seed=0, eos_scale=3.5)
    qs = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(12)]
    loaded = load_model(str(base), "float64")
    gens = HFBackend(loaded.model, loaded.tokenizer, 16).generate([encode(q, loaded.tokenizer, "chat") for q in qs])
    preds = [extract_answer(loaded.tokenizer.decode(g.answer_ids, skip_special_tokens=True)) for g in gens]
    golds = [p.replace(",", "") if p is not None and i % 4 != 3 else "123456789" for i, p in enumerate(preds)]
    data = write_gsm8k_file(root / "qa.jsonl", golds, qs)
    config = {
        "name": "faults", "base": str(base), "tuned": str(tuned),
        "datasets": [{"name": "gsm8k", "source": str(data)}], "alphas": [0.1], "n_samples": 5, "seed": 3,
        # tiny random models stop at the cap: grade cut answers by their text, select them too
        "selection": {"delta": 0.9, "require_finished": False}, "grading": {"truncated": "lenient"},
        "dtype": "float64", "max_new_tokens": 16, "gen_batch_size": 4, "attr_batch_size": 2,
        "objective": ["nll", "logit"], "text": "base",
        "validation": {"n_samples": 2, "batch_size": 8},
        "intervention": {"edges": "top", "k": 2, "n_random": 2, "n_questions": 4, "max_new_tokens": 4},
    }  # fmt: skip
    path = root / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_all(config: Path, run: Path, kill_at: int = 0, fault_log: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUITDIFF_KILL") and k != "CIRCUITDIFF_FAULT_LOG"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # two cases run side by side on two cores
    if kill_at:
        env["CIRCUITDIFF_KILL_AT"] = str(kill_at)
    if fault_log is not None:
        env["CIRCUITDIFF_FAULT_LOG"] = str(fault_log)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(config), str(run)], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def kill_points(fault_log: Path, per_stage: int = 2, seed: int = 0) -> list[tuple[int, str, str]]:
    """(point, stage, what) for `per_stage` seeded points of every stage that wrote something."""
    by_stage: dict[str, list[tuple[int, str, str]]] = {}
    for line in fault_log.read_text().splitlines():
        number, what, path = line.split("\t")
        parts = Path(path).parts
        for folder, suffix, stage in STAGE_OF:
            if folder in parts and path.endswith(suffix) and not path.endswith(".key"):
                by_stage.setdefault(stage, []).append((int(number), stage, what))
                break
    rng = random.Random(seed)
    chosen = []
    for stage, points in by_stage.items():
        chosen += rng.sample(points, min(per_stage, len(points)))
    return sorted(chosen)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory by relative path (see the module docstring for what is left out); the run
    directory's own path, which some files name, is written <RUN> so that two directories compare."""
    files = {}
    own = str(run.resolve()).encode()
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel == "manifest.json" or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if rel.endswith(".json") and rel.split("/")[0] in ("validation", "intervention"):
            record = json.loads(data)
            record["meta"] = {k: v for k, v in record.get("meta", {}).items() if not k.startswith("seconds_")}
            data = json.dumps(record, sort_keys=True).encode()
        files[rel] = data.replace(own, b"<RUN>").replace(str(run).encode(), b"<RUN>")
    return files


def differences(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k] != b[k])


def kill_outcome(config: Path, run: Path, reference: dict[str, bytes], point: int) -> str:
    """Kill a fresh run at write point `point`, resume it, and say what happened: "identical" when the resumed
    outputs equal the uninterrupted run's, else what went wrong."""
    shutil.rmtree(run, ignore_errors=True)
    killed = run_all(config, run, kill_at=point)
    if killed.returncode != -9:
        return f"WRONG: the run was not killed (exit {killed.returncode})"
    resumed = run_all(config, run)
    if resumed.returncode != 0:
        return f"WRONG: resume failed ({(resumed.stderr.strip().splitlines() or [''])[-1][:200]})"
    diff = differences(snapshot(run), reference)
    return "identical" if not diff else f"WRONG: differs in {', '.join(diff[:4])}"


def copy_run(reference_run: Path, run: Path) -> Path:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(reference_run, run)
    return run


# ---------------------------------------------------------------- damage
DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "zeroed": lambda data: bytes(len(data)),
    "bit-flipped": lambda data: data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1 :],
}
ARTIFACTS = {  # kind -> path of one such artifact in the world's run (relative)
    "generations rows": "generations/tuned/gsm8k.jsonl",
    "generations meta": "generations/tuned/gsm8k.meta.json",
    "selection": "selection/gsm8k/alpha=0.1.json",
    "attribution W": "attribution/nll/tuned/gsm8k/alpha=0.1.npz",
    "key file": "attribution/nll/tuned/gsm8k/alpha=0.1.npz.key",
    "validation": "validation/nll/tuned/gsm8k/alpha=0.1.json",
    "intervention": "intervention/nll/tuned/gsm8k/alpha=0.1/top_k=2_factor=0.0.json",
    "manifest": "manifest.json",
}


def damage_outcome(config: Path, run: Path, reference: dict[str, bytes], kind: str, how: str) -> str:
    """Damage one artifact of a finished run, rerun, and say what happened: "recomputed" (the outputs equal
    the reference again), "error: <the one line>", or "WRONG: ..." (a silent difference or a traceback)."""
    path = run / ARTIFACTS[kind]
    path.write_bytes(DAMAGES[how](path.read_bytes()))
    result = run_all(config, run)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [""])[-1]
        if result.returncode == 2 and last.startswith("circuitdiff: error: "):
            return "error: " + last[len("circuitdiff: error: "):]
        return f"WRONG: exit {result.returncode} ({last[:200]})"
    diff = differences(snapshot(run), reference)
    if kind == "manifest" and diff == ["report/report.html"]:
        # the manifest records, it does not decide: it is written anew, and the records that are only made when
        # a model loads or generates (its load info, a rendered prompt) come back when that happens again; the
        # report differs in its manifest section only
        strip = lambda html: re.sub(rb'<section id="run-manifest">.*?</section>', b"", html, flags=re.S)  # noqa: E731
        if strip(snapshot(run)["report/report.html"]) == strip(reference["report/report.html"]):
            return "rewritten (model-load records return when the models next load)"
    return "recomputed" if not diff else f"WRONG: differs in {', '.join(diff[:4])}"


# ---------------------------------------------------------------- the cases, two side by side
def kill_cases(config: Path, root: Path, reference: dict[str, bytes], points: list) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda pt: kill_outcome(config, root / f"kill-{pt[0]}", reference, pt[0]), points))


def damage_cases(config: Path, root: Path, reference_run: Path, reference: dict[str, bytes]) -> dict:
    """{(artifact kind, damage): outcome} for every kind and damage."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(kind, how) for kind in ARTIFACTS for how in DAMAGES]

    def one(case):
        kind, how = case
        run = copy_run(reference_run, root / f"damage-{kind.replace(' ', '_')}-{how}")
        return damage_outcome(config, run, reference, kind, how)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(one, cases)))
