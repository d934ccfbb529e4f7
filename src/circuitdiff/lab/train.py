"""`circuitdiff train {sft,grpo,dpo,self-distill}`: post-train one base with TRL and LoRA, same data and prompts.

Only the algorithm (or the sampling temperature) differs between runs made from one base:
- the problems: a dataset of `circuitdiff.data` (default `gsm8k` train; `arith` for the offline
  demo), rendered with the same prompt preset and instruction as `circuitdiff run` uses;
- sft: supervised fine-tuning on the gold solutions (GSM8K's worked solution with ``#### N``
  turned into ``\\boxed{N}``; for `arith`, ``a op b = c`` and ``\\boxed{c}``), loss on the completion only;
- grpo: TRL's GRPOTrainer with the DAPO loss and dynamic sampling (lab/grpo.py), group size
  `num_generations`, the reward of `circuitdiff.lab.reward`, sampling temperature a flag;
  `shuffle_rewards` makes it a null control (rewards permuted within each step);
- dpo: pairs from the BASE model's own samples (lab/rows.py): for each training question
  `dpo_samples` answers at the temperature, graded; a correct answer is chosen over an incorrect
  one; TRL's DPOTrainer (sigmoid loss, beta 0.1);
- self-distill: SFT on the base's own greedy answers that finished and are correct (a null
  fine-tune: sharpening with no new information).
LoRA (peft) on the attention and MLP projections keeps the artifacts small. Checkpoints every
`save_every` steps land in OUT/checkpoint-{step}/ (the adapter, plus the optimizer state for
resuming): each one is a LoRA directory that `load_model` (and so `circuitdiff run`/`track`)
loads, its adapter_config naming the base by its circuitdiff spec. A rerun with the same OUT
resumes from the last checkpoint. OUT/train.json records every setting and convention.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from circuitdiff import io
from circuitdiff.data import load_problems
from circuitdiff.lab.reward import CONVENTION as REWARD_CONVENTION
from circuitdiff.lab.rows import dpo_rows, prompt_rows, self_distill_rows, sft_rows
from circuitdiff.lab.settings import TrainSettings
from circuitdiff.store import layout

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
    if (final := _already_trained(settings, out, log)) is not None:
        return final
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


def _already_trained(settings: TrainSettings, out: Path, log) -> Path | None:
    """OUT/final when this training is done: train.json finished with these settings, or a checkpoint at the last
    step (its adapter is the final model: copied to OUT/final). Resuming a finished run would train an extra step."""
    final, record_path = layout.train_final(out), layout.train_record(out)
    record = io.read_json(record_path) if record_path.exists() else {}
    if record.get("finished") and record.get("settings") == json.loads(json.dumps(asdict(settings))) \
            and layout.adapter_config(final).exists():
        log(f"train: {out} already finished ({settings.steps} steps); nothing to do")
        return final
    done = [c for c in layout.find_checkpoints(out) if c[0] >= settings.steps]
    if not done:
        return None
    step, checkpoint = done[0]  # the step itself when it was saved
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in layout.ADAPTER_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    name_base(final, settings.base)
    state_path = layout.trainer_state(checkpoint)
    history = io.read_json(state_path).get("log_history", []) if state_path.exists() else []
    io.write_json(record_path, {**record, "settings": asdict(settings), "log_history": history, "final": str(final),
                                "checkpoints": [str(p) for _, p in layout.find_checkpoints(out)],
                                "finished": record.get("finished") or time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log(f"train: {checkpoint} is step {step} of {settings.steps}; its adapter is the final one ({final})")
    return final


def _make_trainer(settings: TrainSettings, model, tokenizer, lora, common: dict, out: Path, callbacks: list):
    import datasets

    if settings.algorithm == "grpo":
        from circuitdiff.lab.grpo import make_grpo_trainer

        problems = load_problems(settings.dataset, settings.split, limit=settings.limit)
        rows = prompt_rows(problems, tokenizer, settings.prompt, settings.instruction)
        return make_grpo_trainer(settings, model, tokenizer, lora, common, rows, callbacks)
    if settings.algorithm in ("sft", "self-distill"):
        from trl import SFTConfig, SFTTrainer

        made = sft_rows(settings, tokenizer) if settings.algorithm == "sft" else self_distill_rows(
            settings, model, tokenizer, out)
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in made]
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
    from circuitdiff.lab.grpo import convention as grpo_convention

    common = (f"LoRA r={s.lora_r} alpha={s.lora_alpha} on {','.join(s.lora_targets)}; lr {s.learning_rate} constant; "
              f"seed {s.seed}; prompt preset {s.prompt!r} with the run's instruction")
    algo = {
        "grpo": grpo_convention(s),
        "sft": "SFT on gold worked solutions ending in \\boxed{gold}, loss on completion tokens only",
        "self-distill": ("NULL CONTROL: SFT on the base's own greedy answers that finished with EOS and are correct "
                         f"(strict grading, at most {s.max_completion_length} new tokens), loss on completion tokens only"),
        "dpo": (f"DPO (sigmoid, beta {s.dpo_beta}) on pairs from the base's own samples ({s.dpo_samples} per "
                f"question, temperature {s.temperature}): a correct answer chosen over a wrong one"),
    }[s.algorithm]
    return {"algorithm": algo, "common": common, "data": f"{s.dataset} {s.split}" + (f" (first {s.limit})" if s.limit else "")}
