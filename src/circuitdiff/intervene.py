"""Stage `intervene`: scale chosen edges inside one model and measure loss and task accuracy.

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
- ``random``: ``n_random`` draws of k real edges (uniform, without replacement, excluding
  the targeted edges, seeded), each scaled by c.
Measures per question: the loss (mean NLL of the model's own greedy answer tokens
answer_ids[:cut_len] given the prompt, as in attribution) and correctness of a fresh greedy
answer generated with the intervention active (graded with circuitdiff.grade).
Effects are differences to ``none`` with 95% paired-bootstrap CIs over questions (the same
resampled questions for every condition); the random control is the mean over its draws
per question, and ``targeted - random`` is paired the same way. The CIs cover question
sampling only; the spread over the random draws is listed per draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch

from circuitdiff import io, rundir
from circuitdiff.engine import answer_loss, make_batch
from circuitdiff.errors import UserError
from circuitdiff.graph import Graph
from circuitdiff.models.adapters import get_module
from circuitdiff.validate import Edge, EdgeEditor, all_edges, parse_edge

INTERVENTION_CONVENTION = (
    "edge u->d scaled by factor c: d receives x_d - (1-c)*O_u, O_u = u's output in the same (intervened) forward "
    "pass; c=0 removes the edge, c=1 changes nothing; applied at every position and every generation step"
)
LOSS_CONVENTION = "per question: mean NLL of the model's own greedy answer answer_ids[:cut_len] given the prompt"
ACCURACY_CONVENTION = "per question: a fresh greedy answer generated with the intervention active, graded with circuitdiff.grade"
GROWTH_CONVENTION = "top-grown: largest absolute growth mean|W_tuned| - mean|W_base| (mean over samples), real edges only"


# ---------------------------------------------------------------- edge choice
def edge_values(scores: np.ndarray, graph: Graph) -> tuple[list[Edge], np.ndarray]:
    """(every real edge, its mean |W| over samples) from scores [n_samples, n_dst, n_src]."""
    edges = all_edges(graph)
    mean_abs = np.abs(np.asarray(scores, dtype=np.float64)).mean(0)
    values = np.array([mean_abs[graph.dst_index[e.dst], graph.src_index[e.src]] for e in edges])
    return edges, values


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


# ---------------------------------------------------------------- measuring
@torch.no_grad()
def losses_with_edits(model, editor: EdgeEditor, samples: list[dict], edits, batch_size: int = 8) -> np.ndarray:
    """Per-sample answer loss [n_samples] (float64) with `edits` [(edge, coefficient)] active."""
    adapter = editor.adapter
    backbone = get_module(model, adapter.backbone)
    device = model.get_input_embeddings().weight.device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    out = np.zeros(len(samples))
    for start in range(0, len(samples), batch_size):
        batch = make_batch(samples[start : start + batch_size], pad_id, device)
        with editor.edits(edits):
            hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
            out[start : start + batch_size] = answer_loss(model, adapter, hidden, batch).double().cpu().numpy()
    return out


def generate_with_edits(model, editor: EdgeEditor, prompts: list[list[int]], edits, *, eos_ids: Sequence[int],
                        pad_id: int | None = None, max_new_tokens: int = 128, batch_size: int = 16) -> list:
    """Greedy answers (generate.Generation: answer_ids before EOS, stop) with `edits` active, KV cache on.

    Batching as the pipeline's generate stage (HFBackend: left padding, prompts sorted by length,
    longest first); the order of the returned list is that of `prompts`.
    """
    from circuitdiff.generate import HFBackend

    tokenizer = SimpleNamespace(eos_token_id=list(eos_ids), pad_token_id=pad_id)
    backend = HFBackend(model, tokenizer, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list = [None] * len(prompts)
    with editor.edits(edits):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, gen in zip(rows, backend.generate([prompts[i] for i in rows])):
                results[i] = gen
    return results


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
                "loss": LOSS_CONVENTION,
                "accuracy": ACCURACY_CONVENTION,
                "random_control": "each draw: k real edges, uniform without replacement, targeted edges excluded; "
                                  "random effect = per question mean over draws, then mean over questions",
                "ci": "95% percentile interval of a paired bootstrap over questions (same resample for every "
                      "condition); excludes the variability of the random draws (listed in random_draw_effects)",
                "growth": GROWTH_CONVENTION,
            },
            "meta": self.meta,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        return io.write_json(path, self.to_json())


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
    progress: bool = False,
) -> Intervention:
    """Scale `targeted` edges by `factor` in `model` (a Hugging Face causal LM) and measure the effects.

    loss_samples: [{prompt_ids, answer_ids, cut_len}] for the loss, one per question.
    questions: [{prompt_ids, gold, kind}] for accuracy (greedy answers with the edits active; needs
    eos_ids and decode); None skips accuracy. random: explicit control draws, or a number of draws
    of len(targeted) random real edges (seeded). Both lists must hold the same questions in the
    same order when both are given (the bootstrap pairs them by position).
    """
    from circuitdiff.grade import grade

    editor = EdgeEditor(model, granularity)
    targeted = [parse_edge(e.name if isinstance(e, Edge) else e, editor.graph) for e in targeted]
    if not targeted:
        raise UserError("no edges to intervene on")
    if len(set(targeted)) != len(targeted):
        raise UserError("the targeted edges contain duplicates")
    if isinstance(random, int):
        random = random_draws(all_edges(editor.graph), targeted, len(targeted), random, seed)
    random = [[parse_edge(e.name, editor.graph) for e in draw] for draw in random]
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
            loss = {name: losses_with_edits(model, editor, loss_samples, edits, loss_batch_size)
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
                correct[name] = np.array([float(grade(decode(g.answer_ids), q["gold"], q.get("kind", "numeric")).correct)
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


# ---------------------------------------------------------------- run directory
def _load_attr(run: Path, role: str, dataset: str, alpha: float):
    from circuitdiff.attribute import Attribution

    path = rundir.attribution(run, role, dataset, alpha)
    if not path.exists():
        raise UserError(f"{path} does not exist; run the attribute stage first (or check --role/--dataset/--alpha)")
    return Attribution.load(path)


def choose_targeted(run: Path, role: str, dataset: str, alpha: float, selector: str, k: int, graph_of) -> tuple[list[Edge], str, str]:
    """(edges, how, granularity) for selector 'top', 'top-grown' or a comma list 'u->d,...'.

    graph_of(granularity) -> the model's Graph; the attribution files must match it.
    """
    if selector in ("top", "top-grown"):
        roles = [role] if selector == "top" else ["base", "tuned"]
        attrs = {r: _load_attr(run, r, dataset, alpha) for r in roles}
        granularity = attrs[roles[0]].granularity
        graph = graph_of(granularity)
        for r, attr in attrs.items():
            if attr.src_names != graph.src_names or attr.dst_names != graph.dst_names:
                raise UserError(f"{rundir.attribution(run, r, dataset, alpha)}: its nodes do not match the {role} model "
                                f"at granularity {granularity}; re-run attribution")
        if selector == "top":
            edges, values = edge_values(attrs[role].scores, graph)
            n = len(attrs[role].scores)
            return top_edges(values, edges, k), f"top {k} edges by mean |W| of {role} (mean over {n} samples)", granularity
        edges, vb = edge_values(attrs["base"].scores, graph)
        _, vt = edge_values(attrs["tuned"].scores, graph)
        return top_edges(vt - vb, edges, k), f"top {k} edges by {GROWTH_CONVENTION.split(': ', 1)[1]}", granularity
    attr_path = rundir.attribution(run, role, dataset, alpha)
    granularity = _load_attr(run, role, dataset, alpha).granularity if attr_path.exists() else "block"
    graph = graph_of(granularity)
    edges = [parse_edge(t, graph) for t in selector.split(",") if t.strip()]
    if not edges:
        raise UserError(f"--edges {selector!r} names no edge; use top, top-grown or 'u->d,...'")
    return edges, f"{len(edges)} given edges", granularity


def run_questions(run: Path, role: str, dataset: str, alpha: float, n_questions: int) -> tuple[list[dict], list[dict], int]:
    """(questions, loss samples, T_cut): the first n questions (by idx) of the role's generations.

    Loss samples: each question's own greedy answer, cut_len = min(T_cut, answer length) with T_cut of
    the selection; questions with an empty answer get no loss sample (loss is paired on the others).
    """
    gen, sel_path = rundir.generations(run, role, dataset), rundir.selection(run, dataset, alpha)
    for path, stage in ((gen, "generate"), (sel_path, "select")):
        if not path.exists():
            raise UserError(f"{path} does not exist; run the {stage} stage first or check --run/--dataset/--alpha")
    T_cut = int(io.read_json(sel_path)["T_cut"])
    rows = sorted(io.read_jsonl_tolerant(gen), key=lambda r: r["idx"])[:n_questions]
    if not rows:
        raise UserError(f"{gen} holds no answers")
    questions = [{"idx": r["idx"], "prompt_ids": r["prompt_ids"], "gold": r["gold"], "kind": r.get("kind", "numeric")} for r in rows]
    samples = [{"idx": r["idx"], "prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"],
                "cut_len": min(T_cut, len(r["answer_ids"]))} for r in rows if r["answer_ids"]]
    return questions, samples, T_cut


def run_intervention(
    run_dir: str | Path,
    *,
    role: str = "tuned",
    dataset: str,
    alpha: float,
    edges: str = "top-grown",
    k: int = 10,
    factor: float = 0.0,
    n_random: int = 5,
    n_questions: int = 40,
    max_new_tokens: int = 128,
    accuracy: bool = True,
    seed: int = 0,
    dtype: str | None = None,
    device: str = "cpu",
    gen_batch_size: int = 16,
    loss_batch_size: int = 8,
    progress: bool = False,
) -> Intervention:
    """`intervene` on a run directory: model from manifest.json, edges from its attribution files."""
    from circuitdiff.models import load_model
    from circuitdiff.validate import run_model_spec

    run = Path(run_dir)
    spec, run_dtype = run_model_spec(run, role)
    if k < 1:
        raise UserError(f"--k {k} must be >= 1")
    questions, samples, T_cut = run_questions(run, role, dataset, alpha, n_questions)
    loaded = load_model(spec, dtype or run_dtype, device, tokenizer=accuracy)
    hf = loaded.model

    def graph_of(granularity):
        return EdgeEditor(hf, granularity).graph

    targeted, how, granularity = choose_targeted(run, role, dataset, alpha, edges, k, graph_of)
    from circuitdiff.generate import eos_token_ids

    tok = loaded.tokenizer
    # pair the loss and the accuracy on the same questions: keep only questions with a loss sample
    with_loss = {s["idx"] for s in samples}
    questions = [q for q in questions if q["idx"] in with_loss] if accuracy else []
    result = intervene(
        hf, targeted, factor=factor, granularity=granularity, loss_samples=samples, questions=questions or None,
        random=n_random, seed=seed, eos_ids=eos_token_ids(hf, tok) if accuracy else None,
        pad_id=getattr(tok, "pad_token_id", None), decode=(lambda ids: tok.decode(ids, skip_special_tokens=True)) if accuracy else None,
        max_new_tokens=max_new_tokens,
        gen_batch_size=gen_batch_size, loss_batch_size=loss_batch_size, progress=progress,
    )
    result.meta.update({"run": str(run), "role": role, "dataset": dataset, "alpha": alpha, "model": spec,
                        "edges_selector": edges, "edges_chosen": how, "k": len(targeted), "T_cut": T_cut,
                        "question_idx": [s["idx"] for s in samples], "dtype": dtype or run_dtype})
    return result


def default_out(run_dir: str | Path, role: str, dataset: str, alpha: float, selector: str, k: int, factor: float) -> Path:
    label = selector if selector in ("top", "top-grown") else "custom"
    return (Path(run_dir) / "intervention" / role / dataset / rundir.alpha_tag(alpha)
            / f"{label}_k={k}_factor={float(factor)!r}.json")


# ---------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "intervene",
        help="scale chosen edges (targeted vs random control) and measure loss and accuracy with CIs",
        description="Scale edges u->d by FACTOR in one model of a run (d receives x_d - (1-FACTOR)*O_u) and measure "
                    "the answer loss and greedy accuracy against the unmodified model and a random-edge control.",
    )
    p.add_argument("--run", required=True, help="run directory written by `circuitdiff run`")
    p.add_argument("--role", choices=rundir.ROLES, default="tuned")
    p.add_argument("--dataset", required=True)
    p.add_argument("--alpha", type=float, required=True, help="alpha of the attribution files and T_cut")
    p.add_argument("--edges", default="top-grown",
                   help="top-grown (largest mean|W_tuned| - mean|W_base|), top (largest mean|W| of the role), "
                        "or a comma list 'u->d,...'")
    p.add_argument("--k", type=int, default=10, help="number of edges for top/top-grown (default 10)")
    p.add_argument("--factor", type=float, default=0.0, help="scale factor c (0 = remove, 1 = unchanged; default 0)")
    p.add_argument("--n-random", type=int, default=5, help="random control draws of k edges (default 5)")
    p.add_argument("--n-questions", type=int, default=40, help="first N questions of the role's generations (default 40)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-accuracy", action="store_true", help="measure the loss only (no generation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], help="default: the run's dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--out", help="output directory (default RUN_DIR/intervention/{role}/{dataset}/alpha={a}/)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    if args.n_random < 0:
        raise UserError(f"--n-random {args.n_random} must be >= 0")
    result = run_intervention(
        args.run, role=args.role, dataset=args.dataset, alpha=args.alpha, edges=args.edges, k=args.k, factor=args.factor,
        n_random=args.n_random, n_questions=args.n_questions, max_new_tokens=args.max_new_tokens,
        accuracy=not args.no_accuracy, seed=args.seed, dtype=args.dtype, device=args.device,
        gen_batch_size=args.gen_batch_size, progress=True,
    )
    path = default_out(args.run, args.role, args.dataset, args.alpha, args.edges, len(result.targeted), args.factor)
    if args.out:
        path = Path(args.out) / path.name
    result.save(path)
    print(f"wrote {path}: {summary_line(result)}")
    return 0
