"""`circuitdiff track`: test accuracy and circuit-metric changes of every training checkpoint."""

from __future__ import annotations

from circuitdiff.cli import options
from circuitdiff.lab.settings import QUESTION_SETS, TRACK_TEXTS, TrackSettings


def register(subparsers) -> None:
    d = options.defaults(TrackSettings)
    p = subparsers.add_parser(
        "track",
        help="test accuracy and circuit-metric changes (checkpoint - start) of every training checkpoint",
        description="For every checkpoint of each TRAIN_DIR (`circuitdiff train` output): greedy test accuracy "
                    "with a 95% CI, and the circuit metrics of the checkpoint minus the starting model with paired "
                    "bootstrap CIs, per objective (nll, logit) and scale (raw, unit), on one fixed question set. "
                    "Writes OUT/track.csv and OUT/track.png; a rerun resumes.",
    )
    p.add_argument("train_dirs", nargs="+", metavar="TRAIN_DIR")
    p.add_argument("--dataset", required=True, help="evaluation problems (arith, gsm8k, ...)")
    p.add_argument("--split", default=d.split, help="held-out split (default test)")
    p.add_argument("--source", help="dataset file (or 'hub') instead of the default source")
    p.add_argument("--limit", type=int, help="the first n problems")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"T_cut = alpha * T_bar (default {d.alpha})")
    p.add_argument("--n-samples", type=int, default=d.n_samples, help=f"N questions drawn (default {d.n_samples})")
    p.add_argument("--question-set", choices=QUESTION_SETS, default=d.question_set,
                   help="fixed (default): one set of questions, T_cut and raw histogram range for every checkpoint, "
                        "chosen from the start and every checkpoint; per-checkpoint: re-select at each checkpoint")
    p.add_argument("--text", choices=TRACK_TEXTS, default=d.text,
                   help="own (default, the paper's): each checkpoint scored on its own answers; start: every checkpoint "
                        "scored on the starting model's answers (the same tokens everywhere; the set needs only the "
                        "start correct)")
    p.add_argument("--rechoose", action="store_true",
                   help="choose the fixed set again from the start and every checkpoint now in OUT")
    p.add_argument("--objective", nargs="+", choices=["nll", "logit"], default=list(d.objectives),
                   help="objectives of W (default: nll logit)")
    p.add_argument("--max-new-tokens", type=int, help="default: the training run's max_completion_length")
    p.add_argument("--entries", choices=["all", "edges"], default=d.entries)
    p.add_argument("--bins", type=int, default=d.bins)
    p.add_argument("--n-boot", type=int, default=d.n_boot)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--truncated", choices=["strict", "lenient"], default=d.truncated,
                   help="an answer cut at the cap without a \\boxed{} answer: never correct (strict, default) or graded "
                        "by its text (lenient)")
    p.add_argument("--keep-unfinished", action="store_true",
                   help="select questions even when an answer was cut at the cap (default: both answers finished)")
    options.add_dtype_device(p, dtype_default=d.dtype, device_default=d.device)
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    p.add_argument("--out", help="output dir (default TRAIN_DIR/track for one run; required for several)")
    p.set_defaults(func=run)


def run(args) -> int:
    from circuitdiff.lab.track import track

    settings = TrackSettings(dataset=args.dataset, split=args.split, source=args.source, limit=args.limit,
                             alpha=args.alpha, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                             entries=args.entries, bins=args.bins, n_boot=args.n_boot, seed=args.seed,
                             dtype=args.dtype, device=args.device, gen_batch_size=args.gen_batch_size,
                             truncated=args.truncated, question_set=args.question_set, text=args.text, objectives=tuple(args.objective),
                             selection={"require_finished": False} if args.keep_unfinished else {}, progress=True)
    track(args.train_dirs, settings, args.out, rechoose=args.rechoose)
    return 0
