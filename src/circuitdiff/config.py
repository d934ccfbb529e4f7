"""The `circuitdiff run` configuration: a YAML file validated by pydantic.

A config names a model pair, datasets and the settings of every stage; presets for the
paper's four pairs (and a CPU smoke test) ship in ``circuitdiff/configs/*.yaml`` and can be
named instead of a path (``circuitdiff run deepseek-math-grpo``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuitdiff.choices import (DEFAULT_IG_RULE, DEFAULT_IG_STEPS, DTYPE_NAMES, IG_RULES, METHODS, OBJECTIVES, TEXTS,
                                 method_label)
from circuitdiff.errors import UserError
from circuitdiff.prompts import INSTRUCTION, PRESETS
from circuitdiff.store.layout import ROLES, dataset_key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_prompt(value: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown prompt preset {value!r}; use one of {', '.join(PRESETS)}")
    return value


PromptName = Annotated[str, AfterValidator(_check_prompt)]


class ModelConfig(_Strict):
    """One model of the pair; a plain string is read as `spec`."""

    spec: str = Field(description="hub id (org/name[@revision]), local dir, .gguf file, LoRA dir or alias")
    prompt: PromptName | None = Field(None, description="prompt preset for this model (default: the run's `prompt`)")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"spec": value} if isinstance(value, str) else value


class DatasetConfig(_Strict):
    """One dataset; a plain string is read as `name`."""

    name: str
    split: str = "test"
    source: str | None = Field(None, description="None: offline files; a path; 'hub' or 'hub:org/name[:config]'")
    limit: int | None = Field(None, gt=0, description="keep the first `limit` questions (file order)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from circuitdiff.data import dataset_spec

        try:
            return dataset_spec(value).name
        except UserError as err:
            raise ValueError(str(err)) from None

    @property
    def key(self) -> str:
        return dataset_key(self.name, self.split)


class SelectionConfig(_Strict):
    require_finished: bool = Field(True, description="keep only questions both models answered within the token cap")
    beta: float = Field(0.5, ge=0)
    gamma: float = Field(1.5, gt=0)
    delta: float = Field(0.5, gt=0)
    length_rule: Literal["paper", "authors"] = "paper"
    cut_rule: Literal["paper", "authors"] = "paper"


Role = Literal[ROLES]
Objective = Literal[tuple(OBJECTIVES)]
Method = Literal[tuple(METHODS)]


class _Scored(_Strict):
    """How W is scored: EAP, or EAP-IG with `ig_steps` points of `ig_rule` (choices.METHODS, IG_RULES)."""

    ig_steps: int = Field(DEFAULT_IG_STEPS, gt=0, description="eap-ig: quadrature points (one forward + backward each)")
    ig_rule: Literal[tuple(IG_RULES)] = Field(DEFAULT_IG_RULE, description="eap-ig: midpoint, gauss or right")

    def label(self, method: str) -> str:
        """The method's name in folders, tables and meta: "eap", "eap-ig8"."""
        return method_label(method, self.ig_steps, self.ig_rule)


class GradingConfig(_Strict):
    truncated: Literal["strict", "lenient"] = Field(
        "strict", description="an answer cut at max_new_tokens without a \\boxed{} answer: never correct (strict), or "
                              "graded by its text like any other (lenient, the authors' evaluation)")


class ValidationConfig(_Scored):
    """The optional `validation` stage: EAP vs exact edge ablation on a few selected samples."""

    roles: list[Role] = Field(default_factory=lambda: ["tuned"], min_length=1)
    dataset: str | None = Field(None, description="dataset key; None: every dataset of the run")
    alpha: float | None = Field(None, description="None: the run's first alpha")
    n_samples: int = Field(4, gt=0, description="the first N selected samples")
    granularity: Literal["block", "qkv", "head"] = "block"
    objective: Objective = "nll"
    method: Method = Field("eap", description="the scores compared with exact ablation: eap or eap-ig")
    max_edges: int | None = Field(-1, description="-1: every edge at block, 300 random at qkv/head; None: every edge")
    seed: int = 0
    sign_threshold: float = Field(1e-5, gt=0)
    batch_size: int = Field(32, ge=2, description="rows per forward: 1 clean + B-1 edges (does not change a result)")


class InterventionConfig(_Scored):
    """The optional `intervention` stage: scale chosen edges vs random control edges."""

    role: Role = "tuned"
    dataset: str | None = Field(None, description="dataset key; None: every dataset of the run")
    alpha: float | None = Field(None, description="None: the run's first alpha")
    edges: str = Field("top-grown", description="top-grown, top, or a comma list 'u->d,...'")
    objective: Objective = Field("nll", description="the loss measured, and the W files top/top-grown read")
    method: Method = Field("eap", description="the W files (eap or eap-ig) that top/top-grown rank edges by")
    k: int = Field(10, gt=0)
    factor: float = 0.0
    n_random: int = Field(5, ge=0)
    control: Literal["matched", "uniform"] = Field(
        "matched", description="random control edges: matched to the targeted ones by destination layer band (the "
                               "nearest band when one runs out) and mean |W| (needs the role's W file), or uniform")
    bands: int = Field(4, gt=0, description="matched control: equal layer bands over the decoder layers + logits")
    caliper: int = Field(10, gt=0, description="matched control: a partner is drawn among the `caliper` edges of the "
                                              "band closest in log mean |W|")
    n_questions: int = Field(40, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="None: the run's max_new_tokens")
    accuracy: bool = True
    seed: int = 0
    gen_batch_size: int = Field(16, gt=0)
    loss_batch_size: int = Field(8, gt=0)


