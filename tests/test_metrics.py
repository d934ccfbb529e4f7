"""Circuit metrics: hand-computed values on tiny matrices, and numpy/scipy re-computations on random ones."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from circuitdiff import metrics as M
from circuitdiff.graph import Graph

# Two samples of a 2x2 W; entry (0, 1) is an impossible edge (stored as 0).
MASK = np.array([[True, False], [True, True]])
W_HAND = np.array([[[1.0, 0.0], [-2.0, 3.0]], [[2.0, 0.0], [0.0, -1.0]]])


def H(*p):
    """Entropy in nats of the given probabilities, by hand."""
    return -sum(x * math.log(x) for x in p if x > 0)


# ------------------------------------------------------------------ by hand
def test_select_entries_by_hand():
    assert M.select_entries(W_HAND, MASK, "all").tolist() == [[1, 0, -2, 3], [2, 0, 0, -1]]
    assert M.select_entries(W_HAND, MASK, "edges").tolist() == [[1, -2, 3], [2, 0, -1]]
    with pytest.raises(ValueError, match="entries"):
        M.select_entries(W_HAND, MASK, "dense")


def test_intensity_by_hand():
    # all: (1+0+2+3)/4 = 1.5 and (2+0+0+1)/4 = 0.75; edges: 6/3 = 2 and 3/3 = 1
    assert M.activation_intensity(M.select_entries(W_HAND, MASK, "all")) == pytest.approx(1.125)
    assert M.activation_intensity(M.select_entries(W_HAND, MASK, "edges")) == pytest.approx(1.5)


def test_information_complexity_by_hand():
    spec = M.HistogramSpec(bins=2, log_base="e", eps=0.0)
    # range [0, 3], bin width 1.5. all: |W| = 1,0,2,3,2,0,0,1 -> bin0 {1,0,0,0,1} = 5, bin1 {2,3,2} = 3
    X = M.select_entries(W_HAND, MASK, "all")
    assert M.shared_range(X) == (0.0, 3.0)
    assert M.information_complexity(X, spec) == pytest.approx(H(5 / 8, 3 / 8))
    # edges: 1,2,3,2,0,1 -> bin0 {1,0,1} = 3, bin1 {2,3,2} = 3 -> ln 2, or 1 bit
    X = M.select_entries(W_HAND, MASK, "edges")
    assert M.information_complexity(X, spec) == pytest.approx(math.log(2))
    assert M.information_complexity(X, M.HistogramSpec(bins=2, log_base="2", eps=0.0)) == pytest.approx(1.0)
    # eps enters as -sum p log(p + eps)
    eps = 0.1
    got = M.information_complexity(X, M.HistogramSpec(bins=2, log_base="e", eps=eps))
    assert got == pytest.approx(-2 * 0.5 * math.log(0.5 + eps))


def test_histogram_clips_values_outside_a_fixed_range():
    spec = M.HistogramSpec(bins=2)
    counts = M.sample_histograms(np.array([[0.5, 1.5, 7.0, -9.0]]), spec, (1.0, 2.0))
    # |x| = 0.5 (below -> bin 0), 1.5 (bin 1), 7 and 9 (above -> bin 1)
    assert counts.tolist() == [[1.0, 3.0]]


def test_kurtosis_by_hand():
    # sample 1, all entries: 1, 0, -2, 3; mean 0.5; deviations .5 -.5 -2.5 2.5
    m2 = (0.25 + 0.25 + 6.25 + 6.25) / 4
    m4 = (0.0625 + 0.0625 + 39.0625 + 39.0625) / 4
    k1 = m4 / m2**2 - 3
    # sample 2, all entries: 2, 0, 0, -1; mean 0.25; deviations 1.75 -.25 -.25 -1.25
    d = [1.75, -0.25, -0.25, -1.25]
    k2 = (sum(x**4 for x in d) / 4) / (sum(x**2 for x in d) / 4) ** 2 - 3
    X = M.select_entries(W_HAND, MASK, "all")
    assert M.kurtosis_per_sample(X) == pytest.approx([k1, k2])
    assert M.distribution_kurtosis(X) == pytest.approx((k1 + k2) / 2)
    # edges, sample 1: 1, -2, 3 -> mean 2/3
    e = [1 / 3, -8 / 3, 7 / 3]
    k1e = (sum(x**4 for x in e) / 3) / (sum(x**2 for x in e) / 3) ** 2 - 3
    assert M.kurtosis_per_sample(M.select_entries(W_HAND, MASK, "edges"))[0] == pytest.approx(k1e)
    assert np.isnan(M.kurtosis_per_sample(np.ones((1, 5)))[0])  # constant sample: undefined


def test_diversity_by_hand():
    # edges [1,2,3] vs [1,3,2]: centred [-1,0,1], [-1,1,0] -> r = 1/2 -> diversity 1/2
    # all [1,0,2,3] vs [1,0,3,2]: centred [-.5,-1.5,.5,1.5], [-.5,-1.5,1.5,.5] -> r = 4/5 -> diversity 1/5
    W = np.array([[[1.0, 0.0], [2.0, 3.0]], [[1.0, 0.0], [3.0, 2.0]]])
    assert M.diversity(M.select_entries(W, MASK, "edges")) == pytest.approx(0.5)
    assert M.diversity(M.select_entries(W, MASK, "all")) == pytest.approx(0.2)
    # three samples x, x, -x: correlations 1, -1, -1 -> mean -1/3 -> diversity 4/3
    x = np.array([1.0, -1.0, 2.0, 0.0])
    assert M.diversity(np.stack([x, x, -x])) == pytest.approx(4 / 3)
    assert M.diversity_per_sample(np.stack([x, x, -x])) == pytest.approx([1.0, 1.0, 2.0])


def test_output_entropy_by_hand():
    W = np.array([[[1.0, 0.0], [2.0, 3.0]]])
    # source 0 -> destinations 0, 1 with |W| 1, 2: p = 1/3, 2/3; source 1 -> destination 1 only: entropy 0
    got = M.output_entropy_per_source(W, MASK, "e", 0.0)
    assert got[0] == pytest.approx([H(1 / 3, 2 / 3), 0.0])
    # a nonzero value on an impossible edge is ignored; a source with all-zero outputs is nan
    W2 = np.array([[[1.0, 5.0], [2.0, 0.0]]])
    got2 = M.output_entropy_per_source(W2, MASK, "2", 0.0)
    assert got2[0, 0] == pytest.approx(H(1 / 3, 2 / 3) / math.log(2))
    assert np.isnan(got2[0, 1])


def test_relative_change_by_hand():
    base = np.array([[[1.0, 0.0], [2.0, 3.0]], [[3.0, 0.0], [-2.0, 1.0]]])  # mean |W| [[2, 0], [2, 2]]
    tuned = np.array([[[2.0, 0.0], [2.0, 6.0]], [[-2.0, 0.0], [2.0, 2.0]]])  # mean |W| [[2, 0], [2, 4]]
    rel = M.relative_change(M.mean_abs(base), M.mean_abs(tuned), MASK)
    assert rel[0, 0] == 0 and rel[1, 0] == 0 and rel[1, 1] == pytest.approx(1.0)
    assert np.isnan(rel[0, 1])


# ------------------------------------------------- against numpy / scipy
@pytest.fixture(scope="module")
def random_w():
    rng = np.random.default_rng(7)
    graph = Graph(4, "qkv")  # the authors' dense layout: (4L+1) destinations x (1+2L) sources
    W = rng.standard_t(3, size=(12, *graph.edge_mask.shape)) * np.exp(rng.normal(size=graph.edge_mask.shape))
    return (W * graph.edge_mask).astype(np.float32).astype(np.float64), graph.edge_mask


def _entries(W, mask, entries):
    return W.reshape(len(W), -1) if entries == "all" else np.stack([w[mask] for w in W])


@pytest.mark.parametrize("entries", ["all", "edges"])
def test_metrics_match_numpy_scipy(random_w, entries):
    W, mask = random_w
    X = M.select_entries(W, mask, entries)
    ref = _entries(W, mask, entries)
    assert X.shape == ref.shape and (entries == "edges") == (X.shape[1] == mask.sum())
    assert M.activation_intensity(X) == pytest.approx(np.abs(ref).mean(), rel=1e-12)
    assert M.kurtosis_per_sample(X) == pytest.approx(sps.kurtosis(ref, axis=1, fisher=True, bias=True), rel=1e-10)
    assert M.distribution_kurtosis(X) == pytest.approx(sps.kurtosis(ref, axis=1).mean(), rel=1e-10)
    C = np.corrcoef(ref)
    assert M.correlation_matrix(X) == pytest.approx(C, abs=1e-12)
    iu = np.triu_indices(len(ref), 1)
    assert M.diversity(X) == pytest.approx(1 - C[iu].mean(), rel=1e-12)
    assert M.diversity_per_sample(X).mean() == pytest.approx(M.diversity(X), rel=1e-12)
    for bins, base in ((100, "e"), (37, "2"), (10, "10")):
        value_range = (0.0, np.abs(ref).max())
        counts, _ = np.histogram(np.abs(ref).ravel(), bins=bins, range=value_range)
        expected = sps.entropy(counts, base={"e": None, "2": 2, "10": 10}[base])
        spec = M.HistogramSpec(bins=bins, log_base=base, eps=0.0)
        assert M.information_complexity(X, spec) == pytest.approx(expected, rel=1e-12)
        assert M.sample_histograms(X, spec, value_range).sum(0) == pytest.approx(counts)
        # the default eps = 1e-12 moves the value by a negligible amount
        assert M.information_complexity(X, M.HistogramSpec(bins=bins, log_base=base)) == pytest.approx(expected, rel=1e-9)
        per = [sps.entropy(np.histogram(np.abs(r), bins=bins, range=value_range)[0], base={"e": None, "2": 2, "10": 10}[base]) for r in ref]
        assert M.complexity_per_sample(X, spec, value_range) == pytest.approx(per, rel=1e-12)


def test_entries_modes_differ_on_structural_zeros(random_w):
    W, mask = random_w
    values = {e: M.select_entries(W, mask, e) for e in M.ENTRIES}
    # about half the dense qkv matrix is structural zeros: intensity scales by n_edges / n_entries exactly
    ratio = mask.sum() / mask.size
    assert M.activation_intensity(values["all"]) == pytest.approx(ratio * M.activation_intensity(values["edges"]), rel=1e-12)
    assert M.distribution_kurtosis(values["all"]) > M.distribution_kurtosis(values["edges"])


def test_output_entropy_and_relative_change_match_scipy(random_w):
    W, mask = random_w
    got = M.output_entropy_per_source(W, mask, "2", 0.0)
    for k in range(len(W)):
        for u in range(mask.shape[1]):
            out = np.abs(W[k][mask[:, u], u])
            assert got[k, u] == pytest.approx(sps.entropy(out, base=2), rel=1e-12, abs=1e-15)
    half = len(W) // 2
    base, tuned = W[:half], W[half:]
    rel = M.relative_change(M.mean_abs(base), M.mean_abs(tuned), mask)
    for d, u in zip(*np.nonzero(mask)):
        b = np.mean([abs(w[d, u]) for w in base])
        t = np.mean([abs(w[d, u]) for w in tuned])
        assert rel[d, u] == pytest.approx((t - b) / b, rel=1e-12)
    assert np.isnan(rel[~mask]).all()


def test_histogram_spec_validates():
    with pytest.raises(ValueError, match="log_base"):
        M.HistogramSpec(log_base="3")
    with pytest.raises(ValueError, match="bins"):
        M.HistogramSpec(bins=0)
    with pytest.raises(ValueError, match="range"):
        M.HistogramSpec(range=(2.0, 1.0))
