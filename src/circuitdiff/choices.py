"""The named choices of circuitdiff's options, torch-free: the CLI, the config and the engine read them here.

- dtypes: the model dtypes (attribution scores accumulate in float32 for every dtype except
  float64, which keeps float64);
- objectives: what EAP differentiates (engine/objectives.py computes them);
- texts: which tokens each model is scored on;
- scales and histogram ranges: how the report's metrics treat the size of W (metrics.py).
"""

from __future__ import annotations

from circuitdiff.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")

OBJECTIVES = {
    "nll": "mean NLL of the answer tokens answer_ids[:cut_len] given the prompt",
    "logit": "minus the mean over the answer tokens answer_ids[:cut_len] of the centred logit (answer token's logit "
             "minus the mean logit over the vocabulary; raw LM head output, no soft-capping)",
}

TEXTS = {
    "own": "each model on its own greedy answers (the paper's)",
    "base": "both models on the base model's answers, and each on its own",
    "tuned": "both models on the tuned model's answers, and each on its own",
    "both": "every model on every model's answers (the 2x2 of model x text)",
}

SCALES = {
    "raw": "W as computed (the paper's)",
    "unit": "each sample's W divided by its own mean |W| over the chosen entries (scale-free; intensity is 1)",
}

RANGES = {
    "shared": "[0, max |W| of base and tuned], one set of bins for both models",
    "own": "each model's own [0, max |W|]",
}


def check_choice(kind: str, value: str, choices) -> str:
    """`value` if it is one of `choices`, else one UserError line naming the option and the valid values."""
    if value not in choices:
        raise UserError(f"{kind} {value!r} is unknown; use one of {', '.join(choices)}")
    return value
