"""`validate`: EAP against exact edge ablation on the same samples.

EAP scores an edge (u -> d) with the first-order estimate W[d, u] = -<dL/dx_d, O_u> of the
loss change when the edge is removed. `validate` measures that loss change exactly
(circuitdiff.engine.ablation: destination d receives x_d - O_u, every other node unchanged,
dL = L(edge removed) - L(clean), per sample) and compares the two over the chosen edges:
correlations, sign agreement, top-k overlap (`agreement`, `summarize`), and a scatter plot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from circuitdiff import io
from circuitdiff.choices import DEFAULT_IG_RULE, DEFAULT_IG_STEPS, OBJECTIVES, check_choice
from circuitdiff.errors import UserError
from circuitdiff.graph import Edge, Graph, all_edges, as_edge, edge_index, parse_node

ABLATION_CONVENTION = (
    "zero ablation of one edge u->d: d receives x_d - O_u (O_u = u's clean output, all positions), "
    "every other node unchanged; dL = L(edge removed) - L(clean)"
)
def loss_convention(objective: str = "nll") -> str:
    """The L of dL and of W: the attribution's objective, per sample."""
    return f"per sample: {OBJECTIVES[objective]} (the engine's answer_loss, objective {objective})"
EAP_CONVENTION = "EAP W[d,u] = -<dL/dx_d, O_u> summed over positions and hidden dims; W > 0: removing the edge raises the loss"
DEFAULT_SIGN_THRESHOLD = 1e-5
TIMINGS = ("seconds_exact", "seconds_eap")  # kept in memory and in the run's manifest, not in the result file


