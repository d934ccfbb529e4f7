"""`circuitdiff train {sft,grpo,dpo,self-distill}`: post-train one base with TRL + LoRA, checkpoints every k steps."""

from __future__ import annotations

from circuitdiff.cli import options
from circuitdiff.lab.settings import ALGORITHMS, OVERLONG, TrainSettings


def register(subparsers) -> None:
    d = options.defaults(TrainSettings)
    p = subparsers.add_parser(
        "train",
        help="post-train a base with SFT, GRPO (DAPO loss), DPO or a null fine-tune (TRL + LoRA), checkpoints every k steps",
        description="Train one algorithm from one base on one dataset; checkpoints are LoRA dirs that "
                    "`circuitdiff run`/`track` load. A rerun with the same --out resumes.",
    )
    p.add_argument("algorithm", choices=ALGORITHMS)
    p.add_argument("--base", default=d.base, help="model spec (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default=d.dataset, help="training problems (gsm8k, arith, math, ...)")
    p.add_argument("--split", default=d.split)
    p.add_argument("--limit", type=int, help="use the first n problems")
    p.add_argument("--prompt", default=d.prompt, help="prompt preset (chat, deepseek, mistral, qwen-chatml, plain)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (grpo, dpo pairs)")
    p.add_argument("--truncated", choices=["strict", "lenient"], default=d.truncated,
                   help="a sampled answer cut at the cap without a \\boxed{} answer: never correct (strict, default) "
                        "or graded by its text (lenient)")
    p.add_argument("--max-completion-length", type=int, default=d.max_completion_length)
    p.add_argument("--questions-per-step", type=int, default=d.questions_per_step, help="grpo")
    p.add_argument("--num-generations", type=int, default=d.num_generations, help="grpo group size")
    p.add_argument("--no-dynamic-sampling", action="store_true",
                   help="grpo: keep groups whose rewards are all equal (default: drop them from the step, as DAPO)")
    p.add_argument("--overlong", choices=OVERLONG, default=d.overlong,
                   help="grpo: cap (a cut answer has no answer, -0.5; default) or soft (DAPO's length penalty)")
    p.add_argument("--overlong-buffer", type=int, default=d.overlong_buffer, help="grpo --overlong soft: L_cache")
    p.add_argument("--shuffle-rewards", action="store_true",
                   help="grpo null control: permute the rewards within each step (no task signal)")
    p.add_argument("--dpo-samples", type=int, default=d.dpo_samples)
    p.add_argument("--dpo-beta", type=float, default=d.dpo_beta)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sft/dpo")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower (big models)")
    options.add_dtype_device(p, dtype_default=d.dtype, device_default=d.device)
    p.add_argument("--out", required=True, help="output dir (checkpoint-{step}/, final/, train.json)")
    p.add_argument("--track-dataset", help="track each checkpoint as it is saved (`circuitdiff track` on this test set)")
    p.add_argument("--track-limit", type=int, help="track on the first n test problems")
    p.add_argument("--track-out", help="tracking output dir (default OUT/track)")
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.lab.train import train

    settings = TrainSettings(
        algorithm=args.algorithm, base=args.base, dataset=args.dataset, split=args.split, limit=args.limit,
        prompt=args.prompt, steps=args.steps, save_every=args.save_every, learning_rate=args.lr, seed=args.seed,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, temperature=args.temperature, truncated=args.truncated,
        max_completion_length=args.max_completion_length, questions_per_step=args.questions_per_step,
        num_generations=args.num_generations, dynamic_sampling=not args.no_dynamic_sampling,
        overlong=args.overlong, overlong_buffer=args.overlong_buffer, shuffle_rewards=args.shuffle_rewards,
        dpo_samples=args.dpo_samples, dpo_beta=args.dpo_beta,
        batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
        device=args.device,
    )
    callbacks = []
    if args.track_dataset:
        from circuitdiff.lab.callback import TrackCallback
        from circuitdiff.lab.settings import TrackSettings

        callbacks.append(TrackCallback(TrackSettings(dataset=args.track_dataset, limit=args.track_limit,
                                                     device=args.device, truncated=args.truncated), out=args.track_out))
    final = train(settings, args.out, callbacks=callbacks)
    print(f"wrote {final} (LoRA adapter; checkpoints in {args.out}/checkpoint-*; settings in {args.out}/train.json)")
    return 0