class ParallelConfig(_Strict):
    """Fan-out of generation and attribution over workers (circuitdiff.parallel; Ray, the `ray` extra)."""

    engine: Literal["ray"] = "ray"
    workers: int = Field(1, ge=1, description="1: everything in this process, no Ray")
    address: str | None = Field(None, description="None: start a local Ray cluster; HOST:PORT, ray://HOST:PORT or "
                                                   "auto: join a running one (`ray start --head`)")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 when device is cuda/auto, else 0")
    shards_per_worker: int = Field(4, ge=1, description="shards planned per worker (the dynamic queue balances them)")

    def gpus(self, device: str) -> float:
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if str(device).startswith("cuda") or device == "auto" else 0.0


class RunConfig(_Scored):
    name: str = "run"
    out: str | None = Field(None, description="run directory (default: runs/<name>); --out overrides it")
    base: ModelConfig
    tuned: ModelConfig
    datasets: list[DatasetConfig] = Field(min_length=1)
    alphas: list[float] = Field(default_factory=lambda: [0.03, 0.1, 0.3, 0.5], min_length=1)
    n_samples: int = Field(100, gt=0, description="N: questions drawn per dataset and alpha")
    seed: int = 0
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    grading: GradingConfig = Field(default_factory=GradingConfig)
    granularity: Literal["block", "qkv", "head"] = "block"
    objective: list[Objective] = Field(default_factory=lambda: ["nll"], min_length=1,
                                       description="nll (the paper's), logit (does not saturate), or both")
    method: list[Method] = Field(default_factory=lambda: ["eap"], min_length=1,
                                 description="eap (the paper's), eap-ig (integrated gradients), or both")
    text: Literal[tuple(TEXTS)] = Field("own", description="own (the paper's), base, tuned or both: see choices.TEXTS")
    dtype: Literal[DTYPE_NAMES] = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    backend: Literal["hf", "vllm"] = "hf"
    prompt: PromptName = "chat"
    instruction: str = INSTRUCTION
    max_new_tokens: int = Field(512, gt=0)
    gen_batch_size: int = Field(16, gt=0)
    attr_batch_size: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    allow_different_tokenizers: bool = Field(False, description="compare models whose tokenizers differ (token "
                                                                 "counts then mean different things)")
    validation: ValidationConfig | None = Field(None, description="run the validation stage after attribution")
    intervention: InterventionConfig | None = Field(None, description="run the intervention stage after validation")
    parallel: ParallelConfig | None = Field(None, description="spread generation and attribution over workers "
                                                              "(results unchanged; not part of any key)")

    @field_validator("objective", "method", mode="before")
    @classmethod
    def _listed(cls, value, info):
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} repeats a value")
        return value

    def scorings(self) -> list[tuple[str, str]]:
        """(objective, method label) of every W file per view: each objective by each method."""
        return [(objective, self.label(method)) for objective in self.objective for method in self.method]

    def views(self) -> list[tuple[str, str]]:
        """(model, text) pairs to attribute: each model on its own answers, plus the same-text ones of `text`."""
        views = [("tuned", "tuned"), ("base", "base")]
        if self.text in ("base", "both"):
            views.append(("tuned", "base"))
        if self.text in ("tuned", "both"):
            views.append(("base", "tuned"))
        return views

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        for alpha in value:
            if not 0 < alpha <= 1:
                raise ValueError(f"alpha {alpha} must lie in (0, 1]")
        if len(set(value)) != len(value):
            raise ValueError("alphas repeat a value")
        return value

    @field_validator("datasets")
    @classmethod
    def _unique(cls, value: list[DatasetConfig]) -> list[DatasetConfig]:
        keys = [d.key for d in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"datasets repeat a name/split ({', '.join(keys)}); list each once")
        return value

    def prompt_for(self, role: str) -> str:
        return getattr(self, role).prompt or self.prompt


# ---------------------------------------------------------------- loading

def presets_dir() -> Path:
    return Path(str(resources.files("circuitdiff") / "configs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_config(arg: str) -> Path:
    """A config path, or the shipped preset of that name."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    preset = presets_dir() / f"{arg}.yaml"
    if preset.is_file():
        return preset
    raise UserError(f"config {arg!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_config(data: dict, origin: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a YAML mapping of settings at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{origin}: {_describe(err)}; fix that field") from None


def load_config(arg: str) -> RunConfig:
    path = resolve_config(arg)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_config(data, str(path))


def override(config: RunConfig, values: dict, origin: str = "command line") -> RunConfig:
    """`config` with some fields replaced (e.g. from `circuitdiff run --method`), checked like the YAML."""
    return parse_config({**config.model_dump(exclude_defaults=True), **values}, origin)