# ---------------------------------------------------------------- agreement
def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k of |a| and top-k of |b|| / k (edges ranked by absolute value)."""
    k = max(1, min(int(k), len(a)))
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(W: np.ndarray, dL: np.ndarray, sign_threshold: float = DEFAULT_SIGN_THRESHOLD) -> dict:
    """EAP W [n_edges] vs exact dL [n_edges] (same edge order): correlations, sign agreement, top-k overlap."""
    from scipy import stats

    W, dL = np.asarray(W, dtype=np.float64), np.asarray(dL, dtype=np.float64)
    n = len(W)
    out: dict = {"n_edges": n}
    if n >= 3 and np.ptp(W) > 0 and np.ptp(dL) > 0:
        out["spearman"] = float(stats.spearmanr(W, dL).statistic)
        out["pearson"] = float(stats.pearsonr(W, dL).statistic)
        out["spearman_abs"] = float(stats.spearmanr(np.abs(W), np.abs(dL)).statistic)
    else:
        out["spearman"] = out["pearson"] = out["spearman_abs"] = float("nan")
    big = np.abs(dL) > sign_threshold
    out["sign_threshold"] = sign_threshold
    out["n_sign_edges"] = int(big.sum())
    out["sign_agreement"] = float(np.mean(np.sign(W[big]) == np.sign(dL[big]))) if big.any() else float("nan")
    for name, side in (("W_pos", big & (W > 0)), ("W_neg", big & (W < 0))):  # does removal act as EAP predicts?
        out[f"sign_agreement_{name}"] = float(np.mean(np.sign(dL[side]) == np.sign(W[side]))) if side.any() else float("nan")
        out[f"n_{name}"] = int(side.sum())
    out["fraction_dL_positive"] = float(np.mean(dL > 0)) if n else float("nan")
    k5 = max(1, math.ceil(0.05 * n))
    out["top10_overlap"] = topk_overlap(W, dL, 10)
    out["top5pct_k"] = k5
    out["top5pct_overlap"] = topk_overlap(W, dL, k5)
    ratio = np.abs(W[big]) / np.abs(dL[big]) if big.any() else np.array([np.nan])
    out["median_abs_ratio_W_over_dL"] = float(np.median(ratio))
    return out


def summarize(W: np.ndarray, dL: np.ndarray, sign_threshold: float = DEFAULT_SIGN_THRESHOLD, how: str = "") -> dict:
    """Agreement of W and dL [n_samples, n_edges]: of the sample means (main numbers), pooled over every
    (sample, edge) pair (*_pooled), and per sample (*_per_sample lists)."""
    summary = agreement(W.mean(0), dL.mean(0), sign_threshold)
    pooled = agreement(W.ravel(), dL.ravel(), sign_threshold)
    summary.update({f"{k}_pooled": pooled[k] for k in ("spearman", "pearson", "sign_agreement", "n_sign_edges")})
    per_sample = [agreement(W[k], dL[k], sign_threshold) for k in range(len(W))]
    for key in ("spearman", "pearson", "sign_agreement", "top10_overlap"):
        summary[f"{key}_per_sample"] = [p[key] for p in per_sample]
    summary["edges_chosen"] = how
    return summary


# ---------------------------------------------------------------- result
@dataclass
class Validation:
    """Exact ablation vs EAP for a list of edges on the same samples."""

    edges: list[Edge]
    dL: np.ndarray  # [n_samples, n_edges] exact loss change
    W: np.ndarray  # [n_samples, n_edges] EAP score
    clean_loss: np.ndarray  # [n_samples]
    granularity: str
    summary: dict  # agreement of the sample means, plus the pooled (sample, edge) correlations
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        dL_mean, W_mean = self.dL.mean(0), self.W.mean(0)
        return {
            "summary": self.summary,
            "granularity": self.granularity,
            "n_samples": int(self.dL.shape[0]),
            "n_edges": len(self.edges),
            "clean_loss": self.clean_loss.tolist(),
            "conventions": conventions(self.summary.get("sign_threshold", DEFAULT_SIGN_THRESHOLD),
                                       self.meta.get("objective", "nll"), self.meta.get("method_definition")),
            "meta": {k: v for k, v in self.meta.items() if k not in TIMINGS},  # a result holds no wall-clock time
            "edges": [
                {"edge": e.name, "src": e.src, "dst": e.dst, "dL_mean": float(dL_mean[i]), "W_mean": float(W_mean[i]),
                 "dL": self.dL[:, i].tolist(), "W": self.W[:, i].tolist()}
                for i, e in enumerate(self.edges)
            ],
        }  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "Validation":
        """Read a JSON written by `save` (the per-sample values of every edge)."""
        data = io.read_json(path)
        edges = [Edge(e["src"], e["dst"]) for e in data["edges"]]
        dL = np.array([e["dL"] for e in data["edges"]], dtype=np.float64).T.reshape(data["n_samples"], len(edges))
        W = np.array([e["W"] for e in data["edges"]], dtype=np.float64).T.reshape(data["n_samples"], len(edges))
        return cls(edges, dL, W, np.asarray(data["clean_loss"]), data["granularity"], data["summary"], data.get("meta", {}))

    def save(self, json_path: str | Path, png_path: str | Path | None = None) -> tuple[Path, Path | None]:
        json_path = Path(json_path)
        png_path = Path(png_path) if png_path is not None else json_path.with_suffix(".png")
        io.write_bytes(png_path, scatter_png(self))
        data = self.to_json()
        data["figure"] = png_path.name
        io.write_json(json_path, data)
        return json_path, png_path


def units(objective: str = "nll") -> str:
    """The unit of the objective and of its changes: nats for nll, logits for logit."""
    return "nats" if objective == "nll" else "logits"


def conventions(sign_threshold: float = DEFAULT_SIGN_THRESHOLD, objective: str = "nll",
                method_definition: str | None = None) -> dict:
    return {
        "ablation": ABLATION_CONVENTION,
        "loss": loss_convention(objective),
        "eap": EAP_CONVENTION,
        "method": method_definition or "eap: " + EAP_CONVENTION,
        "correlations": "Spearman and Pearson over the chosen edges of the sample-mean dL and sample-mean W "
                        "(*_pooled: over every (sample, edge) pair; *_per_sample: over edges, one value per sample)",
        "sign_agreement": f"fraction of edges with sign(W_mean) == sign(dL_mean) among edges with |dL_mean| > {sign_threshold:g} {units(objective)} "
                          "(_W_pos / _W_neg: among those with W > 0 / W < 0)",
        "topk_overlap": "|top-k edges by |W_mean| and top-k by |dL_mean|| / k, for k = 10 and k = ceil(5% of the chosen edges)",
    }  # fmt: skip


def choose_edges(graph: Graph, max_edges: int | None, seed: int = 0) -> tuple[list[Edge], str]:
    """(edges, how): every real edge, or a seeded uniform random subset of `max_edges` of them."""
    edges = all_edges(graph)
    if max_edges is None or max_edges >= len(edges):
        return edges, f"all {len(edges)} real edges"
    if max_edges < 1:
        raise UserError(f"--max-edges {max_edges} must be >= 1")
    pick = np.sort(np.random.default_rng(seed).choice(len(edges), size=max_edges, replace=False))
    return [edges[i] for i in pick], f"{max_edges} of {len(edges)} real edges drawn uniformly without replacement (seed {seed})"


DEFAULT_MAX_EDGES = {"block": None, "qkv": 300, "head": 300}


def validate(
    model,
    samples: str | Path | list[dict],
    *,
    granularity: str = "block",
    edges: Sequence[Edge] | None = None,
    max_edges: int | None = -1,
    seed: int = 0,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    sign_threshold: float = DEFAULT_SIGN_THRESHOLD,
    objective: str = "nll",
    method: str = "eap",
    ig_steps: int = DEFAULT_IG_STEPS,
    ig_rule: str = DEFAULT_IG_RULE,
    progress: bool = False,
) -> Validation:
    """Exact ablation dL and EAP W for the chosen edges on `samples`, and their agreement.

    `model`: a spec for `load_model`, a LoadedModel or a Hugging Face causal LM. `edges`: explicit
    edges, else every real edge (max_edges=None) or a seeded random subset of max_edges; the
    default (-1) is every edge at block granularity and 300 random edges at qkv/head.
    """
    from circuitdiff.attribute import attribute
    from circuitdiff.engine import ModelNodes, exact_edge_effects
    from circuitdiff.models import LoadedModel, resolve_model
    from circuitdiff.samples import as_samples

    check_choice("objective", objective, OBJECTIVES)
    samples = as_samples(samples)
    spec, model, hf = resolve_model(model, dtype, device)
    nodes = ModelNodes(hf, granularity)
    if edges is None:
        limit = DEFAULT_MAX_EDGES[granularity] if max_edges == -1 else max_edges
        edges, how = choose_edges(nodes.graph, limit, seed)
    else:
        edges = [as_edge(e, nodes.graph) for e in edges]
        how = f"{len(edges)} given edges"
    if not edges:
        raise UserError("no edges to validate")

    t0 = time.perf_counter()
    attr = attribute(hf, samples, granularity=granularity, batch_size=1, objective=objective, method=method,
                     ig_steps=ig_steps, ig_rule=ig_rule)
    t_eap = time.perf_counter() - t0
    g = nodes.graph
    rows, cols = edge_index(edges, g)
    W = attr.scores[:, rows, cols].astype(np.float64)
    t0 = time.perf_counter()
    dL, clean = exact_edge_effects(hf, samples, edges, granularity=granularity, batch_size=batch_size,
                                   objective=objective, progress=progress)
    t_exact = time.perf_counter() - t0

    summary = summarize(W, dL, sign_threshold, how)
    param = next(hf.parameters())
    meta = {
        "model": spec,
        "model_type": hf.config.model_type,
        "model_dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "n_layers": nodes.shape.n_layers,
        "n_edges_graph": g.n_edges,
        "batch_size": batch_size,
        "seconds_exact": round(t_exact, 3),
        "seconds_eap": round(t_eap, 3),
        "seed": seed,
        "objective": objective,
        "method": attr.meta["method"],
        "method_definition": attr.meta["method_definition"],
        "sample_lengths": [len(s["prompt_ids"]) + s["cut_len"] for s in samples],
        "cut_len": [s["cut_len"] for s in samples],
    }
    if isinstance(model, LoadedModel):
        meta["model_info"] = model.info
    return Validation(list(edges), dL, W, clean, granularity, summary, meta)


# ---------------------------------------------------------------- figure
def scatter_png(result: Validation) -> bytes:
    """Exact dL (x) vs EAP W (y), sample means, symlog axes, one colour per destination kind."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x, y = result.dL.mean(0), result.W.mean(0)
    kinds = np.array([parse_node(e.dst)[0] for e in result.edges])
    both = np.concatenate([np.abs(x), np.abs(y)])
    nonzero = both[both > 0]
    # linear within +-linthresh (a power of ten near the 5% quantile of the values), log outside
    linthresh = 10.0 ** math.floor(math.log10(float(np.quantile(nonzero, 0.05)))) if nonzero.size else 1e-6
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    for kind, colour in (("attn", "tab:blue"), ("mlp", "tab:orange"), ("logits", "tab:green")):
        sel = kinds == kind
        if sel.any():
            ax.scatter(x[sel], y[sel], s=9, alpha=0.6, color=colour, label=f"destination {kind} ({int(sel.sum())})", lw=0)
    lim = float(both.max()) * 1.3 if both.size and both.max() > 0 else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="W = dL")
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(base=10, linthresh=linthresh, subs=[1.0]))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.tick_params(labelsize=7)
    for label in ax.get_xticklabels():
        label.set_rotation(45)
    ax.axhline(0, color="black", lw=0.4)
    ax.axvline(0, color="black", lw=0.4)
    s = result.summary
    ax.set_title(
        f"{result.meta.get('model', '')}: {result.granularity}, {len(result.edges)} edges, {result.dL.shape[0]} samples\n"
        f"Spearman {s['spearman']:.3f}, Pearson {s['pearson']:.3f}, sign agreement {s['sign_agreement']:.3f}, "
        f"top-10 overlap {s['top10_overlap']:.2f}",
        fontsize=9,
    )
    ax.set_xlabel(f"exact dL = L(edge removed) - L(clean) [{units(result.meta.get('objective', 'nll'))}], mean over "
                  "samples (zero ablation)\n"
                  f"symlog axes: linear within +-{linthresh:.0e}", fontsize=8)
    ax.set_ylabel("EAP W = -<dL/dx_d, O_u>, mean over samples", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def summary_line(result: Validation) -> str:
    s = result.summary
    return (
        f"{len(result.edges)} edges ({s['edges_chosen']}), granularity={result.granularity}, {result.dL.shape[0]} samples; "
        f"over edges, sample-mean W ({result.meta.get('method', 'eap')}) vs exact zero-ablation dL: Spearman "
        f"{s['spearman']:.4f}, Pearson {s['pearson']:.4f}, "
        f"Spearman of |.| {s['spearman_abs']:.4f}; sign agreement {s['sign_agreement']:.4f} over the {s['n_sign_edges']} "
        f"edges with |dL| > {s['sign_threshold']:g} {units(result.meta.get('objective', 'nll'))} "
        f"({s['sign_agreement_W_pos']:.4f} of the {s['n_W_pos']} with W > 0, "
        f"{s['sign_agreement_W_neg']:.4f} of the {s['n_W_neg']} with W < 0; dL > 0 for {s['fraction_dL_positive']:.4f} "
        f"of all); top-10 overlap {s['top10_overlap']:.2f}, "
        f"top-{s['top5pct_k']} (5%) overlap {s['top5pct_overlap']:.2f}; pooled over (sample, edge): Spearman "
        f"{s['spearman_pooled']:.4f}, Pearson {s['pearson_pooled']:.4f}, sign agreement {s['sign_agreement_pooled']:.4f}; "
        f"per sample: Spearman {_listed(s['spearman_per_sample'])}, sign agreement "
        f"{_listed(s['sign_agreement_per_sample'])} (objective {result.meta.get('objective', 'nll')}: "
        f"{OBJECTIVES[result.meta.get('objective', 'nll')]}; "
        + (f"exact {result.meta['seconds_exact']:.1f} s, EAP {result.meta['seconds_eap']:.1f} s)"
           if "seconds_exact" in result.meta else "timings in the run's manifest)")
    )


def _listed(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
