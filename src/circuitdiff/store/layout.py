"""Every path inside a run directory, and the track directory of the lab. Nothing else spells one.

    RUN/
      manifest.json                                    versions, models, conventions, config
      generations/{role}/{dataset}.jsonl               one row per question (appended per batch)
      generations/{role}/{dataset}.meta.json           generation settings + key, grader version, accuracy
      selection/{dataset}/alpha={a}.json               chosen idx, T_bar, T_cut, filter counts
      attribution/{scoring}/{view}/{dataset}/alpha={a}.npz   W (same keys as `circuitdiff attribute`)
      attribution/{scoring}/{view}/{dataset}/alpha={a}.parts/  finished batches of an unfinished one
      validation/{scoring}/{role}/{dataset}/alpha={a}.json|.png  W vs exact ablation
      intervention/{scoring}/{role}/{dataset}/alpha={a}/{label}.json   edge interventions
      report/                                          metrics.csv, table.md, figures, report.html
      features/layer={L}/                              `circuitdiff features` (feature-level diffing; or its --out):
        tokens.npz, acts/{model}/shard-{i}.npy + meta.json   the token plan; float16 residuals [tokens, d_model]
        crosscoder/{main|null}.pt                      weights + training state (a rerun resumes)
        latents.csv, latents_null.csv, summary.json, attribution.csv (+ .npz), interventions.csv, contexts.json,
        features.html, fig_relative_norm.png, timings.json
      shards/{stage}/                                  work split over workers (circuitdiff.parallel), until merged:
      shards/attribute/{scoring}/{view}/{dataset}/alpha={a}/shard-{n}-{key}.npz
      shards/generate/{role}/{dataset}/shard-{n}-{key}.jsonl

    Every single-shot artifact X (selection, attribution, validation, intervention) has a key
    file X.key beside it (store/keys.py): the key of the inputs and settings that made X and a
    checksum of X.

    TRACK/ (`circuitdiff track`)
      track.json, track.csv, track.png
      start-{key}/                                     a run dir: the starting model paired with itself
      start-{key}/question_set.json                    the fixed questions, T_cut and histogram ranges
      runs/{run}/checkpoint-{step}/                    a run dir: start vs that checkpoint
      runs/{run}/checkpoint-{step}/track_result.json   the checkpoint's numbers, keyed by its inputs

    TRAIN/ (`circuitdiff train`)
      train.json                                       every setting and convention, the log history
      checkpoint-{step}/                               a LoRA adapter dir (+ optimizer state)
      final/                                           the last adapter
      dpo_pairs.jsonl                                  dpo: the pairs built from the base's samples
      self_distill.jsonl                               self-distill: the base's own correct greedy answers

role is "base" or "tuned"; dataset is the dataset name, with "_{split}" when the split is not "test";
scoring is the objective ("nll" or "logit") when W is EAP's, and "{objective}+{method}" for another
method ("nll+eap-ig8": EAP-IG with 8 midpoint points; choices.method_label); view is the scored
model's role when it reads its own answers, and
"{model}-on-{text}" when it reads the other model's ("tuned-on-base": the tuned model scored on the
base model's tokens).
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("base", "tuned")
KEY_SUFFIX = ".key"


def alpha_tag(alpha: float) -> str:
    """0.1 -> "alpha=0.1", 0.03 -> "alpha=0.03" (shortest exact decimal)."""
    return f"alpha={float(alpha)!r}"


def alpha_label(name: str) -> str | None:
    """"alpha=0.1.npz" / "alpha=0.1.json" / "alpha=0.1" -> "0.1"; None when the name holds no alpha."""
    stem = name.removesuffix(".npz").removesuffix(".json")
    if not stem.startswith("alpha="):
        return None
    label = stem[len("alpha=") :]
    try:
        float(label)
    except ValueError:
        return None
    return label


def dataset_key(name: str, split: str = "test") -> str:
    return name if split == "test" else f"{name}_{split}"


def key_file(artifact: Path) -> Path:
    """The key file beside an artifact: alpha=0.1.npz -> alpha=0.1.npz.key."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + KEY_SUFFIX)


