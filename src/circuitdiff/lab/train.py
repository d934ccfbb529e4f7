"""`circuitdiff train {sft,grpo,dpo}`: post-train one base with TRL and LoRA, same data, same prompts.

Only the algorithm (or the sampling temperature) differs between runs made from one base:
- the problems: a dataset of `circuitdiff.data` (default `gsm8k` train; `arith` for the offline
  demo), rendered with the same prompt preset and instruction as `circuitdiff run` uses;
- sft: supervised fine-tuning on the gold solutions (GSM8K's worked solution with ``#### N``
  turned into ``\\boxed{N}``; for `arith`, ``a op b = c`` and ``\\boxed{c}``), loss on the completion only;
- grpo: TRL's GRPOTrainer with the DAPO loss (token-level normalisation over the batch,
  clip-higher: epsilon 0.2 / 0.28, no KL term), group size `num_generations`, the reward of
  `circuitdiff.lab.reward`, sampling temperature a flag;
- dpo: pairs from the BASE model's own samples (`sample_answers`): for each training question
  `dpo_samples` answers at the temperature, graded; a correct answer is chosen over an incorrect
  one (`build_dpo_pairs`); TRL's DPOTrainer (sigmoid loss, beta 0.1).
LoRA (peft) on the attention and MLP projections keeps the artifacts small. Checkpoints every
`save_every` steps land in OUT/checkpoint-{step}/ (the adapter, plus the optimizer state for
resuming): each one is a LoRA directory that `load_model` (and so `circuitdiff run`/`track`)
loads, its adapter_config naming the base by its circuitdiff spec. A rerun with the same OUT
resumes from the last checkpoint. OUT/train.json records every setting and convention.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from circuitdiff import io
from circuitdiff.data import Problem, _offline_file, _read_rows, dataset_spec, load_problems
from circuitdiff.errors import UserError
from circuitdiff.grade import grade
from circuitdiff.lab.reward import CONVENTION as REWARD_CONVENTION
from circuitdiff.lab.reward import make_trl_reward
from circuitdiff.lab.settings import TrainSettings
from circuitdiff.prompts import render
from circuitdiff.store import layout

# ---------------------------------------------------------------------- data

def prompt_rows(problems: list[Problem], tokenizer, preset: str, instruction: str) -> list[dict]:
    """One row per problem: the rendered prompt text plus what the reward needs (gold, kind)."""
    return [{"prompt": render(p.question, preset, tokenizer, instruction), "gold": p.gold, "kind": p.kind,
             "idx": p.idx} for p in problems]


_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def gold_solution(dataset: str, raw: dict, problem: Problem) -> str:
    """The SFT target for a problem: a worked solution that ends in \\boxed{gold}."""
    if dataset == "gsm8k":
        work = _GSM8K_CALC.sub("", str(raw["answer"]).split("####")[0]).strip()
        return f"{work}\nThe final answer is \\boxed{{{problem.gold}}}."
    if dataset == "arith":
        return f"{raw['expression']} = {problem.gold}\nThe final answer is \\boxed{{{problem.gold}}}."
    if dataset in ("math", "math500"):
        return str(raw.get("solution") or f"\\boxed{{{problem.gold}}}")
    raise UserError(f"sft needs worked solutions; dataset {dataset!r} has none here (use gsm8k, arith or math)")


def sft_rows(settings: TrainSettings, tokenizer) -> list[dict]:
    problems = load_problems(settings.dataset, settings.split, limit=settings.limit)
    spec = dataset_spec(settings.dataset)
    raw_rows = spec.generate(settings.split) if spec.generate else _read_rows(_offline_file(spec, settings.split), settings.split)
    rows = prompt_rows(problems, tokenizer, settings.prompt, settings.instruction)
    for row, problem in zip(rows, problems):
        row["completion"] = gold_solution(spec.name, raw_rows[problem.idx], problem) + (tokenizer.eos_token or "")
    return rows


def build_dpo_pairs(samples: list[dict], max_pairs: int = 2, seed: int = 0) -> list[dict]:
    """Preference pairs from a model's own graded samples.

    samples: one dict per question: ``prompt``, ``completions`` (list of text), ``correct`` (list of
    bool, same length). For each question with at least one correct and one incorrect completion,
    up to `max_pairs` pairs (chosen = a correct completion, rejected = an incorrect one), each
    completion used at most once, drawn with `seed`. Questions with only correct or only wrong
    answers give no pair. Identical chosen/rejected texts are never paired.
    """
    rng = random.Random(seed)
    pairs = []
    for sample in samples:
        good = [c for c, ok in zip(sample["completions"], sample["correct"]) if ok]
        bad = [c for c, ok in zip(sample["completions"], sample["correct"]) if not ok]
        rng.shuffle(good)
        rng.shuffle(bad)
        for chosen, rejected in list(zip(good, bad))[:max_pairs]:
            if chosen != rejected:
                pairs.append({"prompt": sample["prompt"], "chosen": chosen, "rejected": rejected,
                              "idx": sample.get("idx")})
    return pairs


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                   seed: int, batch_size: int = 16) -> list[list[tuple[str, bool]]]:
    """n sampled completions per prompt (left padding, KV cache): (text before EOS, finished with EOS)."""
    from circuitdiff.decoding import eos_token_ids

    eos = torch.tensor(eos_token_ids(model, tokenizer))
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[tuple[str, bool]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad)
            new = gen[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            done = torch.isin(new.cpu(), eos).any(dim=1).tolist()
            pairs = list(zip(texts, done))
            out += [pairs[i * n:(i + 1) * n] for i in range(len(chunk))]
    finally:
        tokenizer.padding_side = side
    return out


def dpo_rows(settings: TrainSettings, model, tokenizer, out: Path, log=print) -> list[dict]:
    """Pairs from the base model's own samples; cached in OUT/dpo_pairs.jsonl with the key of the settings that
    made them (a rerun with the same settings reuses them; other settings rebuild them). A pairs file without a
    key is the user's own and is used as it is."""
    from circuitdiff.grade import GRADER_VERSION
    from circuitdiff.store.keys import read_key, settings_key, up_to_date, write_key

    cache = layout.dpo_pairs(out)
    made_by = {k: getattr(settings, k) for k in ("base", "dataset", "split", "limit", "prompt", "instruction",
                                                  "dpo_samples", "temperature", "max_completion_length", "seed",
                                                  "truncated")}
    made_by["grader"] = GRADER_VERSION
    key = settings_key(made_by)
    if cache.exists() and (up_to_date(cache, key, log) or read_key(cache) is None):
        return io.read_jsonl(cache)
    problems = load_problems(settings.dataset, settings.split, limit=settings.limit)
    rows = prompt_rows(problems, tokenizer, settings.prompt, settings.instruction)
    answers = sample_answers(model, tokenizer, [r["prompt"] for r in rows], settings.dpo_samples,
                             settings.temperature, settings.max_completion_length, settings.seed)
    samples = [{"prompt": r["prompt"], "idx": r["idx"], "completions": [x for x, _ in t],
                "correct": [grade(x, r["gold"], r["kind"], finished=done, truncated_rule=settings.truncated).correct
                            for x, done in t]}
               for r, t in zip(rows, answers)]
    pairs = build_dpo_pairs(samples, seed=settings.seed)
    if not pairs:
        raise UserError(f"dpo: no question had both a correct and a wrong sampled answer among {len(rows)} "
                        f"(temperature {settings.temperature}, {settings.dpo_samples} samples each); "
                        "raise --dpo-samples or --temperature, or use an easier dataset")
    eos = tokenizer.eos_token or ""
    pairs = [{**p, "chosen": p["chosen"] + eos, "rejected": p["rejected"] + eos} for p in pairs]
    io.write_jsonl(cache, pairs)
    write_key(cache, key, made_by)
    return pairs


