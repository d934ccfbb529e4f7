"""The training rows of each algorithm of `circuitdiff train`, from one dataset and one prompt preset.

- every algorithm: `prompt_rows`, the problems rendered like `circuitdiff run` renders them;
- sft: `sft_rows`, the gold worked solutions (`gold_solution`);
- dpo: `dpo_rows`, pairs from the base's own sampled answers (`sample_answers`, `build_dpo_pairs`);
- self-distill: `self_distill_rows`, the base's own greedy answers that finished with EOS and are
  correct: SFT on them sharpens the base on what it already does, with no new information (a
  null fine-tune).
The rows made from a model's answers are cached in the training directory, keyed by the
settings that made them.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from circuitdiff import io
from circuitdiff.data import Problem, _offline_file, _read_rows, dataset_spec, load_problems
from circuitdiff.errors import UserError
from circuitdiff.grade import grade
from circuitdiff.lab.settings import TrainSettings
from circuitdiff.prompts import encode, render
from circuitdiff.store import layout

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
    from circuitdiff.store.keys import write_key

    cache = layout.dpo_pairs(out)
    key, made_by = _made_by(settings, ("base", "dataset", "split", "limit", "prompt", "instruction", "dpo_samples",
                                       "temperature", "max_completion_length", "seed", "truncated"))
    pairs = _cached(cache, key, log)
    if pairs is not None:
        return pairs
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


def _made_by(settings: TrainSettings, names: tuple[str, ...]) -> tuple[str, dict]:
    """(key, settings) of rows made from the base's answers: the named settings and the grader version."""
    from circuitdiff.grade import GRADER_VERSION
    from circuitdiff.store.keys import settings_key

    made_by = {k: getattr(settings, k) for k in names}
    made_by["grader"] = GRADER_VERSION
    return settings_key(made_by), made_by


def _cached(cache: Path, key: str, log) -> list[dict] | None:
    """The cached rows when their key matches (a file without a key is the user's own and is used as it is)."""
    from circuitdiff.store.keys import read_key, up_to_date

    if cache.exists() and (up_to_date(cache, key, log) or read_key(cache) is None):
        return io.read_jsonl(cache)
    return None


def self_distill_rows(settings: TrainSettings, model, tokenizer, out: Path, log=print) -> list[dict]:
    """The base's greedy answers to the training problems that finished with EOS and are correct (strict
    grading), as SFT rows {prompt, completion (+ EOS), idx}; cached in OUT/self_distill.jsonl."""
    from circuitdiff.decoding import HFBackend
    from circuitdiff.store.keys import write_key

    cache = layout.self_distill_rows(out)
    key, made_by = _made_by(settings, ("base", "dataset", "split", "limit", "prompt", "instruction",
                                       "max_completion_length"))
    rows = _cached(cache, key, log)
    if rows is not None:
        return rows
    problems = load_problems(settings.dataset, settings.split, limit=settings.limit)
    prompts = prompt_rows(problems, tokenizer, settings.prompt, settings.instruction)
    backend = HFBackend(model, tokenizer, settings.max_completion_length)
    rows, eos = [], tokenizer.eos_token or ""
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start:start + settings.batch_size]
        ids = [encode(p.question, tokenizer, settings.prompt, settings.instruction)
               for p in problems[start:start + settings.batch_size]]
        for row, gen in zip(chunk, backend.generate(ids)):
            text = tokenizer.decode(gen.answer_ids, skip_special_tokens=True)
            finished = gen.stop == "eos"
            if finished and grade(text, row["gold"], row["kind"], finished=True).correct:
                rows.append({"prompt": row["prompt"], "completion": text + eos, "idx": row["idx"]})
    if not rows:
        raise UserError(f"self-distill: the base answered none of the {len(prompts)} training problems correctly "
                        "within the cap; use an easier dataset or a larger --max-completion-length")
    io.write_jsonl(cache, rows)
    write_key(cache, key, made_by)
    log(f"self-distill: {len(rows)} of {len(prompts)} training problems answered correctly and finished by the base")
    return rows