# ---------------------------------------------------------------- a run directory
def manifest(run: Path) -> Path:
    return Path(run) / "manifest.json"


def generations(run: Path, role: str, dataset: str) -> Path:
    return Path(run) / "generations" / role / f"{dataset}.jsonl"


def generations_meta(run: Path, role: str, dataset: str) -> Path:
    return Path(run) / "generations" / role / f"{dataset}.meta.json"


def selection(run: Path, dataset: str, alpha: float) -> Path:
    return Path(run) / "selection" / dataset / f"{alpha_tag(alpha)}.json"


def view(model: str, text: str | None = None) -> str:
    """"base", "tuned", or "tuned-on-base" (a model scored on the other model's answers)."""
    return model if text in (None, model) else f"{model}-on-{text}"


def parse_view(name: str) -> tuple[str, str] | None:
    """"tuned-on-base" -> ("tuned", "base"); "base" -> ("base", "base"); None for anything else."""
    model, _, text = name.partition("-on-")
    text = text or model
    return (model, text) if model in ROLES and text in ROLES else None


def scoring(objective: str = "nll", method: str = "eap") -> str:
    """The folder of W files scored with `objective` by `method` (a choices.method_label): "nll", "nll+eap-ig8"."""
    return objective if method == "eap" else f"{objective}+{method}"


def parse_scoring(name: str) -> tuple[str, str]:
    """"nll+eap-ig8" -> ("nll", "eap-ig8"); "logit" -> ("logit", "eap")."""
    objective, _, method = name.partition("+")
    return objective, method or "eap"


def attribution(run: Path, role: str, dataset: str, alpha: float, text: str | None = None,
                objective: str = "nll", method: str = "eap") -> Path:
    """The W file of model `role` scored on the answers of `text` (default: its own) with `objective` by `method`."""
    return (Path(run) / "attribution" / scoring(objective, method) / view(role, text) / dataset
            / f"{alpha_tag(alpha)}.npz")


def attribution_parts(run: Path, role: str, dataset: str, alpha: float, text: str | None = None,
                      objective: str = "nll", method: str = "eap") -> Path:
    return attribution(run, role, dataset, alpha, text, objective, method).with_suffix(".parts")


def validation(run: Path, role: str, dataset: str, alpha: float, objective: str = "nll", method: str = "eap") -> Path:
    return Path(run) / "validation" / scoring(objective, method) / role / dataset / f"{alpha_tag(alpha)}.json"


def validation_figure(json_path: Path) -> Path:
    """The scatter PNG written beside a validation JSON."""
    return Path(json_path).with_suffix(".png")


def intervention(run: Path, role: str, dataset: str, alpha: float, label: str, objective: str = "nll",
                 method: str = "eap") -> Path:
    return Path(run) / "intervention" / scoring(objective, method) / role / dataset / alpha_tag(alpha) / f"{label}.json"


def attribution_batch(parts: Path, number: int, key: str) -> Path:
    """One finished batch of an unfinished attribution, inside its .parts folder."""
    return Path(parts) / f"batch-{number:05d}-{key}.npz"


def intervention_out(folder: Path, label: str) -> Path:
    """The JSON of `circuitdiff intervene --out FOLDER`."""
    return Path(folder) / f"{label}.json"


def report_dir(run: Path) -> Path:
    return Path(run) / "report"


REPORT_FILES = {
    "metrics": "metrics.csv", "node_entropy": "node_entropy.csv", "edge_change": "edge_change.csv",
    "accuracy": "accuracy.csv", "table_md": "table.md", "table_tex": "table.tex", "html": "report.html",
}  # fmt: skip


def report_file(report: Path, kind: str) -> Path:
    """A file of a report directory (RUN/report, or the --out of `circuitdiff report`): kind in REPORT_FILES."""
    return Path(report) / REPORT_FILES[kind]


def report_figure(report: Path, filename: str) -> Path:
    return Path(report) / filename