# ---------------------------------------------------------------------- model

class _NameBase:
    """TrainerCallback: every saved adapter names the base by its circuitdiff spec (not a cache path)."""

    def __init__(self, base_spec: str):
        self.base_spec = base_spec

    def on_save(self, args, state, control, **kwargs):
        name_base(layout.train_checkpoint(Path(args.output_dir), state.global_step), self.base_spec)


def name_base(adapter_dir: Path, base_spec: str) -> None:
    config_path = layout.adapter_config(adapter_dir)
    if config_path.exists():
        config = io.read_json(config_path)
        config["base_model_name_or_path"] = base_spec
        io.write_text(config_path, json.dumps(config, indent=2))


# ---------------------------------------------------------------------- train

def train(settings: TrainSettings, out: str | Path, callbacks: list | None = None, log=print) -> Path:
    """Train `settings.algorithm` from `settings.base` into `out`; returns OUT/final (the last adapter)."""
    from peft import LoraConfig
    from transformers import TrainerCallback, set_seed

    from circuitdiff.models import load_model, resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    set_seed(settings.seed)
    loaded = load_model(settings.base, settings.dtype, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    record = {"settings": asdict(settings), "device": device, "base_info": loaded.info,
              "reward": REWARD_CONVENTION, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "conventions": _conventions(settings)}
    io.write_json(layout.train_record(out), record)

    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")
    common = dict(output_dir=str(out), max_steps=settings.steps, save_steps=settings.save_every,
                  save_strategy="steps", learning_rate=settings.learning_rate, logging_steps=1, report_to=[],
                  seed=settings.seed, data_seed=settings.seed, use_cpu=device == "cpu",
                  bf16=settings.dtype == "bfloat16", lr_scheduler_type="constant", warmup_steps=0,
                  save_total_limit=None, disable_tqdm=False,
                  gradient_checkpointing=settings.gradient_checkpointing)
    name_cb = type("NameBase", (_NameBase, TrainerCallback), {})(settings.base)
    trainer = _make_trainer(settings, model, tokenizer, lora, common, out, [name_cb] + list(callbacks or []))
    done = layout.find_checkpoints(out)
    if done:
        log(f"train: resuming from {done[-1][1]}")
    trainer.train(resume_from_checkpoint=True if done else None)
    final = layout.train_final(out)
    trainer.model.save_pretrained(str(final))
    name_base(final, settings.base)
    record.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "log_history": trainer.state.log_history,
                   "checkpoints": [str(p) for _, p in layout.find_checkpoints(out)], "final": str(final)})
    io.write_json(layout.train_record(out), record)
    return final


