"""`circuitdiff report` on a synthetic run with a planted change: files, numbers, tolerance, errors."""

import csv
import json

import numpy as np
import pytest
from report_fixture import GAIN, PLANTED_SOURCE, make_run, write_w
from scipy import stats as sps

from circuitdiff import cli
from circuitdiff.errors import UserError
from circuitdiff.store import layout
from circuitdiff.graph import Graph
from circuitdiff.report import Settings, build_report
from circuitdiff.report import build_report as build
from circuitdiff.report.sections import heatmap_section, samples_section, skipped_section
from circuitdiff.report.compute import aggregate, group_node

SETTINGS = Settings(n_boot=1000, n_perm=1000, bins=50)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"), n=20)
    out = build_report(run, SETTINGS)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return run, out, rows


def _row(rows, dataset, alpha, metric, role, entries="all", scale="raw"):
    (row,) = [r for r in rows if (r["dataset"], r["alpha"], r["metric"], r["role"], r["entries"], r["scale"], r["text"],
                                  r["objective"]) == (dataset, alpha, metric, role, entries, scale, "own", "nll")]
    return row


def _unit(X):
    """Each sample divided by its own mean |W| (the unit scale), written directly."""
    return X / np.abs(X).mean(axis=1, keepdims=True)


def _load(run, role, dataset, alpha):
    with np.load(layout.attribution(run, role, dataset, float(alpha))) as d:
        return d["scores"].astype(np.float64), d["edge_mask"], [str(s) for s in d["src_names"]]


def test_writes_every_file(report):
    _, out, rows = report
    names = {p.name for p in out.iterdir()}
    for name in ("metrics.csv", "node_entropy.csv", "edge_change.csv", "table.md", "table.tex", "report.html",
                 "fig_metrics_vs_alpha_planted.png", "fig_relative_change_planted.png",
                 "fig_diversity_planted_alpha=0.1.png", "fig_node_entropy_planted_alpha=0.1.png",
                 "fig_metrics_vs_alpha_null.png"):  # fmt: skip
        assert name in names, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # 3 pairs x 2 entries modes x (4 raw + 3 unit metrics: unit intensity is 1) x 3 roles; planted alpha=0.5 has
    # no tuned file
    assert len(rows) == 3 * 2 * (4 + 3) * 3
    assert {r["role"] for r in rows} == {"base", "tuned", "diff"} and {r["scale"] for r in rows} == {"raw", "unit"}
    assert {r["text"] for r in rows} == {"own"} and {r["objective"] for r in rows} == {"nll"}
    assert not [r for r in rows if r["scale"] == "unit" and r["metric"] == "activation_intensity"]
    for col in ("granularity", "entries", "bins", "range", "log_base", "eps", "loss", "n_samples", "n_boot", "seed"):
        assert all(r[col] != "" for r in rows), col
    r = rows[0]
    assert r["granularity"] == "qkv" and r["bins"] == "50" and r["n_boot"] == "1000" and r["n_samples"] == "20"
    assert "T_cut=" in r["loss"] and "shared" in r["range"]


@pytest.mark.parametrize("scale", ["raw", "unit"])
@pytest.mark.parametrize("entries", ["all", "edges"])
def test_metric_values_match_an_independent_computation(report, entries, scale):
    run, _, rows = report
    for dataset, alpha in (("planted", "0.1"), ("planted", "0.3"), ("null", "0.1")):
        Wb, mask, _ = _load(run, "base", dataset, alpha)
        Wt, _, _ = _load(run, "tuned", dataset, alpha)
        pick = (lambda W: W.reshape(len(W), -1)) if entries == "all" else (lambda W: W[:, mask])
        Xb, Xt = pick(Wb), pick(Wt)
        if scale == "unit":
            Xb, Xt = _unit(Xb), _unit(Xt)
        hi = max(np.abs(Xb).max(), np.abs(Xt).max())
        expected = {}
        for role, X in (("base", Xb), ("tuned", Xt)):
            iu = np.triu_indices(len(X), 1)
            expected[role] = {
                "activation_intensity": np.abs(X).mean(),
                "information_complexity": sps.entropy(np.histogram(np.abs(X).ravel(), bins=50, range=(0, hi))[0]),
                "distribution_kurtosis": sps.kurtosis(X, axis=1).mean(),
                "diversity": 1 - np.corrcoef(X)[iu].mean(),
            }
        for metric in expected["base"]:
            if scale == "unit" and metric == "activation_intensity":
                assert expected["base"][metric] == pytest.approx(1.0)  # why it is not reported
                continue
            b, t = (float(_row(rows, dataset, alpha, metric, role, entries, scale)["value"]) for role in ("base", "tuned"))
            d = _row(rows, dataset, alpha, metric, "diff", entries, scale)
            assert b == pytest.approx(expected["base"][metric], rel=1e-6), metric
            assert t == pytest.approx(expected["tuned"][metric], rel=1e-6), metric
            assert float(d["value"]) == pytest.approx(t - b, rel=1e-9, abs=1e-15)
            for role in ("base", "tuned", "diff"):
                r = _row(rows, dataset, alpha, metric, role, entries, scale)
                assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]), (metric, role)