def validation_out(folder: Path) -> tuple[Path, Path]:
    """(JSON, PNG) of `circuitdiff validate --out FOLDER`."""
    return Path(folder) / "validation.json", Path(folder) / "validation.png"


def features_dir(run: Path) -> Path:
    return Path(run) / "features"


def features_layer(run: Path, layer: int) -> Path:
    """RUN/features/layer={L}: everything `circuitdiff features` writes for one layer."""
    return features_dir(run) / f"layer={int(layer)}"


FEATURES_FILES = {
    "tokens": "tokens.npz", "latents": "latents.csv", "summary": "summary.json", "attribution": "attribution.csv",
    "interventions": "interventions.csv", "contexts": "contexts.json", "html": "features.html",
    "timings": "timings.json", "histogram": "fig_relative_norm.png", "latents_null": "latents_null.csv",
    "attribution_scores": "attribution.npz", "intervention_parts": "interventions.parts.json",
}  # fmt: skip


def features_file(folder: Path, kind: str) -> Path:
    """A file of a features folder (RUN/features/layer={L} or --out): kind in FEATURES_FILES."""
    return Path(folder) / FEATURES_FILES[kind]


def features_acts(folder: Path, model: str) -> Path:
    """The activation shards of one model (label) in a features folder."""
    return Path(folder) / "acts" / model


def features_shard(folder: Path, model: str, index: int) -> Path:
    return features_acts(folder, model) / f"shard-{index:05d}.npy"


def features_acts_meta(folder: Path, model: str) -> Path:
    return features_acts(folder, model) / "meta.json"


def features_checkpoint(folder: Path, name: str) -> Path:
    """The crosscoder `name` ("main" or "null"): weights and training state."""
    return Path(folder) / "crosscoder" / f"{name}.pt"


def find_feature_layers(run: Path) -> list[tuple[int, Path]]:
    """(layer, folder) of every features folder of a run that holds a summary, by layer."""
    found = []
    for path in features_dir(run).glob("layer=*"):
        tag = path.name.split("=", 1)[1]
        if tag.isdigit() and features_file(path, "summary").exists():
            found.append((int(tag), path))
    return sorted(found)


def shards_dir(run: Path, stage: str) -> Path:
    return shards_root(run) / stage


def attribution_shards(run: Path, role: str, dataset: str, alpha: float, text: str | None = None,
                       objective: str = "nll", method: str = "eap") -> Path:
    """The finished shards of an attribution spread over workers (circuitdiff.parallel), until they are merged."""
    return shards_dir(run, "attribute") / scoring(objective, method) / view(role, text) / dataset / alpha_tag(alpha)


def generation_shards(run: Path, role: str, dataset: str) -> Path:
    """The finished shards of a generation spread over workers, until they are merged into the generations file."""
    return shards_dir(run, "generate") / role / dataset


def shard_file(folder: Path, number: int, key: str, suffix: str) -> Path:
    """One finished shard inside a shards folder (or an attribute --out's .parts folder)."""
    return Path(folder) / f"shard-{number:04d}-{key}{suffix}"


def shards_root(run: Path) -> Path:
    return Path(run) / "shards"


def shard_files(run: Path) -> list[Path]:
    """Every shard file still in a run (none once every sharded job is merged)."""
    return sorted(p for p in shards_root(run).rglob("*") if p.is_file())


def stale_temp_files(run: Path) -> list[Path]:
    """Temporary files of atomic writes that a kill left behind (io.py names them .{name}.{random}.tmp)."""
    return sorted(p for p in Path(run).rglob(".*.tmp") if p.is_file())


# ---------------------------------------------------------------- finding what a run holds
def find_generations(run: Path, role: str) -> dict[str, Path]:
    """dataset -> generations file of `role`."""
    return {p.stem: p for p in sorted((Path(run) / "generations" / role).glob("*.jsonl"))}


