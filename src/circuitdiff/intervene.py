"""`intervene`: scale chosen edges inside one model and measure loss and task accuracy.

Scaling edge (u -> d) by a factor c means destination d receives x_d - (1 - c) * O_u
(c = 0 removes the edge, c = 1 changes nothing); every other node is unchanged except that
everything downstream of d is recomputed. O_u is u's output in the SAME forward pass
(forward hooks capture it, a pre-hook on d's norm subtracts it; sources always precede
their destinations), so with several edges an edited source passes its edited output on,
and greedy generation with a KV cache subtracts, at every step, the sources of the new
positions: the same model as a no-cache recomputation of the whole sequence.

Conditions, all on the same questions (paired):
- ``none``: the unmodified model;
- ``targeted``: the chosen edges scaled by c;
- ``random``: ``n_random`` draws of k real edges (excluding the targeted edges, seeded), each
  scaled by c: ``matched`` (default in a run: each targeted edge gets a partner in the same
  destination-layer band whose mean |W| is among the `caliper` closest to its own, on a log
  scale; `matched_draws`) or ``uniform`` (any real edges).
Measures per question: the objective on the model's own greedy answer tokens answer_ids[:cut_len]
given the prompt, as in attribution (`objective`: the mean NLL by default, or minus the mean
centred logit), and correctness of a fresh greedy answer generated with the intervention active
(graded with circuitdiff.grade).
Effects are differences to ``none`` with 95% paired-bootstrap CIs over questions (the same
resampled questions for every condition); the random control is the mean over its draws
per question, and ``targeted - random`` is paired the same way. The CIs cover question
sampling only; the spread over the random draws is listed per draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from circuitdiff import io
from circuitdiff.choices import OBJECTIVES, check_choice
from circuitdiff.errors import UserError
from circuitdiff.graph import Edge, Graph, all_edges, as_edge, dst_layer, edge_index

INTERVENTION_CONVENTION = (
    "edge u->d scaled by factor c: d receives x_d - (1-c)*O_u, O_u = u's output in the same (intervened) forward "
    "pass; c=0 removes the edge, c=1 changes nothing; applied at every position and every generation step"
)
def loss_convention(objective: str = "nll") -> str:
    return f"per question, on the model's own greedy answer: {OBJECTIVES[objective]} (objective {objective})"
ACCURACY_CONVENTION = ("per question: a fresh greedy answer generated with the intervention active, graded with "
                       "circuitdiff.grade (an answer cut at the token cap without a \\boxed{} answer is wrong)")
GROWTH_CONVENTION = "top-grown: largest absolute growth mean|W_tuned| - mean|W_base| (mean over samples), real edges only"
SELECTORS = ("top", "top-grown")
CONTROLS = {
    "matched": "each draw gives every targeted edge a partner: a real, non-targeted edge whose destination lies in the "
               "same layer band (bands equal slices of the decoder layers + logits) and whose mean |W| (the intervened "
               "model's) is among the `caliper` closest to the targeted edge's in |log mean|W||, drawn uniformly; no "
               "edge twice in one draw; a band with no untargeted edge left lends from the nearest band",
    "uniform": "each draw: k real edges, uniform without replacement, targeted edges excluded",
}
TIMINGS = ("seconds_loss", "seconds_generate")  # kept in memory and in the run's manifest, not in the result file


# ---------------------------------------------------------------- edge choice
def edge_values(scores: np.ndarray, graph: Graph) -> tuple[list[Edge], np.ndarray]:
    """(every real edge, its mean |W| over samples) from scores [n_samples, n_dst, n_src]."""
    edges = all_edges(graph)
    mean_abs = np.abs(np.asarray(scores, dtype=np.float64)).mean(0)
    rows, cols = edge_index(edges, graph)
    return edges, mean_abs[rows, cols]


def top_edges(values: np.ndarray, edges: list[Edge], k: int) -> list[Edge]:
    """The k edges with the largest value (ties: residual order)."""
    check_k(k, len(edges))
    order = np.argsort(-values, kind="stable")[:k]
    return [edges[i] for i in order]


def check_k(k: int, n_edges: int) -> None:
    if k < 1 or k > n_edges:
        raise UserError(f"k={k} must be between 1 and the number of real edges ({n_edges})")


def random_draws(edges: list[Edge], exclude: Sequence[Edge], k: int, n_draws: int, seed: int = 0) -> list[list[Edge]]:
    """n_draws sets of k real edges, uniform without replacement, none of them in `exclude`."""
    excluded = set(exclude)
    pool = [e for e in edges if e not in excluded]
    if k > len(pool):
        raise UserError(f"k={k} random control edges requested but only {len(pool)} real edges are not targeted")
    rng = np.random.default_rng(seed)
    return [[pool[i] for i in np.sort(rng.choice(len(pool), size=k, replace=False))] for _ in range(n_draws)]


def layer_band(edge: Edge, n_layers: int, bands: int) -> int:
    """The band (0 .. bands-1) of the decoder layer that reads edge's destination (logits: the last layer + 1)."""
    return min(bands - 1, dst_layer(edge.dst, n_layers) * bands // (n_layers + 1))


def matched_draws(targeted: Sequence[Edge], edges: list[Edge], values: np.ndarray, n_layers: int, n_draws: int,
                  seed: int = 0, bands: int = 4, caliper: int = 10) -> list[list[Edge]]:
    """n_draws control sets matched to `targeted` edge by edge (CONTROLS["matched"]); values: mean |W| per edge of
    `edges` (edge_values). When a band has no untargeted edge left, the nearest band that has one is used
    (`match_quality` counts how often); no partner anywhere is a UserError."""
    if bands < 1 or caliper < 1:
        raise UserError(f"bands={bands} and caliper={caliper} must be >= 1")
    value = dict(zip(edges, np.asarray(values, dtype=np.float64)))
    floor = 1e-12 * max(max(value.values(), default=0.0), 1e-30)  # log of a zero score
    logv = {e: np.log(max(v, floor)) for e, v in value.items()}
    excluded = set(targeted)
    by_band: dict[int, list[Edge]] = {}
    for e in edges:
        if e not in excluded:
            by_band.setdefault(layer_band(e, n_layers, bands), []).append(e)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_draws):
        used: set[Edge] = set()
        draw = []
        for t in targeted:
            home = layer_band(t, n_layers, bands)
            candidates = []
            for band in sorted(range(bands), key=lambda b: (abs(b - home), b)):
                candidates = [e for e in by_band.get(band, []) if e not in used]
                if candidates:
                    break
            if not candidates:
                raise UserError(f"no untargeted edge left to pair with {t.name} for the matched control; "
                                "use fewer edges (--k) or control: uniform")
            distance = np.abs(np.array([logv[e] for e in candidates]) - logv[t])
            nearest = np.argsort(distance, kind="stable")[:caliper]
            pick = candidates[int(nearest[rng.integers(len(nearest))])]
            used.add(pick)
            draw.append(pick)
        draws.append(draw)
    return draws