def test_planted_change_is_found_and_null_is_not(report):
    run, _, rows = report
    Wb, mask, src = _load(run, "base", "planted", "0.1")
    planted = np.zeros(mask.shape, bool)
    planted[:, src.index(PLANTED_SOURCE)] = True
    planted &= mask
    # tuned intensity ~ base intensity + (GAIN - 1) x the base mass on the planted edges
    expected_diff = (GAIN - 1) * np.abs(Wb[:, planted]).sum() / Wb[0].size / len(Wb)
    diff = _row(rows, "planted", "0.1", "activation_intensity", "diff")
    assert float(diff["value"]) == pytest.approx(expected_diff, rel=0.25)
    assert diff["arrow"] == "up" and float(diff["ci_low"]) > 0 and float(diff["p_perm"]) < 0.01
    assert _row(rows, "planted", "0.1", "diversity", "diff")["arrow"] == "up"
    for metric in ("activation_intensity", "information_complexity", "diversity"):
        d = _row(rows, "null", "0.1", metric, "diff")
        assert d["arrow"] == "" and float(d["ci_low"]) < 0 < float(d["ci_high"]), metric
        assert float(d["p_perm"]) > 0.05
    # Holm-adjusted p-values are never below the raw ones
    for r in rows:
        if r["role"] == "diff":
            assert float(r["p_perm_holm"]) >= float(r["p_perm"])


def test_edge_change_shows_the_planted_source(report):
    _, out, _ = report
    with open(out / "edge_change.csv") as f:
        edges = [r for r in csv.DictReader(f) if r["dataset"] == "planted"]
    planted = [float(r["rel_change"]) for r in edges if r["src"] == PLANTED_SOURCE]
    other = [float(r["rel_change"]) for r in edges if r["src"] != PLANTED_SOURCE]
    assert np.median(planted) == pytest.approx(GAIN - 1, abs=0.25)
    assert abs(np.median(other)) < 0.1


def test_tables_have_paper_layout_and_arrows(report):
    _, out, _ = report
    md = (out / "table.md").read_text()
    assert "## each model on its own answers; objective = nll, method = eap, entries = all, alpha = 0.1" in md
    assert "## each model on its own answers; objective = nll, method = eap, entries = edges, alpha = 0.3" in md
    assert "| Dataset | Metric | unit scale: base → tuned; Δ [95% CI]; p | raw scale:" in md  # unit first
    intensity = [line for line in md.splitlines() if line.startswith("| planted | Act. Intens.")]
    assert intensity and all("↑" in line and "1 (by construction)" in line for line in intensity)
    null_lines = md.split("| null |")[1].split("| planted |")[0]
    assert "↑" not in null_lines.split("Dist. Kurt.")[0]  # null intensity and complexity: no arrow
    tex = (out / "table.tex").read_text()
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 4
    assert "$\\uparrow$" in tex and "50 bins" in tex
    for line in tex.splitlines():
        if line.endswith("\\\\") and not line.startswith("Dataset"):
            assert line.count(" & ") == 4, line  # dataset, metric, unit, raw, n


def test_html_is_self_contained_and_names_conventions(report):
    _, out, _ = report
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == len(list(out.glob("*.png")))
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for text in ("Summary table", "Conventions", "entries", "log base", "Skipped", "no tuned attribution file", "50 equal-width bins"):
        assert text in html, text


def test_partial_run_and_mismatched_pair(tmp_path):
    run = make_run(tmp_path / "run", n=8)
    # break one pair: the tuned file has fewer samples
    Wt, mask, _ = _load(run, "tuned", "planted", "0.3")
    write_w(layout.attribution(run, "tuned", "planted", 0.3), Wt[:5], Graph(3, "qkv"), np.ones(5), "t")
    out = build(run, Settings(n_boot=200, n_perm=200, entries=("edges",)), tmp_path / "rep", [skipped_section])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["dataset"], r["alpha"]) for r in rows} == {("planted", "0.1"), ("null", "0.1")}
    assert {r["entries"] for r in rows} == {"edges"}
    assert "base has 8 samples, tuned 5" in (out / "report.html").read_text()


