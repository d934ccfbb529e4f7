"""Stage `intervention`: scale chosen edges in one model of a run vs random edges (circuitdiff.intervene).

Questions: the first n (by idx) of the role's generations; loss samples: each one's own answer
cut at min(T_cut, its length), T_cut from the selection; accuracy: fresh greedy answers with
the edits active. Edges: top / top-grown from the run's attribution files, or a given list.
Output: intervention/{scoring}/{role}/{dataset}/alpha={a}/{label}.json, keyed by the settings, the model
and dtype, and the keys of the generations, the selection and the attribution files it read.
Runs in `circuitdiff run` when the config has an `intervention:` section, and from
`circuitdiff intervene`.
"""

from __future__ import annotations

from pathlib import Path

from circuitdiff.config import InterventionConfig
from circuitdiff.errors import UserError
from circuitdiff.graph import Graph, all_edges
from circuitdiff.intervene import SELECTORS, selector_roles, targeted_edges
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import read_key, settings_key, up_to_date, write_key

UNKEYED = {"gen_batch_size", "loss_batch_size"}  # settings that do not change a result
IG_ONLY = {"method", "ig_steps", "ig_rule"}  # left out of an EAP result's key: keys from before EAP-IG stay valid


def label(settings: InterventionConfig) -> str:
    """The file name of an intervention result: {top|top-grown|custom}_k={k}_factor={c}."""
    selector = settings.edges if settings.edges in SELECTORS else "custom"
    return f"{selector}_k={settings.k}_factor={float(settings.factor)!r}"


def choose_targeted(run: Path, role: str, dataset: str, alpha: float, selector: str, k: int,
                    graph_of, objective: str = "nll", method: str = "eap") -> tuple[list, str, str]:
    """(edges, how, granularity): the selector applied to the run's attribution files.

    graph_of(granularity) -> the model's Graph; the attribution files must match it. A list of
    edges is read at the granularity of the role's attribution file when there is one, else block.
    objective and method (a choices.method_label) name the W files read.
    """
    roles = selector_roles(selector, role)
    attrs = {r: artifacts.Attribution.load(layout.attribution(run, r, dataset, alpha, objective=objective, method=method))
             for r in roles}
    if attrs:
        granularity = attrs[roles[0]].granularity
    else:
        own = layout.attribution(run, role, dataset, alpha, objective=objective, method=method)
        granularity = artifacts.Attribution.load(own).granularity if own.exists() else "block"
    graph: Graph = graph_of(granularity)
    for r, attr in attrs.items():
        if attr.src_names != graph.src_names or attr.dst_names != graph.dst_names:
            path = layout.attribution(run, r, dataset, alpha, objective=objective, method=method)
            raise UserError(f"{path}: its nodes do not match the {role} model at granularity {granularity}; "
                            "re-run attribution")
    edges, how = targeted_edges(selector, k, role, attrs, graph)
    return edges, how, granularity


def control_draws(run: Path, role: str, dataset: str, alpha: float, settings: InterventionConfig, targeted: list,
                  graph: Graph) -> tuple[list, dict]:
    """(the random control draws, what to record about them): matched to `targeted` by layer band and the role's
    mean |W| (its W file of the settings' objective and method), or uniform."""
    from circuitdiff.intervene import CONTROLS, edge_values, match_quality, matched_draws, random_draws

    if settings.control == "uniform":
        draws = random_draws(all_edges(graph), targeted, len(targeted), settings.n_random, settings.seed)
        return draws, {"control": CONTROLS["uniform"]}
    path = layout.attribution(run, role, dataset, alpha, objective=settings.objective,
                              method=settings.label(settings.method))
    if not path.exists():
        raise UserError(f"the matched control ranks edges by the {role} model's W, and {path} does not exist; "
                        "run the attribution stage first, or use control: uniform (--control uniform)")
    attr = artifacts.Attribution.load(path)
    if attr.src_names != graph.src_names or attr.dst_names != graph.dst_names:
        raise UserError(f"{path}: its nodes do not match the {role} model at granularity {graph.granularity}; "
                        "re-run attribution or use --control uniform")
    edges, values = edge_values(attr.scores, graph)
    draws = matched_draws(targeted, edges, values, graph.n_layers, settings.n_random, settings.seed,
                          settings.bands, settings.caliper)
    quality = match_quality(targeted, draws, edges, values, graph.n_layers, settings.bands)
    return draws, {"control": CONTROLS["matched"] + f" (bands={settings.bands}, caliper={settings.caliper})",
                   "control_match": quality}


def truncated_rule(run: Path) -> str:
    """The run's grading rule for answers cut at the cap (the intervention grades its answers the same way)."""
    return artifacts.read_manifest(run).get("config", {}).get("grading", {}).get("truncated", "strict")