def find_attributions(run: Path) -> dict[tuple[str, str, str], dict[tuple[str, str], Path]]:
    """(scoring, dataset, alpha label) -> {(model, text): W file} for every attribution file in the run."""
    found: dict[tuple[str, str, str], dict[tuple[str, str], Path]] = {}
    for path in sorted((Path(run) / "attribution").glob("*/*/*/alpha=*.npz")):
        alpha, scored = alpha_label(path.name), parse_view(path.parent.parent.name)
        if alpha is not None and scored is not None:
            found.setdefault((path.parent.parent.parent.name, path.parent.name, alpha), {})[scored] = path
    return found


def find_validations(run: Path) -> list[tuple[str, str, str, str, Path]]:
    """(scoring, role, dataset, alpha label, JSON path) of every validation result."""
    out = []
    for path in sorted((Path(run) / "validation").glob("*/*/*/alpha=*.json")):
        alpha = alpha_label(path.name)
        if alpha is not None:
            out.append((path.parents[2].name, path.parents[1].name, path.parent.name, alpha, path))
    return out


def find_interventions(run: Path) -> list[tuple[str, str, str, str, Path]]:
    """(scoring, role, dataset, alpha label, JSON path) of every intervention result."""
    out = []
    for path in sorted((Path(run) / "intervention").glob("*/*/*/alpha=*/*.json")):
        alpha = alpha_label(path.parent.name)
        if alpha is not None:
            out.append((path.parents[3].name, path.parents[2].name, path.parents[1].name, alpha, path))
    return out


# ---------------------------------------------------------------- a track directory
def default_track_dir(train_dir: Path) -> Path:
    """Where a training run's own track goes when no --out is given: TRAIN/track."""
    return Path(train_dir) / "track"


def track_registry(out: Path) -> Path:
    return Path(out) / "track.json"


def track_lock(out: Path) -> Path:
    return Path(out) / ".track.lock"


def track_csv(out: Path) -> Path:
    return Path(out) / "track.csv"


def track_figure(out: Path) -> Path:
    return Path(out) / "track.png"


def track_start(out: Path, key: str) -> Path:
    return Path(out) / f"start-{key}"


def track_question_set(start: Path) -> Path:
    """The fixed question set (idx, T_cut, ranges) of every checkpoint tracked from this start."""
    return Path(start) / "question_set.json"


def track_runs(out: Path, label: str) -> Path:
    return Path(out) / "runs" / label


def track_checkpoint(out: Path, label: str, step: int) -> Path:
    return track_runs(out, label) / f"checkpoint-{step}"


def track_result(checkpoint_run: Path) -> Path:
    return Path(checkpoint_run) / "track_result.json"


def find_track_checkpoints(out: Path, label: str) -> list[tuple[int, Path]]:
    """(step, run dir) of every checkpoint run dir of a training run in a track, by step."""
    found = [(int(p.name.split("-")[-1]), p) for p in track_runs(out, label).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit()]
    return sorted(found)


def find_track_results(out: Path, label: str) -> list[Path]:
    return sorted(track_runs(out, label).glob("checkpoint-*/track_result.json"))


# ---------------------------------------------------------------- a training directory
def train_record(out: Path) -> Path:
    return Path(out) / "train.json"


def train_final(out: Path) -> Path:
    return Path(out) / "final"


def train_checkpoint(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def adapter_config(adapter_dir: Path) -> Path:
    """A LoRA adapter directory's config (it names the base model)."""
    return Path(adapter_dir) / "adapter_config.json"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # what makes an adapter


def trainer_state(checkpoint: Path) -> Path:
    """A training checkpoint's trainer state (its log history)."""
    return Path(checkpoint) / "trainer_state.json"


def dpo_pairs(out: Path) -> Path:
    return Path(out) / "dpo_pairs.jsonl"


def self_distill_rows(out: Path) -> Path:
    """self-distill: the base's own greedy, finished, correct answers it is trained on."""
    return Path(out) / "self_distill.jsonl"


def find_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every saved adapter checkpoint in a training directory, by step."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        if path.name.split("-")[-1].isdigit() and adapter_config(path).exists():
            found.append((int(path.name.split("-")[-1]), path))
    return sorted(found)