def _metrics(out):
    with open(out / "metrics.csv") as f:
        return {(r["dataset"], r["alpha"], r["entries"], r["metric"], r["role"]): r for r in csv.DictReader(f)}


def test_samples_are_paired_by_question_idx(tmp_path):
    run = make_run(tmp_path / "run", n=10)
    settings = Settings(n_boot=200, n_perm=200)
    builders = [samples_section, skipped_section]  # no figures: faster

    def build_report(run, settings, out_dir):
        return build(run, settings, out_dir, builders)

    before = _metrics(build_report(run, settings, out_dir=tmp_path / "a"))
    # store tuned's samples in another order, with their idx: the report must pair them back
    path = layout.attribution(run, "tuned", "planted", 0.1)
    with np.load(path) as d:
        W, loss, meta = d["scores"], d["loss"], json.loads(str(d["meta"]))
    order = np.random.default_rng(0).permutation(10)
    write_w(path, W[order], Graph(3, "qkv"), loss[order], "t", [meta["idx"][k] for k in order])
    out = build_report(run, settings, out_dir=tmp_path / "b")
    after = _metrics(out)
    assert after.keys() == before.keys()
    for key, row in before.items():
        for col in ("value", "ci_low", "ci_high", "p_perm"):
            if row[col]:
                assert float(after[key][col]) == pytest.approx(float(row[col]), rel=1e-9, abs=1e-300), (key, col)
    assert "question idx (tuned reordered)" in (out / "report.html").read_text()
    # without recorded idx the samples are paired by position, and a shuffled file changes diversity's diff
    write_w(path, W[order], Graph(3, "qkv"), loss[order], "t", None)
    shuffled = _metrics(build_report(run, settings, out_dir=tmp_path / "c"))
    key = ("planted", "0.1", "all", "diversity", "diff")
    assert shuffled[key]["p_perm"] != before[key]["p_perm"]
    # different questions: skipped
    write_w(path, W, Graph(3, "qkv"), loss, "t", [7 + k for k in range(10)])
    out = build_report(run, settings, out_dir=tmp_path / "d")
    assert ("planted", "0.1", "all", "diversity", "diff") not in _metrics(out)
    assert "scored different questions (0 of 10 shared)" in (out / "report.html").read_text()