def inputs(run: Path, dataset: str, alpha: float, settings: InterventionConfig, spec: str, dtype: str,
           max_new_tokens: int) -> dict:
    from circuitdiff.grade import GRADER_VERSION

    role = settings.role
    unkeyed = UNKEYED | {"dataset", "alpha"} | (IG_ONLY if settings.method == "eap" else set())
    return {
        "settings": {**settings.model_dump(exclude=unkeyed), "max_new_tokens": max_new_tokens},
        "grading": {"grader": GRADER_VERSION, "truncated": truncated_rule(run)},
        "dataset": dataset, "alpha": alpha, "model": spec, "dtype": dtype,
        "generation": artifacts.generation_key(run, role, dataset),
        "selection": read_key(layout.selection(run, dataset, alpha)),
        "attribution": {r: read_key(layout.attribution(run, r, dataset, alpha, objective=settings.objective,
                                                       method=settings.label(settings.method)))
                        for r in sorted(set(selector_roles(settings.edges, role))
                                        | ({role} if settings.control == "matched" else set()))},
    }  # fmt: skip


def intervene_one(run: str | Path, dataset: str, alpha: float, settings: InterventionConfig, *,
                  get_model=None, dtype: str | None = None, device: str = "cpu", max_new_tokens: int | None = None,
                  out: Path | None = None, progress: bool = False, log=print):
    """Run one intervention on a run directory; returns (Intervention, path); read back when up to date.

    get_model: a function returning the role's LoadedModel (with its tokenizer), called only when
    the work is not up to date; None loads it from the manifest. max_new_tokens: the settings',
    else this (the run's), else 128.
    """
    from circuitdiff.intervene import Intervention, summary_line

    run, role = Path(run), settings.role
    spec, run_dtype = artifacts.run_model(run, role)
    dtype = dtype or run_dtype
    max_new_tokens = settings.max_new_tokens or max_new_tokens or 128
    T_cut = int(artifacts.read_selection(run, dataset, alpha)["T_cut"])
    questions, samples = artifacts.answered_questions(run, role, dataset, T_cut, settings.n_questions)
    record = inputs(run, dataset, alpha, settings, spec, dtype, max_new_tokens)
    key = settings_key(record)
    path = Path(out) if out is not None else layout.intervention(run, role, dataset, alpha, label(settings),
                                                                  settings.objective, settings.label(settings.method))
    if up_to_date(path, key, log):
        result = Intervention.from_json(artifacts.read_result(path))
        log(f"intervene {role} {dataset} alpha={alpha}: up to date ({path}); {summary_line(result)}")
        return result, path
    result = _measure(run, role, dataset, alpha, settings, spec, dtype, device, max_new_tokens, questions, samples,
                      get_model, progress)
    result.meta.update({"T_cut": T_cut, "dtype": dtype})
    result.save(path)
    write_key(path, key, record)
    if out is None:
        from circuitdiff.intervene import TIMINGS

        artifacts.record_timings(run, path, {k: result.meta[k] for k in TIMINGS if k in result.meta})
    log(f"intervene {role} {dataset} alpha={alpha}: wrote {path}: {summary_line(result)}")
    return result, path


def _measure(run, role, dataset, alpha, settings, spec, dtype, device, max_new_tokens, questions, samples,
             get_model, progress):
    from circuitdiff.decoding import eos_token_ids
    from circuitdiff.engine import ModelNodes
    from circuitdiff.intervene import intervene
    from circuitdiff.models import load_model

    loaded = get_model() if get_model is not None else load_model(spec, dtype, device, tokenizer=settings.accuracy)
    hf, tok = loaded.model, loaded.tokenizer
    targeted, how, granularity = choose_targeted(run, role, dataset, alpha, settings.edges, settings.k,
                                                 lambda g: ModelNodes(hf, g).graph, settings.objective,
                                                 settings.label(settings.method))
    random, control = control_draws(run, role, dataset, alpha, settings, targeted, ModelNodes(hf, granularity).graph)
    # pair the loss and the accuracy on the same questions: keep only questions with a loss sample
    with_loss = {s["idx"] for s in samples}
    questions = [q for q in questions if q["idx"] in with_loss] if settings.accuracy else []
    result = intervene(
        hf, targeted, factor=settings.factor, granularity=granularity, loss_samples=samples,
        questions=questions or None, random=random, seed=settings.seed,
        eos_ids=eos_token_ids(hf, tok) if settings.accuracy else None, pad_id=getattr(tok, "pad_token_id", None),
        decode=(lambda ids: tok.decode(ids, skip_special_tokens=True)) if settings.accuracy else None,
        max_new_tokens=max_new_tokens, gen_batch_size=settings.gen_batch_size,
        loss_batch_size=settings.loss_batch_size, objective=settings.objective, truncated_rule=truncated_rule(run),
        progress=progress,
    )
    result.meta.update({"role": role, "dataset": dataset, "alpha": alpha, "model": spec,
                        "edges_selector": settings.edges, "edges_chosen": how,
                        "edges_scored_by": settings.label(settings.method), "k": len(targeted), **control,
                        "question_idx": [s["idx"] for s in samples]})
    return result


def stage(ctx) -> None:
    s = ctx.config.intervention
    alpha = s.alpha if s.alpha is not None else ctx.config.alphas[0]
    for ds in ctx.dataset(s.dataset):
        intervene_one(ctx.run, ds.key, alpha, s, get_model=lambda: ctx.models.get(s.role), dtype=ctx.config.dtype,
                      device=ctx.config.device, max_new_tokens=ctx.config.max_new_tokens, progress=ctx.progress,
                      log=ctx.log)
