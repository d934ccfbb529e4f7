"""GRPO for `circuitdiff train grpo`: TRL's GRPOTrainer with the DAPO loss, and the two controls.

- DAPO (Yu et al. 2025), as far as it applies here: token-level loss over the batch, clip-higher
  (epsilon 0.2 / 0.28), no KL term (TRL's loss_type "dapo", beta 0); dynamic sampling: a group
  whose rewards are all equal has advantage 0 everywhere, and is dropped from the step: its tokens
  leave the loss mask and so the token-level normaliser (DAPO also over-samples to refill the
  batch; this does not, so a step may train on fewer groups); overlong: "cap" (a completion cut at
  `max_completion_length` has no answer under strict grading: -0.5) or "soft" (DAPO's linear
  penalty, 0 down to -1 over the last `overlong_buffer` tokens, added to the reward).
- `shuffle_rewards` (a null control): each step's rewards are permuted across the step's
  completions before the advantages are computed: the same reward multiset, the same
  optimisation pressure, no link between an answer and its reward.
"""

from __future__ import annotations

import random

import torch

from circuitdiff.lab.reward import make_trl_reward
from circuitdiff.lab.settings import TrainSettings


def shuffled(reward_func, seed: int):
    """`reward_func` whose rewards are permuted within each call (one call = one step's completions);
    the permutation of call c is drawn from random.Random(seed + c). The true rewards of each call are
    kept in `.true_rewards` (a list of lists) so that the real task reward can be logged."""
    calls = {"n": 0}

    def shuffled_reward(completions, **kwargs) -> list[float]:
        rewards = list(reward_func(completions, **kwargs))
        rng = random.Random(seed + calls["n"])
        calls["n"] += 1
        shuffled_reward.true_rewards.append(rewards)
        order = list(range(len(rewards)))
        rng.shuffle(order)
        return [rewards[i] for i in order]

    shuffled_reward.true_rewards = []
    shuffled_reward.__name__ = "shuffled_" + getattr(reward_func, "__name__", "reward")
    return shuffled_reward


def soft_overlong(max_length: int, buffer: int):
    """DAPO's soft overlong punishment as a TRL reward: 0 up to max_length - buffer tokens, then linear
    down to -1 at max_length (and -1 beyond)."""

    def soft_overlong_penalty(completion_ids, **_) -> list[float]:
        out = []
        for ids in completion_ids:
            excess = len(ids) - (max_length - buffer)
            out.append(0.0 if excess <= 0 else max(-1.0, -excess / buffer))
        return out

    return soft_overlong_penalty


def drop_equal_groups(mask: torch.Tensor, advantages: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """(completion mask with the rows of every all-zero-advantage group zeroed, number of groups dropped).

    mask [rows, tokens], advantages [rows]; rows come in consecutive groups of `group` completions of
    one prompt (TRL's sampler repeats each prompt `num_generations` times in a row). With group
    scaling a group of equal rewards has advantage exactly 0 in every row."""
    equal = (advantages.view(-1, group) == 0).all(dim=1)  # [groups]
    keep = (~equal).repeat_interleave(group).to(mask.dtype)  # [rows]
    return mask * keep[:, None], int(equal.sum())


def _trainer_class():
    from trl import GRPOTrainer

    class DapoGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that drops the groups whose rewards are all equal (dynamic sampling)."""

        dynamic_sampling = True

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if not self.dynamic_sampling or self.accelerator.num_processes != 1:
                return output
            mask, dropped = drop_equal_groups(output["completion_mask"], output["advantages"], self.num_generations)
            output["completion_mask"] = mask
            output["num_items_in_batch"] = mask.sum().to(output["num_items_in_batch"].dtype)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["groups_dropped"].append(float(dropped))
            return output

    return DapoGRPOTrainer


def make_grpo_trainer(settings: TrainSettings, model, tokenizer, lora, common: dict, rows: list[dict], callbacks):
    import datasets
    from trl import GRPOConfig

    from circuitdiff.decoding import eos_token_ids

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
    task = make_trl_reward(eos_token_ids(model, tokenizer), settings.truncated)
    funcs = [task]
    if settings.overlong == "soft":
        funcs.append(soft_overlong(settings.max_completion_length, settings.overlong_buffer))
    if settings.shuffle_rewards:
        funcs = [shuffled(_summed(funcs), settings.seed)]
    cls = _trainer_class()
    trainer = cls(model=model, reward_funcs=funcs, args=config, train_dataset=datasets.Dataset.from_list(rows),
                  processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    trainer.dynamic_sampling = settings.dynamic_sampling
    return trainer


def _summed(funcs):
    """One reward function that is the sum of `funcs` (so the shuffle moves the whole reward)."""
    if len(funcs) == 1:
        return funcs[0]

    def total_reward(completions, **kwargs) -> list[float]:
        parts = [f(completions=completions, **kwargs) for f in funcs]
        return [sum(values) for values in zip(*parts)]

    return total_reward


def convention(s: TrainSettings) -> str:
    """The GRPO recipe in words, for train.json."""
    from circuitdiff.lab.reward import CONVENTION as REWARD

    overlong = ("cap: a completion cut at the cap has no answer (strict grading, -0.5)" if s.overlong == "cap" else
                f"soft: DAPO's penalty, 0 to -1 over the last {s.overlong_buffer} tokens before the cap, added")
    return (f"GRPO, DAPO loss (token-level over the batch, clip {s.epsilon}/{s.epsilon_high}, no KL), "
            f"{s.questions_per_step} questions x {s.num_generations} samples per step, temperature {s.temperature}, "
            f"at most {s.max_completion_length} new tokens; dynamic sampling "
            f"{'on (groups with equal rewards dropped, not refilled)' if s.dynamic_sampling else 'off'}; overlong {overlong}; "
            f"{REWARD}" + ("; NULL CONTROL: rewards permuted within each step" if s.shuffle_rewards else ""))