def match_quality(targeted: Sequence[Edge], draws: list[list[Edge]], edges: list[Edge], values: np.ndarray,
                  n_layers: int, bands: int) -> dict:
    """How close the matched draws are: the largest |log(mean|W| partner / mean|W| target)|, the median ratio,
    and how many partners came from another band than their target's."""
    value = dict(zip(edges, np.asarray(values, dtype=np.float64)))
    pairs = [(t, p) for draw in draws for t, p in zip(targeted, draw)]
    ratios = [value[p] / value[t] for t, p in pairs if value[t] > 0 and value[p] > 0]
    other = sum(layer_band(t, n_layers, bands) != layer_band(p, n_layers, bands) for t, p in pairs)
    out = {"pairs": len(pairs), "pairs_from_another_band": int(other)}
    if ratios:
        logs = np.abs(np.log(ratios))
        out.update({"max_abs_log_ratio": float(logs.max()), "median_ratio": float(np.median(ratios))})
    return out


def targeted_edges(selector: str, k: int, role: str, attrs: dict, graph: Graph) -> tuple[list[Edge], str]:
    """(edges, how) for selector 'top' (largest mean |W| of `role`), 'top-grown' (largest mean|W_tuned| -
    mean|W_base|) or a comma list 'u->d,...'. attrs: role -> Attribution (the roles the selector reads)."""
    if selector == "top":
        edges, values = edge_values(attrs[role].scores, graph)
        n = len(attrs[role].scores)
        return top_edges(values, edges, k), f"top {k} edges by mean |W| of {role} (mean over {n} samples)"
    if selector == "top-grown":
        edges, vb = edge_values(attrs["base"].scores, graph)
        _, vt = edge_values(attrs["tuned"].scores, graph)
        return top_edges(vt - vb, edges, k), f"top {k} edges by {GROWTH_CONVENTION.split(': ', 1)[1]}"
    edges = [as_edge(t, graph) for t in selector.split(",") if t.strip()]
    if not edges:
        raise UserError(f"--edges {selector!r} names no edge; use top, top-grown or 'u->d,...'")
    return edges, f"{len(edges)} given edges"


