"""The steps of `features()` over one Context: each reads what the previous ones left in it or on disk.

activations -> crosscoders (main on every model, null on base vs the null model) -> classes (held-out
evaluation, classes, the null comparison) -> attribution (compact set) -> interventions -> outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from circuitdiff import io
from circuitdiff.features import activations as A
from circuitdiff.features import attribution as attr
from circuitdiff.features import classes as C
from circuitdiff.features import crosscoder as X
from circuitdiff.features import settings as S
from circuitdiff.store import artifacts, layout
from circuitdiff.store.keys import settings_key, write_key


@dataclass
class Context:
    run: Path
    folder: Path
    settings: S.FeatureSettings
    refs: list  # ModelRef, the crosscoder's order
    null_ref: object  # ModelRef or None (the base itself)
    plan: A.Plan
    plan_key: str
    layer: int
    n_layers: int
    d_model: int
    dtype: str
    device: str
    models: object
    tokenizer: object
    log: object
    progress: bool
    timings: dict
    acts_keys: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)  # label -> training rows (non-stream), reused by both crosscoders
    main: X.Crosscoder | None = None
    null: X.Crosscoder | None = None
    main_key: str = ""
    train_results: dict = field(default_factory=dict)
    table: C.LatentTable | None = None
    null_table: C.LatentTable | None = None
    sums: dict = field(default_factory=dict)
    compact: list = field(default_factory=list)
    attributions: dict = field(default_factory=dict)
    tops: dict = field(default_factory=dict)
    n_attr_questions: dict = field(default_factory=dict)
    intervention_rows: list = field(default_factory=list)
    outliers: dict = field(default_factory=dict)  # rows left out (settings.OUTLIERS), per block

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.refs]

    @property
    def null_labels(self) -> list[str]:
        return ["base" if self.refs[0].label == "base" else self.refs[0].label, "null"]

    def null_inputs(self) -> list[str]:
        """Shard labels of the null crosscoder's two inputs: the reference model, then the null model (or itself)."""
        return [self.refs[0].label, "null" if self.null_ref is not None else self.refs[0].label]

    def all_refs(self) -> list:
        return self.refs + ([self.null_ref] if self.null_ref is not None else [])

    def ref(self, label: str):
        return next(r for r in self.all_refs() if r.label == label)

    @property
    def target(self) -> str:
        return "tuned" if "tuned" in self.labels else self.labels[-1]

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------- 1. activations
def _collect(ctx: Context, ref, shards: list[int]) -> None:
    s = ctx.settings
    key = ctx.acts_keys[ref.label]
    meta = A.read_meta(ctx.folder, ref.label, key)
    if all(A.shard_done(ctx.folder, ref.label, meta, x, ctx.plan.n_rows(x)) for x in shards):
        return
    from circuitdiff.features.lockstep import check_layer

    model = ctx.models.get(ref)
    check_layer(model, ctx.layer, ref.label)
    A.collect(model, ctx.plan, shards, ctx.layer, ctx.folder, ref.label, key,
              {"spec": ref.spec, "dtype": ctx.dtype, "layer": ctx.layer, "residual": S.RESIDUAL},
              batch_size=s.model_batch_size, log=ctx.log, progress=ctx.progress)


def activations(ctx: Context) -> None:
    t0 = time.perf_counter()
    for ref in ctx.all_refs():
        ctx.acts_keys[ref.label] = A.acts_key(ctx.plan_key, ref.spec, ctx.dtype, ctx.layer)
    shards = ctx.plan.held_shards() if ctx.settings.stream else list(range(ctx.plan.n_shards))
    for ref in ctx.all_refs():  # one model in memory at a time (stream: every model stays, for the chunks)
        _collect(ctx, ref, shards)
        if not ctx.settings.stream:
            ctx.models.keep([])
    ctx.timed("activations", t0)


# ---------------------------------------------------------------- 2. crosscoders
def _load(ctx: Context, labels: list[str], shards: list[int]) -> tuple[list, "torch.Tensor"]:
    """(per label [rows, d] float16 tensors of the shards, the rows kept: no label's residual is an outlier)."""
    import torch

    out, drop = [], None
    for label in labels:
        if (label, tuple(shards)) not in ctx.tensors:
            values = A.load_shards(ctx.folder, label, shards)
            ctx.tensors[(label, tuple(shards))] = (values, A.outliers(values))
        values, outlier = ctx.tensors[(label, tuple(shards))]
        out.append(values)
        drop = outlier if drop is None else drop | outlier
    return out, torch.from_numpy(np.flatnonzero(~drop))


