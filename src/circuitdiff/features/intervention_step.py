"""The interventions step of `features()`: questions, conditions, outcomes and rows.

Questions: per dataset, the first `n_questions` (by idx) that were not used for attribution and that
both models answered (non-empty answers); each model is measured on its own prompt and answer. Every
condition's per-question outcome is written to interventions.parts.json as soon as it is measured (keyed),
so a rerun measures only what is missing.
"""

from __future__ import annotations

import numpy as np

from circuitdiff import io
from circuitdiff.features import attribution as attr
from circuitdiff.features import interventions as I
from circuitdiff.features.classes import DEAD
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import settings_key


def questions(ctx) -> tuple[dict[str, list[dict]], dict[str, list[dict]], list[str]]:
    """({model: questions}, {model: loss samples}, "dataset:idx" ids) for the run's base and tuned models."""
    qs, samples, ids = {"base": [], "tuned": []}, {"base": [], "tuned": []}, []
    for dataset in ctx.tops:
        _, used = attr.question_split(ctx.run, dataset)
        rows = {role: {r["idx"]: r for r in artifacts.read_generations(ctx.run, role, dataset)} for role in qs}
        common = sorted(i for i in rows["base"] if i in rows["tuned"] and i not in used
                        and rows["base"][i]["answer_ids"] and rows["tuned"][i]["answer_ids"])
        for i in common[: ctx.settings.n_questions]:
            ids.append(f"{dataset}:{i}")
            for role in qs:
                r = rows[role][i]
                qs[role].append({"idx": i, "prompt_ids": r["prompt_ids"], "gold": r["gold"], "kind": r.get("kind", "numeric")})
                samples[role].append({"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"],
                                      "cut_len": len(r["answer_ids"])})
    return qs, samples, ids


def conventions_tag(ctx) -> str:
    s = ctx.settings
    return (f"layer={ctx.layer}; n_latents={ctx.main.n_latents} ({s.dict_size}x); k={s.k}; tokens={s.tokens}; "
            "inputs scaled to mean ||x||^2 = d_model; error term kept; random sets matched in size and mean write size")


def run(ctx) -> list[dict]:
    from circuitdiff.decoding import eos_token_ids
    from circuitdiff.grade import GRADER_VERSION

    s, table, cc = ctx.settings, ctx.table, ctx.main
    source = ctx.labels.index(ctx.target)
    magnitude = table.mean_activation * table.norms[source]
    alive = np.array([c != DEAD for c in table.klass])
    draws = I.matched_random(ctx.compact, magnitude, alive, s.n_random, s.match_pool, s.seed)
    ratio = [float(magnitude[d].sum() / magnitude[ctx.compact].sum()) for d in draws]
    qs, samples, ids = questions(ctx)
    if not ids:
        ctx.log("interventions: skipped (no question is left outside the attribution set)")
        return []
    config = artifacts.read_manifest(ctx.run).get("config", {})
    max_new = s.max_new_tokens or config.get("max_new_tokens") or 128
    truncated = config.get("grading", {}).get("truncated", "strict")
    plan = [("tuned", 0.0)] + [("base", float(c)) for c in s.factors]
    conditions = [(m, 1.0, "none", []) for m in ("tuned", "base")]
    for model, factor in plan:
        conditions.append((model, factor, "targeted", list(ctx.compact)))
        conditions += [(model, factor, f"random-{r}", d) for r, d in enumerate(draws)]
    record = {"crosscoder": ctx.main_key, "compact": ctx.compact, "draws": draws, "questions": ids, "max_new": max_new,
              "grading": [GRADER_VERSION, truncated], "settings": s.keyed("n_questions", "n_random", "match_pool",
                                                                           "factors", "seed")}
    key = settings_key(record)
    path = layout.features_file(ctx.folder, "intervention_parts")
    try:
        parts = io.read_json(path) if path.exists() else {}
    except io.DamagedFile:
        parts = {}
    if parts.get("key") != key:
        parts = {"key": key, "outcomes": {}}
    decode = lambda ids_: ctx.tokenizer.decode(ids_, skip_special_tokens=True)  # noqa: E731
    for model, factor, name, latents in conditions:
        label = f"{model}|{factor:g}|{name}"
        if label in parts["outcomes"]:
            continue
        target = ctx.models.get(ctx.ref(model))
        partners = [ctx.models.get(r) for r in ctx.refs if r.label != model]
        edit = None if name == "none" else I.LatentEdit(cc, ctx.labels.index(model), source, latents, factor)
        outcome, _ = I.measure(target, partners, ctx.layer, edit, samples[model], qs[model],
                               eos_ids=eos_token_ids(target, ctx.tokenizer), pad_id=ctx.tokenizer.pad_token_id,
                               decode=decode, truncated_rule=truncated, max_new_tokens=max_new,
                               gen_batch_size=s.gen_batch_size, loss_batch_size=s.model_batch_size)
        parts["outcomes"][label] = {"loss": outcome.loss.tolist(), "correct": outcome.correct.tolist()}
        io.write_json(path, parts)
        ctx.log(f"interventions: {model} model, factor {factor:g}, {name} ({len(latents)} latents, decoder {ctx.target}): "
                f"accuracy {outcome.correct.mean():.3f} (greedy, cap {max_new}, grading {truncated}), mean NLL of its own "
                f"unmodified answer {outcome.loss.mean():.4f} nats ({len(ids)} questions)")

    def outcome(model, factor, name):
        o = parts["outcomes"][f"{model}|{factor:g}|{name}"]
        return I.Outcome(np.array(o["loss"]), np.array(o["correct"]))

    rows = []
    for model, factor in plan:
        random = [outcome(model, factor, f"random-{r}") for r in range(len(draws))]
        rows += I.effect_rows(model, factor, ctx.target, len(ctx.compact), outcome(model, 1.0, "none"),
                              outcome(model, factor, "targeted"), random, ratio, s.n_boot, s.seed)
    tag = conventions_tag(ctx)
    return [{**row, "conventions": tag} for row in rows]