def _make_trainer(settings: TrainSettings, model, tokenizer, lora, common: dict, out: Path, callbacks: list):
    import datasets

    if settings.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        problems = load_problems(settings.dataset, settings.split, limit=settings.limit)
        data = datasets.Dataset.from_list(prompt_rows(problems, tokenizer, settings.prompt, settings.instruction))
        config = GRPOConfig(
            **common,
            per_device_train_batch_size=settings.questions_per_step * settings.num_generations,
            gradient_accumulation_steps=1,
            num_generations=settings.num_generations,
            max_completion_length=settings.max_completion_length,
            temperature=settings.temperature, top_k=0, top_p=1.0,
            loss_type="dapo", beta=0.0, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
            scale_rewards="group", log_completions=False,
        )
        from circuitdiff.decoding import eos_token_ids

        reward_func = make_trl_reward(eos_token_ids(model, tokenizer), settings.truncated)
        return GRPOTrainer(model=model, reward_funcs=reward_func, args=config, train_dataset=data,
                           processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    if settings.algorithm == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows(settings, tokenizer)]
        config = SFTConfig(**common, per_device_train_batch_size=settings.batch_size, completion_only_loss=True,
                           max_length=1024)
        return SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    from trl import DPOConfig, DPOTrainer

    pairs = dpo_rows(settings, model, tokenizer, out)
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    config = DPOConfig(**common, per_device_train_batch_size=settings.batch_size, beta=settings.dpo_beta,
                       max_length=1024)
    return DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=lora, callbacks=callbacks)


def _conventions(s: TrainSettings) -> dict:
    common = (f"LoRA r={s.lora_r} alpha={s.lora_alpha} on {','.join(s.lora_targets)}; lr {s.learning_rate} constant; "
              f"seed {s.seed}; prompt preset {s.prompt!r} with the run's instruction")
    algo = {
        "grpo": (f"GRPO, DAPO loss (token-level over the batch, clip {s.epsilon}/{s.epsilon_high}, no KL), "
                 f"{s.questions_per_step} questions x {s.num_generations} samples per step, temperature "
                 f"{s.temperature}, at most {s.max_completion_length} new tokens; {REWARD_CONVENTION}"),
        "sft": "SFT on gold worked solutions ending in \\boxed{gold}, loss on completion tokens only",
        "dpo": (f"DPO (sigmoid, beta {s.dpo_beta}) on pairs from the base's own samples ({s.dpo_samples} per "
                f"question, temperature {s.temperature}): a correct answer chosen over a wrong one"),
    }[s.algorithm]
    return {"algorithm": algo, "common": common, "data": f"{s.dataset} {s.split}" + (f" (first {s.limit})" if s.limit else "")}