def _held(ctx: Context, labels: list[str]) -> tuple[list, np.ndarray]:
    """The held-out rows without outliers, per label, and their row numbers in the held-out shards."""
    values, keep = _load(ctx, labels, ctx.plan.held_shards())
    ctx.outliers[f"held-out rows ({'+'.join(dict.fromkeys(labels))})"] = int(len(values[0]) - len(keep))
    return [v[keep] for v in values], keep.numpy()


def _trainer(ctx: Context, name: str, inputs: list[str], total: int) -> X.Trainer:
    s = ctx.settings
    record = {"activations": [ctx.acts_keys[label] for label in inputs],
              "settings": s.keyed("dict_size", "k", "epochs", "batch_size", "lr", "aux_coef", "dead_tokens", "seed",
                                  "stream", "chunk_tokens")}
    key = settings_key(record)
    if name == "main":
        ctx.main_key = key
    dead = s.dead_tokens or max(10_000, min(10_000_000, total * s.batch_size // 10))
    cc = X.Crosscoder(len(inputs), ctx.d_model, s.dict_size * ctx.d_model, seed=s.seed)
    return X.Trainer(cc, total, k=s.k, lr=s.lr, batch_size=s.batch_size, aux_coef=s.aux_coef, dead_tokens=dead,
                     checkpoint=layout.features_checkpoint(ctx.folder, name), key=key,
                     checkpoint_every=s.checkpoint_every, device=ctx.device, log=ctx.log, progress=ctx.progress)


def crosscoders(ctx: Context) -> None:
    s, plan = ctx.settings, ctx.plan
    t0 = time.perf_counter()
    chunks = A.chunks_of(plan, s.chunk_tokens) if s.stream else [plan.train_shards()] * s.epochs
    passes = [X.Pass(sum(plan.n_rows(x) for x in chunk), s.seed * 1000 + i, load=lambda: None)
              for i, chunk in enumerate(chunks)]
    total = sum(p.rows // s.batch_size for p in passes)
    main = _trainer(ctx, "main", ctx.labels, total)
    null = _trainer(ctx, "null", ctx.null_inputs(), total)
    first = 0
    for i, (chunk, pass_) in enumerate(zip(chunks, passes)):
        pending = [t for t in (main, null) if t.step < first + t.steps_of(pass_)]
        if pending and s.stream:
            for ref in ctx.all_refs():
                _collect(ctx, ref, chunk)
        for trainer, inputs in ((main, ctx.labels), (null, ctx.null_inputs())):
            if trainer in pending:
                trainer.run(pass_, first, *_load(ctx, inputs, chunk))
        if s.stream:  # this chunk is done for both crosscoders: free it
            for label in {*ctx.labels, *ctx.null_inputs()}:
                ctx.tensors.pop((label, tuple(chunk)), None)
                A.delete_shards(ctx.folder, label, chunk)
        first += passes[i].rows // s.batch_size
    ctx.tensors.clear()
    ctx.main, ctx.null = main.cc.eval(), null.cc.eval()
    untimed = lambda r: {k: v for k, v in r.__dict__.items() if k not in ("seconds", "resumed_at")}  # noqa: E731
    ctx.train_results = {"main": untimed(main.result), "null": untimed(null.result)}
    for name, t in (("main", main), ("null", null)):
        ctx.outliers[f"training rows per pass, {name} crosscoder"] = [t.result.left_out[k] for k in sorted(
            t.result.left_out, key=int)]
    ctx.timings.update({"train main (total over resumes)": main.result.seconds,
                        "train null (total over resumes)": null.result.seconds})
    ctx.timed("crosscoders", t0)


# ---------------------------------------------------------------- 3. classes
def classes(ctx: Context) -> None:
    t0 = time.perf_counter()
    th = ctx.settings.thresholds
    ctx.sums["main"] = X.evaluate(ctx.main, _held(ctx, ctx.labels)[0])
    ctx.table = C.classify(ctx.sums["main"], ctx.main.W_dec.detach().cpu().numpy(), ctx.labels, th)
    ctx.sums["null"] = X.evaluate(ctx.null, _held(ctx, ctx.null_inputs())[0])
    ctx.null_table = C.classify(ctx.sums["null"], ctx.null.W_dec.detach().cpu().numpy(), ctx.null_labels, th)
    ctx.timed("classes", t0)


# ---------------------------------------------------------------- 4. attribution
def attribution(ctx: Context) -> None:
    s = ctx.settings
    datasets = [d for d in layout.find_generations(ctx.run, "tuned") if d in layout.find_generations(ctx.run, "base")]
    if not s.attribution or ctx.target != "tuned" or "base" not in ctx.labels or not datasets:
        ctx.log("attribution: skipped (it needs the run's base and tuned models among --models, and their generations)")
        return
    t0 = time.perf_counter()
    path = layout.features_file(ctx.folder, "attribution_scores")
    record = {"crosscoder": ctx.main_key, "generations": {d: [artifacts.generation_key(ctx.run, r, d)
                                                              for r in layout.ROLES] for d in datasets}}
    key = settings_key(record)
    saved = {}
    if path.exists():
        with np.load(path) as z:
            saved = {k: z[k] for k in z.files} if str(z["key"]) == key else {}
    target = ctx.labels.index(ctx.target)
    for dataset in datasets:
        if f"A:{dataset}" not in saved:
            rows, _ = attr.question_split(ctx.run, dataset)
            samples = [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"], "cut_len": len(r["answer_ids"])}
                       for r in rows]
            partners = [ctx.models.get(r) for r in ctx.refs if r.label != ctx.target]
            scores = (attr.attribute_latents(ctx.models.get(ctx.ref(ctx.target)), partners, ctx.main, target,
                                             ctx.layer, samples, batch_size=max(1, ctx.settings.model_batch_size // 4))
                      if samples else np.zeros(ctx.main.n_latents))
            saved.update({f"A:{dataset}": scores, f"n:{dataset}": np.array(len(samples)), "key": np.array(key)})
            io.write_npz(path, **saved)
        ctx.attributions[dataset] = saved[f"A:{dataset}"]
        ctx.n_attr_questions[dataset] = int(saved[f"n:{dataset}"])
        ctx.tops[dataset] = attr.top_latents(ctx.attributions[dataset], s.top_k)
    write_key(path, key, record)
    ctx.compact = attr.compact_set(ctx.tops)
    ctx.log(f"attribution: tuned-only questions {ctx.n_attr_questions}; compact set ({len(ctx.compact)} latents, in the "
            f"top {s.top_k} of every dataset): {ctx.compact}")
    ctx.timed("attribution", t0)


# ---------------------------------------------------------------- 5. interventions
def interventions(ctx: Context) -> None:
    from circuitdiff.features import intervention_step

    if not ctx.settings.interventions or not ctx.tops:
        return
    if not ctx.compact:
        ctx.log("interventions: skipped (the compact set is empty: no latent is in the top-K of every dataset)")
        return
    t0 = time.perf_counter()
    ctx.intervention_rows = intervention_step.run(ctx)
    ctx.timed("interventions", t0)


# ---------------------------------------------------------------- 6. outputs
def conventions(ctx: Context) -> dict:
    s = ctx.settings
    return {"residual": S.RESIDUAL, "positions": S.POSITIONS, "outliers": S.OUTLIERS, "normalisation": S.NORMALISATION,
            "encoder": S.ENCODER,
            "annealing": S.ANNEALING, "aux_loss": S.AUX_LOSS, "loss": S.LOSS, "fvu": S.FVU, "nrn": S.NRN,
            "attribution_share": S.ATTRIBUTION_SHARE, "latent_scaling": S.LATENT_SCALING,
            "thresholds": s.thresholds.describe(ctx.labels), "feature_attribution": S.FEATURE_ATTRIBUTION,
            "intervention": S.INTERVENTION, "random_control": S.RANDOM_CONTROL,
            "null": (f"the same procedure on {ctx.null_labels[0]} vs " + (f"the null model {ctx.null_ref.spec}"
                     if ctx.null_ref is not None else f"{ctx.null_labels[0]} itself on the same tokens (identical "
                     "inputs; the count measures what training alone invents)"))}


def outputs(ctx: Context) -> None:
    from circuitdiff.features import outputs as O

    t0 = time.perf_counter()
    folder, table, s = ctx.folder, ctx.table, ctx.settings
    O.write_csv(layout.features_file(folder, "latents"), C.rows(table, ctx.target))
    O.write_csv(layout.features_file(folder, "latents_null"), C.rows(ctx.null_table, "null"))
    if ctx.tops:
        O.write_csv(layout.features_file(folder, "attribution"),
                    attr.rows(ctx.attributions, ctx.tops, ctx.n_attr_questions, table.klass,
                              table.relative_norm(ctx.target), ctx.compact))
    if ctx.intervention_rows:
        O.write_csv(layout.features_file(folder, "interventions"), ctx.intervention_rows)
    decode = lambda ids: ctx.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    held, kept = _held(ctx, ctx.labels)
    io.write_json(layout.features_file(folder, "contexts"),
                  O.contexts(ctx.main, held, kept, ctx.plan, table, ctx.compact, decode, ctx.target))
    fvu_null = ctx.sums["null"].fvu()
    dead_null = ctx.null_table.counts().get(C.DEAD, 0) / ctx.null_table.n_latents
    null = {**C.null_comparison(table, ctx.null_table), "labels": ctx.null_labels,
            "specs": {ctx.null_labels[0]: ctx.refs[0].spec, "null": ctx.null_ref.spec if ctx.null_ref else ctx.refs[0].spec},
            "fvu": dict(zip(ctx.null_labels, map(float, fvu_null))), "dead_fraction": dead_null,
            "counts": ctx.null_table.counts(), "training": ctx.train_results["null"]}
    summary = {
        "layer": ctx.layer, "n_layers": ctx.n_layers, "d_model": ctx.d_model, "n_latents": table.n_latents,
        "models": [{"label": r.label, "spec": r.spec} for r in ctx.refs], "target": ctx.target, "dtype": ctx.dtype,
        "tokens": {"train": sum(ctx.plan.n_rows(x) for x in ctx.plan.train_shards()), "held_out": table.n_tokens,
                   "sources": ctx.plan.source_tokens()},
        "fvu": dict(zip(ctx.labels, map(float, ctx.sums["main"].fvu()))),
        "dead_fraction": table.counts().get(C.DEAD, 0) / table.n_latents, "counts": table.counts(),
        "norm_counts": {c: table.norm_class.count(c) for c in sorted(set(table.norm_class))},
        "model_only": table.model_only(), "null": null, "training": ctx.train_results["main"],
        "outliers": {"rule": S.OUTLIERS, "left_out": ctx.outliers},
        "compact_set": ctx.compact, "top_k": {d: v for d, v in ctx.tops.items()},
        "settings": {**s.keyed(), "null_model": s.null_model, "thresholds": s.thresholds.__dict__},
        "input_scale": dict(zip(ctx.labels, map(float, ctx.main.input_scale.cpu()))),
        "theta": float(ctx.main.theta), "conventions": conventions(ctx),
    }  # fmt: skip
    io.write_json(layout.features_file(folder, "summary"), summary)
    O.write_page(folder)
    th = s.thresholds
    ctx.log(f"features (layer {ctx.layer}, {table.n_latents} latents = {s.dict_size}x d_model, BatchTopK k {s.k}, "
            f"{summary['tokens']['train']} training tokens per model, inputs scaled to mean ||x||^2 = d_model; on "
            f"{table.n_tokens} held-out tokens): FVU " + ", ".join(f"{k} {v:.3f}" for k, v in summary["fvu"].items())
            + f"; dead {summary['dead_fraction']:.3f}; classes {summary['counts']} (rho thresholds {th.lacks:.3g} / "
            f"{th.uses:.3g}, latent scaling nu < {th.nu:g}); model-only {summary['model_only']} beside "
            f"{null['spurious_model_only']} spurious model-only latents in the null control ({conventions(ctx)['null']})")
    ctx.timed("outputs", t0)
