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

METHODS = {
    "eap": "W[d,u] = -<dL/dx_d, O_u>: the first-order change of L when edge u->d is removed (one forward + backward)",
    "eap-ig": "W[d,u] = -<integral over t in [0, 1] of dL/dx_d on the input scaled by t, O_u of the clean input>: "
              "integrated gradients from the all-zero input (every edge zero-ablated) to the clean one, K quadrature "
              "points (one forward + backward each) plus one clean forward",
}
DEFAULT_IG_STEPS = 8  # EAP-IG's default K: the cost cap (~8 EAP passes) at which docs/validation.md measured it
DEFAULT_IG_RULE = "midpoint"  # its points stay off t ~ 0, where the first norm's input is ~0 (docs/validation.md)
IG_RULES = {
    "gauss": "Gauss-Legendre nodes and weights on [0, 1]",
    "midpoint": "t = (k + 1/2) / K, weights 1/K (Riemann midpoint)",
    "right": "t = k / K for k = 1..K, weights 1/K (K = 1: t = 1, exactly EAP)",
}


def method_label(method: str, ig_steps: int = DEFAULT_IG_STEPS, ig_rule: str = DEFAULT_IG_RULE) -> str:
    """"eap", or "eap-ig8" / "eap-ig8-gauss" (a rule other than the default is named): how a W file was
    scored, in file names and tables."""
    if method == "eap":
        return "eap"
    return f"eap-ig{ig_steps}" + ("" if ig_rule == DEFAULT_IG_RULE else f"-{ig_rule}")


def method_definition(method: str, ig_steps: int = DEFAULT_IG_STEPS, ig_rule: str = DEFAULT_IG_RULE) -> str:
    """What a method label means, in words (recorded with every W file)."""
    return METHODS[method] + (f"; {IG_RULES[ig_rule]}, K = {ig_steps}" if method != "eap" else "")


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
