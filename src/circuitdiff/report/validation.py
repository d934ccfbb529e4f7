"""Report section for `circuitdiff validate` and `circuitdiff intervene` results in a run directory.

Reads the run's validation results (+ the PNG each names) and intervention results (store.layout
finds them). No files: no section. A file that cannot be
read is listed by name instead of stopping the report.
"""

from __future__ import annotations

from pathlib import Path

from circuitdiff.report.html import Figure, Section, Table
from circuitdiff.report.tables import fmt
from circuitdiff.store import layout
from circuitdiff.store.artifacts import read_result as _read


def _ci(effect: dict | None) -> str:
    if not effect:
        return ""
    lo, hi = effect["ci"]
    return f"{fmt(effect['mean'])} [{fmt(lo)}, {fmt(hi)}]"


def validation_blocks(run_dir: Path) -> tuple[list, list[str]]:
    """(Table + Figures, unreadable file names) for the validation results."""
    header = ["objective", "method", "role", "dataset", "alpha", "granularity", "edges", "samples", "Spearman", "Pearson", "Spearman |.|",
              "sign agreement", "top-10 overlap", "top-5% overlap", "Spearman pooled"]
    rows, figures, bad = [], [], []
    for scoring, role, dataset, alpha, path in layout.find_validations(run_dir):
        objective, method = layout.parse_scoring(scoring)
        data = _read(path)
        s = (data or {}).get("summary")
        if not isinstance(s, dict):
            bad.append(str(path.relative_to(run_dir)))
            continue
        rows.append([objective, method, role, dataset, alpha, str(data.get("granularity")), f"{data.get('n_edges')} ({s.get('edges_chosen', '')})",
                     str(data.get("n_samples")), fmt(s["spearman"]), fmt(s["pearson"]), fmt(s.get("spearman_abs", float("nan"))),
                     f"{fmt(s['sign_agreement'])} of {s['n_sign_edges']} edges with |dL| > {s['sign_threshold']:g}"
                     + (f" (W > 0: {fmt(s['sign_agreement_W_pos'])}, W < 0: {fmt(s['sign_agreement_W_neg'])})"
                        if "sign_agreement_W_pos" in s else ""),
                     fmt(s["top10_overlap"]), f"{fmt(s['top5pct_overlap'])} (k={s['top5pct_k']})",
                     fmt(s.get("spearman_pooled", float("nan")))])  # fmt: skip
        png = path.parent / str(data.get("figure", path.with_suffix(".png").name))
        if png.is_file():
            figures.append(Figure(png.read_bytes(), f"{role}, {dataset}, alpha={alpha}, objective {objective}: exact "
                                  f"zero-ablation change dL of the objective (x) vs {method} score W (y) per edge, means over "
                                  "samples; dashed: W = dL.",
                                  f"fig_validation_{scoring}_{role}_{dataset}_alpha={alpha}.png"))  # fmt: skip
    blocks = [Table(header, rows)] + figures if rows else []
    return blocks, bad


def intervention_blocks(run_dir: Path) -> tuple[list, list[str]]:
    header = ["objective", "edges scored by", "role", "dataset", "alpha", "edges", "factor", "measure", "n", "unmodified", "targeted - unmodified [95% CI]",
              "random - unmodified [95% CI]", "random draws", "targeted - random [95% CI]"]
    rows, bad = [], []
    for scoring, role, dataset, alpha, path in layout.find_interventions(run_dir):
        objective, method = layout.parse_scoring(scoring)
        data = _read(path)
        effects = (data or {}).get("effects")
        if not isinstance(effects, dict):
            bad.append(str(path.relative_to(run_dir)))
            continue
        meta = data.get("meta", {})
        edges = f"{meta.get('edges_selector', '?')}, k={len(data.get('targeted_edges', []))}"
        for metric, unit in (("loss", " nats" if objective == "nll" else " (minus centred logit)"), ("accuracy", "")):
            e = effects.get(metric)
            if not e:
                continue
            draws = e.get("random_draw_effects") or []
            rows.append([objective, method, role, dataset, alpha, edges, f"{data.get('factor'):g}", metric + unit, str(e["n"]), fmt(e["mean_none"]),
                         _ci(e.get("targeted_minus_none")), _ci(e.get("random_minus_none")),
                         f"{len(draws)}: {fmt(min(draws))} .. {fmt(max(draws))}" if draws else "",
                         _ci(e.get("targeted_minus_random"))])  # fmt: skip
    return ([Table(header, rows)] if rows else []), bad


def validation_section(ctx) -> list[Section]:
    """EAP vs exact ablation and edge interventions, when the run directory holds their results."""
    run_dir = Path(ctx.run_dir)
    val, bad_val = validation_blocks(run_dir)
    itv, bad_itv = intervention_blocks(run_dir)
    sections = []
    if val or bad_val:
        text = ("EAP is a first-order estimate of the loss change when an edge is removed. Here each edge was removed "
                "exactly (zero ablation: destination d receives x_d - O_u, nothing else changes) and the loss change "
                "dL = L(edge removed) - L(clean) measured (L: the attribution's objective, named in each row). "
                "Correlations are over edges of the sample-mean W and dL (pooled: over every (sample, edge) pair); sign "
                "agreement counts edges whose |dL| exceeds the stated threshold; top-k overlap ranks edges by |value|.")
        if bad_val:
            text += "\n\nUnreadable files (skipped): " + ", ".join(bad_val)
        sections.append(Section("EAP vs exact edge ablation", text, val))
    if itv or bad_itv:
        text = ("Edges scaled by a factor c inside one model (d receives x_d - (1-c)*O_u, O_u from the same forward; c=0 "
                "removes them) against random real edges (same k and c, several seeded draws). Effects are differences "
                "to the unmodified model on the same questions with 95% paired-bootstrap CIs over questions; the random "
                "column averages the draws per question (its CI does not include the draw-to-draw spread, listed in "
                "'random draws'). Loss: the objective of each row on the model's own answer tokens; accuracy: fresh greedy answers "
                "with the intervention active.")
        if bad_itv:
            text += "\n\nUnreadable files (skipped): " + ", ".join(bad_itv)
        sections.append(Section("Edge interventions", text, itv))
    return sections