def test_head_granularity_aggregates_heads(tmp_path):
    run = make_run(tmp_path / "run", n=6, n_layers=2, granularity="head", n_heads=4, n_kv_heads=2)
    out = build(run, Settings(n_boot=200, n_perm=200), None, [heatmap_section])
    Wb, mask, src = _load(run, "base", "null", "0.1")
    graph = Graph(2, "head", 4, 2)
    with open(out / "edge_change.csv") as f:
        edges = {(r["dst"], r["src"]): r for r in csv.DictReader(f) if r["dataset"] == "null"}
    assert ("attn.1.q", "attn.0") in edges and edges[("attn.1.q", "attn.0")]["aggregation"] == "heads summed"
    # attn.1.q <- attn.0 is the sum over 4 query heads x 4 source heads of mean |W|
    rows = [i for i, n in enumerate(graph.dst_names) if group_node(n) == "attn.1.q"]
    cols = [j for j, n in enumerate(graph.src_names) if group_node(n) == "attn.0"]
    assert len(rows) == 4 and len(cols) == 4
    expected = np.abs(Wb[:, rows][:, :, cols]).mean(0).sum()
    assert float(edges[("attn.1.q", "attn.0")]["mean_abs_base"]) == pytest.approx(expected, rel=1e-6)
    A, gd, gs = aggregate(np.ones(mask.shape), graph.dst_names, graph.src_names)
    assert A.sum() == mask.size and "attn.0.k" in gd and "attn.0" in gs


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no attribution"):
        build_report(tmp_path / "empty")
    run = make_run(tmp_path / "run", n=4)
    for p in (run / "attribution" / "nll" / "tuned").rglob("*.npz"):
        p.unlink()
    with pytest.raises(UserError, match="no tuned attribution file"):
        build_report(run)


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run", n=6)
    code = cli.main(["report", str(run), "--n-boot", "200", "--n-perm", "200", "--bins", "20", "--log-base", "2",
                     "--entries", "edges", "--range", "0:0.02"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "report.html" in captured.out and "bins=20" in captured.out
    assert "skipped planted alpha=0.5" in captured.err
    with open(run / "report" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["log_base"] for r in rows} == {"2"}
    assert {r["range"] for r in rows if r["scale"] == "raw"} == {"[0, 0.02] fixed"}
    assert all(r["range"].endswith(" shared") for r in rows if r["scale"] == "unit")  # a fixed range is in raw units
    assert cli.main(["report", str(run), "--range", "big"]) == 2
    assert "--range 'big'" in capsys.readouterr().err
    code = cli.main(["report", str(run), "--n-boot", "200", "--n-perm", "200", "--range", "own", "--entries", "edges"])
    assert code == 0
    with open(run / "report" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "information_complexity" and r["role"] == "diff"]
    assert rows and all(r["range"].endswith(" own") and r["p_perm"] == "nan" for r in rows)
    assert cli.main(["report", str(run), "--entries", "dense"]) == 2
    assert json.loads((run / "manifest.json").read_text())["models"]["base"] == "synthetic-base"


def test_a_rescaled_model_differs_on_the_raw_scale_only(tmp_path):
    """tuned = 2 x base, question by question (a surer model whose loss gradient halved would look like this,
    inverted): the unit scale sees no difference at all, the raw intensity ratio is exactly 2, and the raw
    Information Complexity on the shared range moves although no edge changed its share (the confound);
    each model's own range removes that."""
    rng = np.random.default_rng(5)
    graph, n = Graph(3, "block"), 8
    base = rng.standard_t(4, size=(n, *graph.edge_mask.shape)) * graph.edge_mask
    run = tmp_path / "run"
    idx = list(range(n))
    write_w(layout.attribution(run, "base", "scaled", 0.1), base, graph, np.ones(n), "b", idx)
    write_w(layout.attribution(run, "tuned", "scaled", 0.1), 2.0 * base, graph, np.ones(n), "t", idx)  # exact in binary

    def metrics(range_):
        out = build(run, Settings(n_boot=200, n_perm=200, range=range_), tmp_path / f"rep-{range_}", [])
        with open(out / "metrics.csv") as f:
            return {(r["entries"], r["scale"], r["metric"], r["role"]): float(r["value"]) for r in csv.DictReader(f)}

    shared = metrics("shared")
    for entries in ("all", "edges"):
        for metric in ("information_complexity", "distribution_kurtosis", "diversity"):
            assert shared[(entries, "unit", metric, "diff")] == 0.0, (entries, metric)
        ratio = shared[(entries, "raw", "activation_intensity", "tuned")] / shared[(entries, "raw", "activation_intensity", "base")]
        assert ratio == pytest.approx(2.0, rel=1e-12)
        assert shared[(entries, "raw", "information_complexity", "diff")] > 0.1  # bins shared: base fills half of them
        assert shared[(entries, "raw", "distribution_kurtosis", "diff")] == pytest.approx(0.0, abs=1e-9)
    own = metrics("own")
    assert own[("all", "raw", "information_complexity", "diff")] == pytest.approx(0.0, abs=1e-12)


def test_loss_relation_by_hand():
    from circuitdiff.report.compute import loss_relation
    from circuitdiff.stats import bootstrap_indices, index_weights

    rng = np.random.default_rng(2)
    Ib, Lb = rng.uniform(0.5, 2, 30), rng.uniform(0.2, 1, 30)
    dL = rng.normal(-0.5, 0.3, 30)
    Lt = Lb * np.exp(dL)
    It = Ib * np.exp(0.8 * dL + 0.1 + rng.normal(0, 0.01, 30))  # intensity follows the loss with slope 0.8
    w = index_weights(bootstrap_indices(30, 500, np.random.default_rng(0)), 30)
    rel = loss_relation(Ib, It, Lb, Lt, w, 0.95)
    slope, intercept = np.polyfit(np.log(Lt / Lb), np.log(It / Ib), 1)
    assert rel["slope"] == pytest.approx(slope, rel=1e-10) and rel["slope_ci"][0] < 0.8 < rel["slope_ci"][1]
    assert rel["mean_dlog_intensity"] == pytest.approx(np.log(It / Ib).mean(), rel=1e-12)
    assert not loss_relation(Ib, It, -Lb, Lt, w, 0.95)["defined"]  # the logit objective can be negative