def selector_roles(selector: str, role: str) -> list[str]:
    """The roles whose attribution files a selector reads."""
    return {"top": [role], "top-grown": ["base", "tuned"]}.get(selector, [])


# ---------------------------------------------------------------- statistics
def paired_effects(values: dict[str, np.ndarray], n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Effects of `targeted` and `random` (mean over draws) vs `none`, and targeted - random, with bootstrap CIs.

    values: condition -> [n_questions] ("none", "targeted") or [n_draws, n_questions] ("random").
    Paired bootstrap: one resample of question indices serves every condition.
    """
    from circuitdiff.stats import bootstrap_indices, percentile_ci

    none, targeted = values["none"], values["targeted"]
    random = values.get("random")
    diffs = {"targeted_minus_none": targeted - none}
    if random is not None and len(random):
        diffs["random_minus_none"] = random.mean(0) - none
        diffs["targeted_minus_random"] = targeted - random.mean(0)
    n = len(none)
    idx = bootstrap_indices(n, n_boot, np.random.default_rng(seed))
    out = {"mean_none": float(none.mean()), "mean_targeted": float(targeted.mean()), "n": n}
    if random is not None and len(random):
        out["mean_random"] = float(random.mean())
        out["random_draw_effects"] = [float((r - none).mean()) for r in random]
    for name, d in diffs.items():
        boot = d[idx].mean(1)
        lo, hi = percentile_ci(boot, level)
        out[name] = {"mean": float(d.mean()), "ci": [float(lo), float(hi)]}
    return out


# ---------------------------------------------------------------- result
@dataclass
class Intervention:
    targeted: list[Edge]
    random: list[list[Edge]]
    factor: float
    granularity: str
    loss: dict  # condition -> per-question values ("random": [n_draws][n])
    correct: dict | None  # same, 0/1; None when accuracy was not measured
    effects: dict  # {"loss": paired_effects, "accuracy": paired_effects}
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "factor": self.factor,
            "granularity": self.granularity,
            "targeted_edges": [e.name for e in self.targeted],
            "random_edges": [[e.name for e in draw] for draw in self.random],
            "effects": self.effects,
            "per_question": {"loss": self.loss, "correct": self.correct},
            "conventions": {
                "intervention": INTERVENTION_CONVENTION,
                "loss": loss_convention(self.meta.get("objective", "nll")),
                "accuracy": ACCURACY_CONVENTION,
                "random_control": self.meta.get("control", CONTROLS["uniform"]) + "; random effect = per question "
                                  "mean over draws, then mean over questions",
                "ci": "95% percentile interval of a paired bootstrap over questions (same resample for every "
                      "condition); excludes the variability of the random draws (listed in random_draw_effects)",
                "growth": GROWTH_CONVENTION,
            },
            "meta": {k: v for k, v in self.meta.items() if k not in TIMINGS},  # a result holds no wall-clock time
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        return io.write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "Intervention":
        """The result `to_json` wrote (edges by name, per-question values as lists)."""
        def edge(name: str) -> Edge:
            return Edge(*name.split("->", 1))

        return cls([edge(e) for e in data["targeted_edges"]], [[edge(e) for e in draw] for draw in data["random_edges"]],
                   data["factor"], data["granularity"], data["per_question"]["loss"], data["per_question"]["correct"],
                   data["effects"], data.get("meta", {}))


def intervene(
    model,
    targeted: Sequence[Edge | str],
    *,
    factor: float = 0.0,
    granularity: str = "block",
    loss_samples: list[dict] | None = None,
    questions: list[dict] | None = None,
    random: Sequence[Sequence[Edge]] | int = 5,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    decode: Callable[[list[int]], str] | None = None,
    max_new_tokens: int = 128,
    gen_batch_size: int = 16,
    loss_batch_size: int = 8,
    n_boot: int = 10000,
    objective: str = "nll",
    truncated_rule: str = "strict",
    progress: bool = False,
) -> Intervention:
    """Scale `targeted` edges by `factor` in `model` (a Hugging Face causal LM) and measure the effects.

    loss_samples: [{prompt_ids, answer_ids, cut_len}] for the loss, one per question.
    questions: [{prompt_ids, gold, kind}] for accuracy (greedy answers with the edits active; needs
    eos_ids and decode); None skips accuracy. random: explicit control draws, or a number of draws
    of len(targeted) random real edges (seeded). Both lists must hold the same questions in the
    same order when both are given (the bootstrap pairs them by position).
    """
    from circuitdiff.engine import EdgeEditor, generate_with_edits, losses_with_edits
    from circuitdiff.grade import grade

    check_choice("objective", objective, OBJECTIVES)
    editor = EdgeEditor(model, granularity)
    targeted = [as_edge(e, editor.graph) for e in targeted]
    if not targeted:
        raise UserError("no edges to intervene on")
    if len(set(targeted)) != len(targeted):
        raise UserError("the targeted edges contain duplicates")
    if isinstance(random, int):
        random = random_draws(all_edges(editor.graph), targeted, len(targeted), random, seed)
    random = [[as_edge(e, editor.graph) for e in draw] for draw in random]
    if loss_samples is None and questions is None:
        raise UserError("nothing to measure: pass loss_samples and/or questions")
    coef = 1.0 - float(factor)
    conditions = {"none": [], "targeted": [(e, coef) for e in targeted]}
    for j, draw in enumerate(random):
        conditions[f"random{j}"] = [(e, coef) for e in draw]

    from tqdm.auto import tqdm

    loss = correct = None
    timings = {}
    model_was_training = model.training
    model.eval()
    try:
        if loss_samples:
            t0 = time.perf_counter()
            loss = {name: losses_with_edits(model, editor, loss_samples, edits, loss_batch_size, objective)
                    for name, edits in tqdm(conditions.items(), desc="loss", disable=not progress)}
            timings["seconds_loss"] = round(time.perf_counter() - t0, 3)
        if questions:
            if eos_ids is None or decode is None:
                raise UserError("accuracy needs eos_ids and decode (the tokenizer's)")
            t0 = time.perf_counter()
            prompts = [q["prompt_ids"] for q in questions]
            correct, answers = {}, {}
            for name, edits in tqdm(conditions.items(), desc="generate", disable=not progress):
                gens = generate_with_edits(model, editor, prompts, edits, eos_ids=eos_ids, pad_id=pad_id,
                                           max_new_tokens=max_new_tokens, batch_size=gen_batch_size)
                answers[name] = [g.answer_ids for g in gens]
                correct[name] = np.array([float(grade(decode(g.answer_ids), q["gold"], q.get("kind", "numeric"),
                                                      finished=g.stop == "eos", truncated_rule=truncated_rule).correct)
                                          for g, q in zip(gens, questions)])
            timings["seconds_generate"] = round(time.perf_counter() - t0, 3)
    finally:
        model.train(model_was_training)

    effects = {}
    for metric, table in (("loss", loss), ("accuracy", correct)):
        if table is not None:
            values = {"none": table["none"], "targeted": table["targeted"],
                      "random": np.array([table[f"random{j}"] for j in range(len(random))])}
            effects[metric] = paired_effects(values, n_boot, seed)

    def lists(table):
        if table is None:
            return None
        return {"none": table["none"].tolist(), "targeted": table["targeted"].tolist(),
                "random": [table[f"random{j}"].tolist() for j in range(len(random))]}

    meta = {"n_loss_samples": len(loss_samples or []), "n_questions": len(questions or []), "seed": seed,
            "objective": objective, "truncated_rule": truncated_rule,
            "max_new_tokens": max_new_tokens, "model_type": model.config.model_type,
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""), **timings}
    result = Intervention(targeted, random, float(factor), granularity, lists(loss), lists(correct), effects, meta)
    if correct is not None:
        result.meta["answers_changed_targeted"] = int(sum(a != b for a, b in zip(answers["none"], answers["targeted"])))
    return result


def summary_line(result: Intervention) -> str:
    parts = [f"{len(result.targeted)} edges scaled by factor {result.factor:g} (granularity={result.granularity}) "
             f"vs {len(result.random)} random draws of {len(result.targeted)} edges"]
    for metric, unit in (("loss", "nats"), ("accuracy", "")):
        e = result.effects.get(metric)
        if e is None:
            continue
        t, r, tr = e["targeted_minus_none"], e.get("random_minus_none"), e.get("targeted_minus_random")
        text = (f"{metric} (unmodified {e['mean_none']:.4f}{' ' + unit if unit else ''}, n={e['n']}): targeted "
                f"{t['mean']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]")
        if r is not None:
            draws = e["random_draw_effects"]
            text += (f", random {r['mean']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] (draws {min(draws):+.4f} .. "
                     f"{max(draws):+.4f}), targeted - random {tr['mean']:+.4f} [{tr['ci'][0]:+.4f}, {tr['ci'][1]:+.4f}]")
        parts.append(text)
    return "; ".join(parts) + " (effects vs the unmodified model, 95% paired-bootstrap CIs over questions)"
