"""Report section for `circuitdiff features`: the crosscoder's quality, the classes beside the null control,
the relative-norm histogram, the compact set, the interventions and the top latents' contexts.

Reads RUN/features/layer={L}/ (store.layout.find_feature_layers) or any features folder (`feature_sections`);
nothing there: no section. Also used for the folder's own features.html.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from circuitdiff.report.html import Figure, Section, Table
from circuitdiff.report.tables import fmt, fmt_p
from circuitdiff.store import layout

TOP_CONTEXTS = 3


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def histogram(latents: list[dict], null: list[dict], labels: list[str], null_labels: list[str]) -> bytes:
    """Relative norm (NRN of the last model) of the alive latents, main vs null crosscoder."""
    from circuitdiff.report.figures import plt, to_png

    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.linspace(0, 1, 51)
    for rows, colour, name in ((latents, "#DD8452", f"{' vs '.join(labels)}"),
                               (null, "#4C72B0", f"null: {' vs '.join(null_labels)}")):
        values = [_num(r["relative_norm"]) for r in rows if r["class"] != "dead"]
        if values:
            ax.hist(values, bins=bins, alpha=0.6, color=colour, label=f"{name} ({len(values)} alive latents)")
    ax.set_yscale("log")
    ax.set_xlabel(f"relative norm r = ||d_{labels[-1]}|| / sum of decoder norms")
    ax.set_ylabel("latents")
    for x in (0.1, 0.3, 0.7, 0.9):
        ax.axvline(x, color="#888", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    return to_png(fig)


def figure_name(layer) -> str:
    return f"fig_features_layer={layer}_relative_norm.png"


def _class_table(summary: dict) -> Table:
    null = summary.get("null", {})
    spurious = null.get("spurious_model_only")
    rows = []
    for klass, n in summary.get("counts", {}).items():
        beside = ""
        if klass.endswith("-only") and spurious is not None:
            beside = f"{spurious} (null: {', '.join(f'{c} {v}' for c, v in null.get('null_model_only', {}).items())})"
        rows.append([klass, str(n), beside])
    return Table(["class", "latents", "spurious model-only latents in the null control"], rows,
                 caption=f"Classes ({summary.get('conventions', {}).get('thresholds', '')})")


def feature_sections(folder: Path, title_suffix: str = "") -> list[Section]:
    folder = Path(folder)
    path = layout.features_file(folder, "summary")
    if not path.exists():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [Section(f"Feature-level diffing{title_suffix}", f"{path} cannot be read (skipped).")]
    s, labels = summary.get("settings", {}), summary.get("models", [])
    names = [m["label"] for m in labels]
    quality = [[m["label"], m["spec"], fmt(summary["fvu"].get(m["label"], float("nan")))] for m in labels]
    null = summary.get("null", {})
    for label, value in null.get("fvu", {}).items():
        quality.append([f"null crosscoder: {label}", null.get("specs", {}).get(label, ""), fmt(value)])
    text = (f"A crosscoder ({summary.get('n_latents')} latents = {s.get('dict_size')} x d_model, BatchTopK k = "
            f"{s.get('k')}) trained jointly on the residual stream after layer {summary.get('layer')} of "
            f"{', '.join(names)} on the same {summary.get('tokens', {}).get('train')} tokens per model "
            f"({summary.get('tokens', {}).get('held_out')} held out for every number below). Dead latents: "
            f"{fmt(summary.get('dead_fraction', float('nan')))} of all (null crosscoder: "
            f"{fmt(null.get('dead_fraction', float('nan')))}). Every model-only count stands beside the number of "
            "model-only latents that the same procedure finds between the base model and a null model (itself, "
            "or a null fine-tune): only an excess over it can be a difference between the models. Conventions: "
            + "; ".join(f"{k}: {v}" for k, v in summary.get("conventions", {}).items() if k != "thresholds"))
    blocks: list = [Table(["model", "spec", "FVU (held out)"], quality, caption="Reconstruction"), _class_table(summary)]
    latents = _csv(layout.features_file(folder, "latents"))
    null_rows = _csv(layout.features_file(folder, "latents_null"))
    if latents:
        blocks.append(Figure(histogram(latents, null_rows, names, null.get("labels", ["base", "null"])),
                             "Relative decoder norm of every alive latent (log scale); dashed: the class thresholds "
                             "0.1 / 0.3 / 0.7 / 0.9 (two models).", figure_name(summary.get("layer"))))
    attribution = [r for r in _csv(layout.features_file(folder, "attribution")) if r.get("in_compact_set") == "True"]
    if attribution:
        blocks.append(Table(["dataset", "rank", "latent", "attribution (nats)", "class", "relative norm", "questions"],
                            [[r["dataset"], r["rank"], r["latent"], fmt(_num(r["attribution"])), r["class"],
                              fmt(_num(r["relative_norm"])), r["n_questions"]] for r in attribution],
                            caption="Compact set: in the top-K by attribution of every dataset"))
    interventions = [r for r in _csv(layout.features_file(folder, "interventions"))
                     if not r["condition"].startswith("random-")]
    if interventions:
        blocks.append(Table(["model", "decoder", "factor", "measure", "condition", "n", "value", "effect vs none [95% CI]",
                             "McNemar p", "random draws"],
                            [[r["model"], r["decoder"], r["factor"], r["measure"], r["condition"], r["n_questions"],
                              fmt(_num(r["value"])), f"{fmt(_num(r['effect']))} [{fmt(_num(r['ci_low']))}, "
                              f"{fmt(_num(r['ci_high']))}]", fmt_p(_num(r["p_mcnemar"])),
                              f"{fmt(_num(r['draws_min']))} .. {fmt(_num(r['draws_max']))}" if r.get("draws_min") else ""]
                             for r in interventions], caption="Interventions at the layer (the crosscoder's error "
                                                              "term kept): compact set vs matched random sets"))
    contexts_path = layout.features_file(folder, "contexts")
    if contexts_path.exists():
        contexts = json.loads(contexts_path.read_text(encoding="utf-8"))
        rows = [[str(c["latent"]), c["class"], fmt(c["relative_norm"]), fmt(c["frequency"]), c["why"],
                 "\n".join(f"{fmt(x['activation'])}: {x['context']}" for x in c["top"][:TOP_CONTEXTS])]
                for c in contexts.get("latents", [])]
        blocks.append(Table(["latent", "class", "relative norm", "frequency", "shown because", "max-activating contexts "
                             "(held out; the token itself in [[ ]])"], rows, caption="Top latents"))
    return [Section(f"Feature-level diffing, layer {summary.get('layer')}{title_suffix}", text, blocks)]


def features_section(ctx) -> list[Section]:
    """Every features folder of the run (RUN/features/layer={L})."""
    out: list[Section] = []
    for _, folder in layout.find_feature_layers(Path(ctx.run_dir)):
        out += feature_sections(folder)
    return out
