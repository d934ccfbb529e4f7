"""Report statistics: speed against naive recomputation, and calibration under the null.

speed: on one synthetic base/tuned pair of SmolLM2 shape (30 layers, qkv: 121 x 61; or head),
  the cost per bootstrap resample of the four metrics, computed
  - naive: copy the resampled questions' W, recompute each metric (np.histogram of the pooled
    |W|, np.corrcoef, scipy kurtosis), as a straightforward implementation would;
  - circuitdiff: multiplicity weights against per-sample summaries (stats.py);
  and the end-to-end `build_report` time of a 3-pair synthetic run.
calibration: share of null simulations (base and tuned exchangeable) whose 95% CI of
  tuned - base excludes 0, for the percentile and BCa intervals, and whose permutation p < 0.05.

    python benchmarks/bench_report.py speed --granularity qkv --n 100
    python benchmarks/bench_report.py calibration --n 30 100 --reps 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from circuitdiff import metrics as M  # noqa: E402
from circuitdiff import stats as S  # noqa: E402
from circuitdiff.graph import Graph  # noqa: E402


def _pair(granularity: str, n: int, seed: int = 0):
    from report_fixture import pair_matrices

    graph = Graph(30, granularity, 9, 3)
    base, tuned = pair_matrices(np.random.default_rng(seed), graph, n, planted=True)
    return base.astype(np.float32).astype(np.float64), tuned.astype(np.float32).astype(np.float64), graph


def _naive_metrics(X: np.ndarray, bins: int, value_range) -> tuple[float, float, float, float]:
    counts, _ = np.histogram(np.abs(X).ravel(), bins=bins, range=value_range)
    C = np.corrcoef(X)
    return (np.abs(X).mean(), sps.entropy(counts), sps.kurtosis(X, axis=1).mean(), 1 - C[np.triu_indices(len(X), 1)].mean())


def speed(args) -> None:
    base, tuned, graph = _pair(args.granularity, args.n)
    Xb, Xt = M.select_entries(base, graph.edge_mask, "all"), M.select_entries(tuned, graph.edge_mask, "all")
    value_range = M.shared_range(Xb, Xt)
    rng = np.random.default_rng(0)
    print(f"pair: {args.n} questions x {Xb.shape[1]} entries (granularity={args.granularity}, entries=all), bins={args.bins}")

    idx = S.bootstrap_indices(args.n, args.naive_resamples, rng)
    t = time.perf_counter()
    for rows in idx:
        _naive_metrics(Xb[rows], args.bins, value_range)
        _naive_metrics(Xt[rows], args.bins, value_range)
    naive = (time.perf_counter() - t) / len(idx)

    spec = M.HistogramSpec(bins=args.bins)
    t = time.perf_counter()
    w = S.index_weights(S.bootstrap_indices(args.n, args.n_boot, rng), args.n)
    setup_start = time.perf_counter()
    stats = [
        S.MeanStatistic(M.intensity_per_sample(Xb), M.intensity_per_sample(Xt)),
        S.PooledEntropyStatistic(M.sample_histograms(Xb, spec, value_range), M.sample_histograms(Xt, spec, value_range), "e", spec.eps),
        S.MeanStatistic(M.kurtosis_per_sample(Xb), M.kurtosis_per_sample(Xt)),
        S.PairwiseDiversityStatistic(Xb, Xt),
    ]
    setup = time.perf_counter() - setup_start
    for stat in stats:
        stat.resampled(w)
    fast_total = time.perf_counter() - t
    fast = (fast_total - setup) / args.n_boot
    print(f"naive recomputation: {naive * 1e3:9.3f} ms per resample (both models, 4 metrics; {len(idx)} resamples timed)")
    print(f"circuitdiff weights: {fast * 1e3:9.3f} ms per resample + {setup:.2f} s one-off summaries ({args.n_boot} resamples)")
    print(f"ratio naive / circuitdiff per resample: {naive / fast:,.0f}x; "
          f"{args.n_boot} resamples: naive ~{naive * args.n_boot:,.0f} s vs circuitdiff {fast_total:.2f} s")  # fmt: skip

    from report_fixture import make_run

    from circuitdiff.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", n=args.n, n_layers=30, granularity=args.granularity, n_heads=9, n_kv_heads=3)
        t = time.perf_counter()
        build_report(run)
        print(f"build_report, 3 pairs x 2 entries modes, n_boot = n_perm = 10000: {time.perf_counter() - t:.1f} s")


def calibration(args) -> None:
    print("share of null runs with the 95% CI excluding 0 (percentile / BCa) and permutation p < 0.05")
    print(f"data: t(4), shared question component; {args.reps} runs; {args.resamples} resamples and flips")
    for n in args.n:
        rng = np.random.default_rng(13)
        m = 60
        w = S.index_weights(S.bootstrap_indices(n, args.resamples, rng), n)
        flips, exact = S.sign_flips(n, args.resamples, rng)
        spec = M.HistogramSpec(bins=20)
        hits: dict[tuple[str, str], int] = {}
        for _ in range(args.reps):
            question = rng.standard_t(4, size=(n, m)) + rng.standard_t(4, size=m)
            base = question + 0.7 * rng.standard_t(4, size=(n, m))
            tuned = question + 0.7 * rng.standard_t(4, size=(n, m))
            r = M.shared_range(base, tuned)
            stats = {
                "intensity": S.MeanStatistic(M.intensity_per_sample(base), M.intensity_per_sample(tuned)),
                "complexity": S.PooledEntropyStatistic(M.sample_histograms(base, spec, r), M.sample_histograms(tuned, spec, r), "e", spec.eps),
                "diversity": S.PairwiseDiversityStatistic(base, tuned),
                "kurtosis": S.MeanStatistic(M.kurtosis_per_sample(base), M.kurtosis_per_sample(tuned)),
            }
            for name, stat in stats.items():
                for ci in ("percentile", "bca"):
                    c = S.compare(stat, w, flips, exact, ci=ci)
                    hits[(name, ci)] = hits.get((name, ci), 0) + (c.arrow != "")
                hits[(name, "perm")] = hits.get((name, "perm"), 0) + (c.p_perm < 0.05)
        cells = [
            f"{name}: " + " / ".join(f"{hits[(name, k)] / args.reps:.3f}" for k in ("percentile", "bca", "perm"))
            for name in ("intensity", "complexity", "diversity", "kurtosis")
        ]
        print(f"n={n:4d}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--granularity", choices=["block", "qkv", "head"], default="qkv")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--bins", type=int, default=100)
    s.add_argument("--n-boot", type=int, default=10000)
    s.add_argument("--naive-resamples", type=int, default=30)
    s.set_defaults(func=speed)
    c = sub.add_parser("calibration")
    c.add_argument("--n", type=int, nargs="+", default=[30, 100])
    c.add_argument("--reps", type=int, default=300)
    c.add_argument("--resamples", type=int, default=2000)
    c.set_defaults(func=calibration)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
