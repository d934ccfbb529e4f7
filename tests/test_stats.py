"""Paired statistics: the fast resampling/flip formulas against naive recomputation, and tests against scipy."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from circuitdiff import metrics as M
from circuitdiff import stats as S


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    n, m = 9, 40
    shared = rng.standard_t(3, size=m)
    base = shared + rng.standard_t(3, size=(n, m))
    tuned = 1.3 * shared + 1.5 * rng.standard_t(3, size=(n, m))
    return base, tuned


def _naive_diversity_resample(X, idx):
    """Diversity of the resampled rows, leaving out pairs of two draws of the same question."""
    C = np.corrcoef(X[idx])
    vals = [C[a, b] for a in range(len(idx)) for b in range(len(idx)) if a != b and idx[a] != idx[b]]
    return 1 - np.mean(vals)


def _naive_pooled_entropy(X, bins, value_range):
    counts, _ = np.histogram(np.abs(X).ravel(), bins=bins, range=value_range)
    return sps.entropy(counts)


def test_index_weights_and_flips():
    rng = np.random.default_rng(0)
    idx = S.bootstrap_indices(7, 50, rng)
    w = S.index_weights(idx, 7)
    assert np.array_equal(w, np.stack([np.bincount(r, minlength=7) for r in idx]))
    flips, exact = S.sign_flips(4, 100, rng)
    assert exact and flips.shape == (16, 4) and len({tuple(r) for r in flips}) == 16
    flips, exact = S.sign_flips(20, 100, rng)
    assert not exact and flips.shape == (100, 20)


def test_resampled_statistics_match_naive_recomputation(pair):
    base, tuned = pair
    n = len(base)
    rng = np.random.default_rng(1)
    idx = S.bootstrap_indices(n, 25, rng)
    w = S.index_weights(idx, n)
    spec = M.HistogramSpec(bins=20, eps=0.0)
    value_range = M.shared_range(base, tuned)

    mean_stat = S.MeanStatistic(M.intensity_per_sample(base), M.intensity_per_sample(tuned))
    ent_stat = S.PooledEntropyStatistic(M.sample_histograms(base, spec, value_range),
                                        M.sample_histograms(tuned, spec, value_range), "e", 0.0)  # fmt: skip
    div_stat = S.PairwiseDiversityStatistic(base, tuned)
    mb, mt = mean_stat.resampled(w)
    eb, et = ent_stat.resampled(w)
    db, dt = div_stat.resampled(w)
    for r, rows in enumerate(idx):
        assert mb[r] == pytest.approx(np.abs(base[rows]).mean(), rel=1e-12)
        assert mt[r] == pytest.approx(np.abs(tuned[rows]).mean(), rel=1e-12)
        # the pooled histogram of the resample, recomputed from the concatenated |W|
        assert eb[r] == pytest.approx(_naive_pooled_entropy(base[rows], 20, value_range), rel=1e-12)
        assert et[r] == pytest.approx(_naive_pooled_entropy(tuned[rows], 20, value_range), rel=1e-12)
        assert db[r] == pytest.approx(_naive_diversity_resample(base, rows), rel=1e-10)
        assert dt[r] == pytest.approx(_naive_diversity_resample(tuned, rows), rel=1e-10)
    # the identity resample gives the plain metrics
    one = np.ones((1, n))
    assert div_stat.resampled(one)[1][0] == pytest.approx(M.diversity(tuned), rel=1e-12)
    assert ent_stat.resampled(one)[0][0] == pytest.approx(M.information_complexity(base, spec, value_range), rel=1e-12)


def test_flipped_statistics_match_naive_swaps(pair):
    base, tuned = pair
    n = len(base)
    flips = np.random.default_rng(2).random((12, n)) < 0.5
    spec = M.HistogramSpec(bins=15, eps=0.0)
    value_range = M.shared_range(base, tuned)
    stats = {
        "intensity": (S.MeanStatistic(M.intensity_per_sample(base), M.intensity_per_sample(tuned)), M.activation_intensity),
        "kurtosis": (S.MeanStatistic(M.kurtosis_per_sample(base), M.kurtosis_per_sample(tuned)), M.distribution_kurtosis),
        "complexity": (S.PooledEntropyStatistic(M.sample_histograms(base, spec, value_range),
                                                M.sample_histograms(tuned, spec, value_range), "e", 0.0),
                       lambda X: _naive_pooled_entropy(X, 15, value_range)),
        "diversity": (S.PairwiseDiversityStatistic(base, tuned), M.diversity),
    }  # fmt: skip
    for name, (stat, metric) in stats.items():
        got_b, got_t = stat.flipped(flips)
        for p, s in enumerate(flips):
            b2 = np.where(s[:, None], tuned, base)
            t2 = np.where(s[:, None], base, tuned)
            assert got_b[p] == pytest.approx(metric(b2), rel=1e-10), name
            assert got_t[p] == pytest.approx(metric(t2), rel=1e-10), name


def test_permutation_pvalue_matches_scipy_exact():
    rng = np.random.default_rng(4)
    base = rng.normal(size=10)
    tuned = base + 0.5 + rng.normal(size=10)
    flips, exact = S.sign_flips(10, 5000, rng)
    stat = S.MeanStatistic(base, tuned)
    null_b, null_t = stat.flipped(flips)
    p = S.permutation_pvalue(tuned.mean() - base.mean(), null_t - null_b, exact)
    ref = sps.permutation_test((base, tuned), lambda x, y, axis: np.mean(y - x, axis=axis),
                               permutation_type="samples", n_resamples=np.inf, alternative="two-sided").pvalue  # fmt: skip
    assert exact and p == pytest.approx(ref, rel=1e-12)
    assert 0 < p < 0.2  # a real shift: the test can reject


def test_monte_carlo_pvalue_is_conservative():
    null = np.array([0.1, -0.3, 0.5, 2.0])
    assert S.permutation_pvalue(1.0, null, exact=False) == pytest.approx((1 + 1) / (4 + 1))
    assert S.permutation_pvalue(-1.0, null, exact=True) == pytest.approx(1 / 4)


def test_bootstrap_ci_close_to_scipy_percentile():
    rng = np.random.default_rng(5)
    x = rng.lognormal(size=60)
    w = S.index_weights(S.bootstrap_indices(60, 20000, rng), 60)
    lo, hi = S.percentile_ci(w @ x / 60, 0.95)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=11).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.05 * width and abs(hi - ref.high) < 0.05 * width


def test_bca_ci_close_to_scipy_bca():
    rng = np.random.default_rng(8)
    x = rng.lognormal(sigma=1.2, size=40)  # skewed: BCa and percentile differ
    w = S.index_weights(S.bootstrap_indices(40, 20000, rng), 40)
    stat = S.MeanStatistic(np.zeros(40), x)
    c = S.compare(stat, w, S.sign_flips(40, 100, rng)[0], False, 0.95, "bca")
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="BCa", random_state=12).confidence_interval
    width = ref.high - ref.low
    assert abs(c.tuned_ci[0] - ref.low) < 0.05 * width and abs(c.tuned_ci[1] - ref.high) < 0.05 * width
    pct = S.compare(stat, w, S.sign_flips(40, 100, rng)[0], False, 0.95, "percentile").tuned_ci
    assert pct[1] < c.tuned_ci[1]  # BCa shifts the interval right for a right-skewed mean
    assert pct == pytest.approx(S.percentile_ci(w @ x / 40))


def test_effect_sizes_and_holm_by_hand():
    assert S.cohen_dz(np.zeros(3), np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)  # mean 2, sd 1
    got = S.holm([0.01, 0.04, 0.03, float("nan")])
    # sorted 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.03, 0.06, 0.06
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(got[3])
    d = np.array([0.5, -0.2, 1.1, 0.9, 0.3, 1.4])
    assert S.wilcoxon_pvalue(np.zeros(6), d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert np.isnan(S.wilcoxon_pvalue(np.ones(4), np.ones(4)))


@pytest.mark.parametrize("shift, arrow", [(1.0, "up"), (-1.0, "down"), (0.0, "")])
def test_compare_arrows_follow_the_ci(shift, arrow):
    rng = np.random.default_rng(6)
    base = rng.normal(size=40)
    tuned = base + shift + 0.3 * rng.normal(size=40)
    w = S.index_weights(S.bootstrap_indices(40, 2000, rng), 40)
    flips, exact = S.sign_flips(40, 2000, rng)
    c = S.compare(S.MeanStatistic(base, tuned), w, flips, exact)
    assert c.diff == pytest.approx(tuned.mean() - base.mean())
    assert c.diff_ci[0] <= c.diff <= c.diff_ci[1]
    assert c.arrow == arrow
    assert (c.p_perm < 0.01) == (arrow != "")
    assert c.cohen_dz == pytest.approx(np.mean(tuned - base) / np.std(tuned - base, ddof=1))


def test_exact_flips_cover_all_sign_patterns():
    flips, exact = S.sign_flips(3, 10, np.random.default_rng(0))
    assert exact and sorted(map(tuple, flips.tolist())) == sorted(itertools.product([False, True], repeat=3))


def test_compare_all_columns_equal_one_at_a_time():
    rng = np.random.default_rng(9)
    base, tuned = rng.normal(size=(15, 4)), rng.normal(0.3, 1.0, size=(15, 4))
    w = S.index_weights(S.bootstrap_indices(15, 500, rng), 15)
    flips, exact = S.sign_flips(15, 500, rng)
    many = S.compare_all(S.MeanStatistic(base, tuned), w, flips, exact)
    for j, c in enumerate(many):
        one = S.compare(S.MeanStatistic(base[:, j], tuned[:, j]), w, flips, exact)
        assert c.diff_ci == pytest.approx(one.diff_ci) and c.p_perm == pytest.approx(one.p_perm)
        assert c.tuned == pytest.approx(tuned[:, j].mean())


def test_null_calibration_of_cis_and_permutation_test():
    """Under H0 (base and tuned exchangeable within a question) the 95% CI of tuned - base should
    exclude 0, and p_perm fall below 0.05, in about 5% of simulated runs, for every statistic kind."""
    rng = np.random.default_rng(10)
    n, m, reps = 20, 30, 150
    w = S.index_weights(S.bootstrap_indices(n, 400, rng), n)
    flips, exact = S.sign_flips(n, 400, rng)
    spec = M.HistogramSpec(bins=10)
    hits = {"intensity": [0, 0], "complexity": [0, 0], "diversity": [0, 0]}
    for _ in range(reps):
        question = rng.standard_t(4, size=(n, m)) + rng.standard_t(4, size=m)
        base = question + 0.7 * rng.standard_t(4, size=(n, m))
        tuned = question + 0.7 * rng.standard_t(4, size=(n, m))
        r = M.shared_range(base, tuned)
        stats = {
            "intensity": S.MeanStatistic(M.intensity_per_sample(base), M.intensity_per_sample(tuned)),
            "complexity": S.PooledEntropyStatistic(M.sample_histograms(base, spec, r), M.sample_histograms(tuned, spec, r), "e", spec.eps),
            "diversity": S.PairwiseDiversityStatistic(base, tuned),
        }
        for name, stat in stats.items():
            c = S.compare(stat, w, flips, exact)
            hits[name][0] += c.arrow != ""
            hits[name][1] += c.p_perm < 0.05
    for name, (ci_hits, p_hits) in hits.items():
        # binomial(150, 0.05): mean 7.5, sd 2.7; allow a slightly liberal bootstrap at n = 20
        assert ci_hits <= 22, (name, ci_hits)
        assert p_hits <= 16, (name, p_hits)


def test_identical_models_give_zero_difference_and_no_arrow(pair):
    base, _ = pair
    n = len(base)
    rng = np.random.default_rng(14)
    w = S.index_weights(S.bootstrap_indices(n, 300, rng), n)
    flips, exact = S.sign_flips(n, 300, rng)
    spec = M.HistogramSpec(bins=12)
    r = M.shared_range(base)
    H = M.sample_histograms(base, spec, r)
    for stat in (S.MeanStatistic(M.kurtosis_per_sample(base), M.kurtosis_per_sample(base)),
                 S.PooledEntropyStatistic(H, H, "e", spec.eps), S.PairwiseDiversityStatistic(base, base.copy())):  # fmt: skip
        for ci in S.CI_METHODS:
            c = S.compare(stat, w, flips, exact, ci=ci)
            assert c.diff == 0 and c.diff_ci == (0.0, 0.0) and c.arrow == "" and c.p_perm == 1.0
            assert np.isnan(c.p_wilcoxon) and np.isnan(c.cohen_dz)


def test_accuracy_difference_against_hand_counts_and_a_plain_bootstrap():
    from circuitdiff.stats import accuracy_difference

    base = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    tuned = np.array([1, 0, 1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    r = accuracy_difference(base, tuned, n_boot=4000, seed=3)
    assert (r.base, r.tuned, r.diff) == (0.3, 0.6, pytest.approx(0.3))
    assert (r.base_only, r.tuned_only) == (1, 4)
    # exact McNemar: two-sided binomial tail of 4 successes in 5 at p = 1/2 = 2 * (5 + 1) / 32
    assert r.p_mcnemar == pytest.approx(12 / 32)
    # an independent loop bootstrap with the same generator draws the same resamples
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 10, size=(4000, 10))
    diffs = [tuned[d].mean() - base[d].mean() for d in draws]
    assert r.diff_ci == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert r.diff_ci[0] < r.diff < r.diff_ci[1]


def test_accuracy_difference_of_identical_models_is_zero_with_p_one():
    from circuitdiff.stats import accuracy_difference

    x = np.array([1, 0, 1, 1, 0], dtype=bool)
    r = accuracy_difference(x, x, n_boot=200)
    assert r.diff == 0 and r.diff_ci == (0.0, 0.0) and r.p_mcnemar == 1.0
