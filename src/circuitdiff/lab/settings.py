"""The lab's settings, torch-free (the CLI reads their defaults; `--help` imports nothing heavy).

- `TrainSettings`: one post-training run (`circuitdiff train`), see lab/train.py;
- `TrackSettings`: the evaluation of every checkpoint (`circuitdiff track`), see lab/track.py.
  Fields marked UNKEYED (device, batch sizes, progress bars) do not change a number; every
  other field is part of the key of a tracked result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from circuitdiff.errors import UserError
from circuitdiff.prompts import INSTRUCTION

UNKEYED = {"unkeyed": True}

ALGORITHMS = ("sft", "grpo", "dpo", "self-distill")
OVERLONG = ("cap", "soft")
QUESTION_SETS = ("fixed", "per-checkpoint")
TRACK_TEXTS = ("own", "start")  # whose answers each checkpoint is scored on
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainSettings:
    algorithm: str
    base: str = "smollm2-135m-instruct"
    dataset: str = "gsm8k"
    split: str = "train"
    limit: int | None = None  # first n training problems
    prompt: str = "chat"
    instruction: str = INSTRUCTION
    steps: int = 100
    save_every: int = 20
    learning_rate: float = 1e-4
    seed: int = 0
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # grading of sampled answers (grpo reward, dpo pairs): an answer cut at the cap without a \boxed{}
    # answer is never correct ("strict", the pipeline's default) or graded by its text ("lenient")
    truncated: str = "strict"
    # sampling (grpo, and dpo's pair building)
    temperature: float = 1.0
    max_completion_length: int = 200
    # grpo
    questions_per_step: int = 8
    num_generations: int = 4
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    # DAPO's dynamic sampling: a group whose rewards are all equal carries no advantage; it is dropped from the
    # step (its tokens leave the token-level normaliser). The batch is not refilled (DAPO over-samples to refill)
    dynamic_sampling: bool = True
    # a completion cut at the cap: "cap" = no answer under strict grading (-0.5); "soft" adds DAPO's linear
    # penalty from 0 to -1 over the last `overlong_buffer` tokens before the cap
    overlong: str = "cap"
    overlong_buffer: int = 40
    # null control: permute the rewards within each step (same reward multiset, no task signal)
    shuffle_rewards: bool = False
    # dpo
    dpo_beta: float = 0.1
    dpo_samples: int = 4
    # sft / dpo
    batch_size: int = 8
    gradient_checkpointing: bool = False  # recompute activations in backward (big models); off: faster
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm {self.algorithm!r} is unknown; use one of {', '.join(ALGORITHMS)}")
        if self.steps < 1 or self.save_every < 1:
            raise UserError("steps and save_every must be >= 1")
        if self.algorithm == "grpo" and self.num_generations < 2:
            raise UserError("grpo needs num_generations >= 2 (advantages are relative to the group)")
        if self.overlong not in OVERLONG:
            raise UserError(f"overlong {self.overlong!r} is unknown; use one of {', '.join(OVERLONG)}")
        if self.overlong == "soft" and not 0 < self.overlong_buffer < self.max_completion_length:
            raise UserError(f"overlong_buffer {self.overlong_buffer} must lie in (0, max_completion_length)")
        if self.shuffle_rewards and self.algorithm != "grpo":
            raise UserError("shuffle_rewards is a grpo setting (the null control of the reward)")
        if self.truncated not in ("strict", "lenient"):
            raise UserError(f"truncated {self.truncated!r} is unknown; use strict or lenient")
        self.lora_targets = tuple(self.lora_targets)


@dataclass
class TrackSettings:
    dataset: str = "arith"
    split: str = "test"
    source: str | None = None  # None: the dataset's offline/generated source; else a file path or 'hub'
    limit: int | None = None  # the first n test problems
    alpha: float = 0.1
    n_samples: int = 100  # N: questions drawn (once for the fixed set; per checkpoint otherwise)
    # "fixed": one question set, T_cut and raw histogram range for every checkpoint (lab/question_set.py);
    # "per-checkpoint": the selection re-run for each checkpoint against the start (questions, T_cut and
    # ranges then differ from step to step)
    question_set: str = "fixed"
    # "own": each checkpoint on its own answers (the paper's setting; the fixed set then needs every checkpoint
    # correct); "start": every checkpoint on the START's answers (same tokens everywhere: only the weights differ;
    # the fixed set needs the start correct only; fixed question set only)
    text: str = "own"
    objectives: tuple[str, ...] = ("nll", "logit")
    seed: int = 0
    max_new_tokens: int | None = None  # None: the training run's max_completion_length
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    granularity: str = "block"
    entries: str = "all"  # "all" (dense, paper-compatible) or "edges"
    bins: int = 100
    log_base: str = "e"
    eps: float = 1e-12
    n_boot: int = 10000
    n_perm: int = 1000
    min_samples: int = 2  # fewer selected questions: metrics NaN (a pair needs >= 2 for its statistics)
    selection: dict = field(default_factory=dict)  # require_finished/beta/gamma/delta/length_rule/cut_rule overrides
    truncated: str = "strict"  # the grading rule for answers cut at the cap (strict: never correct; lenient)
    device: str = field(default="auto", metadata=UNKEYED)
    gen_batch_size: int = field(default=16, metadata=UNKEYED)
    attr_batch_size: int = field(default=1, metadata=UNKEYED)
    progress: bool = field(default=False, metadata=UNKEYED)

    def __post_init__(self) -> None:
        from circuitdiff.metrics import ENTRIES

        if self.entries not in ENTRIES:
            raise UserError(f"entries {self.entries!r} is unknown; use one of {', '.join(ENTRIES)}")
        if not 0 < self.alpha <= 1:
            raise UserError(f"alpha={self.alpha} must lie in (0, 1]")
        from circuitdiff.choices import OBJECTIVES

        if self.question_set not in QUESTION_SETS:
            raise UserError(f"question_set {self.question_set!r} is unknown; use one of {', '.join(QUESTION_SETS)}")
        if self.text not in TRACK_TEXTS:
            raise UserError(f"text {self.text!r} is unknown; use one of {', '.join(TRACK_TEXTS)}")
        if self.text == "start" and self.question_set != "fixed":
            raise UserError("text 'start' needs the fixed question set (--question-set fixed)")
        self.objectives = tuple(self.objectives)
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise UserError(f"objectives {list(self.objectives)}: use one or both of {', '.join(OBJECTIVES)}, once each")
        if self.min_samples < 2:
            raise UserError("min_samples must be at least 2 (the paired statistics need two questions)")
        self.report_settings()  # validates bins, log base, n_boot, n_perm

    def result_settings(self) -> dict:
        """The settings that change a number (every field not marked UNKEYED)."""
        data = asdict(self)
        keyed = {f.name: data[f.name] for f in fields(self) if not f.metadata.get("unkeyed")}
        if keyed["text"] == "own":  # the setting before `text` existed: tracks made then keep their keys
            del keyed["text"]
        return keyed

    def scored_text(self) -> str | None:
        """The answers every model of a checkpoint's run dir is scored on: None (its own) or "base" (the start's,
        copied in as the base's answers)."""
        return "base" if self.text == "start" else None

    def report_settings(self, value_range: str | tuple[float, float] = "shared"):
        """The report's settings for one checkpoint's pair; value_range: the raw-scale histogram range."""
        from circuitdiff.report import Settings

        try:
            return Settings(entries=(self.entries,), bins=self.bins, log_base=self.log_base, eps=self.eps,
                            n_boot=self.n_boot, n_perm=self.n_perm, seed=self.seed, range=value_range)
        except ValueError as err:
            raise UserError(f"track settings: {err}") from None
