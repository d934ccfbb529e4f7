"""Stage `select`: the questions both models answered correctly, filtered and drawn (circuitdiff.select).

One selection file per (dataset, alpha), keyed by the selection settings and the graded rows of
both models (idx, correct, answer length); skipped when up to date.
"""

from __future__ import annotations

from dataclasses import asdict

from circuitdiff.errors import UserError
from circuitdiff.io import write_json
from circuitdiff.select import SelectionSettings, select
from circuitdiff.store import layout
from circuitdiff.store.layout import key_file
from circuitdiff.store.keys import settings_key, up_to_date, write_key


def rows_digest(rows: list[dict]) -> str:
    """What selection reads of a model's rows: idx, correct, answer length, stop reason."""
    return settings_key(sorted((r["idx"], bool(r["correct"]), len(r["answer_ids"]), r.get("stop", "eos")) for r in rows))


def stage(ctx) -> None:
    cfg = ctx.config
    for ds in cfg.datasets:
        base_rows, tuned_rows = ctx.rows("base", ds), ctx.rows("tuned", ds)
        for alpha in cfg.alphas:
            settings = SelectionSettings(alpha=alpha, n_samples=cfg.n_samples, seed=cfg.seed,
                                         **cfg.selection.model_dump())
            inputs = {"settings": asdict(settings), "base": rows_digest(base_rows), "tuned": rows_digest(tuned_rows)}
            key = settings_key(inputs)
            path = layout.selection(ctx.run, ds.key, alpha)
            if up_to_date(path, key, ctx.log):
                ctx.log(f"select {ds.key} alpha={alpha}: up to date ({path})")
                continue
            try:
                sel = select(base_rows, tuned_rows, settings, dataset=ds.key)
            except UserError:  # nothing survives: an older selection must not pass for this one
                path.unlink(missing_ok=True)
                key_file(path).unlink(missing_ok=True)
                raise
            write_json(path, {"dataset": ds.key, "alpha": alpha, **sel.to_json()})
            write_key(path, key, inputs)
            c = sel.counts
            ctx.log(
                f"select {ds.key} alpha={alpha}: {c['questions']} questions -> {c['both_correct']} both correct "
                f"-> {c['finished']} both finished -> {c['length']} length ({settings.length_rule} rule, beta={settings.beta}, "
                f"gamma={settings.gamma}) -> {c['delta']} delta<{settings.delta} -> {c['cut']} with >= T_cut "
                f"tokens -> {c['drawn']} drawn (N={settings.n_samples}, seed={settings.seed}); "
                f"T_bar={sel.T_bar:.1f} tokens, T_cut={sel.T_cut} ({settings.cut_rule} rule)"
            )
