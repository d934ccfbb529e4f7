"""Every setting and convention of `circuitdiff features`, torch-free (the CLI's --help reads the defaults).

Settings split into what changes a result (keyed: the token plan, the activations, the crosscoder,
the classes, ...) and what does not (batch sizes for the models, device, progress). Each output
names the conventions below beside its numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from circuitdiff.errors import UserError

# ---------------------------------------------------------------- conventions, in words
RESIDUAL = "the residual stream after decoder layer L (the output of layers[L], the input of layer L+1), 0-based"
POSITIONS = ("every position of a sequence except its first (position 0 is an attention sink in most models, with "
             "norms far above the rest); for a run's second answer to the same prompt only the answer positions "
             "(the prompt is stored once)")
OUTLIERS = ("a position is left out of training and of every held-out number when, in any model, its residual norm "
            "exceeds 10 times the median norm of its block of shards (massive activations: in SmolLM2-135M at layer 15 "
            "two such positions of 16,384 held 60% of the shard's squared norm); summary.json counts them")
NORMALISATION = ("per model one scalar s_i = sqrt(d_model / mean ||x_i||^2) over the first <= 50,000 training tokens, "
                 "so that every model's input has mean squared norm d_model; no mean is removed (the decoder bias "
                 "holds it); decoder norms, FVU and latent scaling are in these normalised units")
ENCODER = ("f = BatchTopK(ReLU(sum_i W_enc[i] x_i + b_enc)): over a batch of B tokens keep the k*B largest values of "
           "ReLU(pre) * sum_i ||W_dec[j, i]|| (the activation times the latent's total decoder norm), zero the rest; "
           "at inference one threshold theta replaces the batch (f_j kept when its score > theta; theta = running "
           "mean of the smallest kept score in training)")
ANNEALING = "k decreases linearly from 4k (at most n_latents / 2) to k over the first 20% of steps, then stays k"
AUX_LOSS = ("AuxK (Gao et al. 2024): a latent is dead when it has not fired for `dead_tokens` training tokens; the "
            "dead latents' top-k_aux pre-activations (k_aux = min(d_model / 2, dead)) reconstruct the error of every "
            "model; loss += aux_coef * ||e - e_hat||^2 / ||e||^2")
LOSS = "sum over models of ||x_i - x_hat_i||^2 (normalised units), mean over tokens; Adam, warm-up 5%, linear decay over the last 20%"
FVU = "per model: sum ||x_i - x_hat_i||^2 / sum ||x_i - mean(x_i)||^2 over the held-out tokens"
DEAD = "a latent that fires on none of the held-out tokens"
NRN = "NRN_i(j) = ||W_dec[j, i]|| / sum_m ||W_dec[j, m]||; with two models the relative norm r(j) = NRN_tuned(j)"
ATTRIBUTION_SHARE = ("share_i(j) = max(0, c_i) / sum_m max(0, c_m), c_i = mean over held-out tokens of f_j(x) * "
                     "<W_dec[j, i], x_i - b_dec[i]> / ||W_dec[j, i]||: how much of model i's actual activation lies along "
                     "the latent's decoder direction when it fires")
LATENT_SCALING = ("for a latent whose largest decoder norm is model t's, u = W_dec[j, t]; for each model i, beta = "
                  "sum_x f_j(x) <u, y_i(x)> / (||u||^2 sum_x f_j(x)^2), the least-squares fit of y_i by beta * f_j u over "
                  "the held-out tokens, with y_i = the error without the latent (x_i - x_hat_i + f_j W_dec[j, i], "
                  "beta_eps) or the other latents' reconstruction (x_hat_i - b_dec[i] - f_j W_dec[j, i], beta_rec); "
                  "nu_eps = beta_eps(other) / beta_eps(t), nu_rec = beta_rec(other) / beta_eps(t)")
INTERVENTION = ("at layer L of the target model: h <- h + sum_{j in S} (c - 1) * f_j * W_dec[j, source] / s_target, "
                "f the crosscoder's code of every model's residual on the same tokens (the other models run in "
                "lockstep on the target's tokens), so the crosscoder's error term stays; c = 0 ablates, c = 2, 4 "
                "amplify; S empty or c = 1 changes nothing")
FEATURE_ATTRIBUTION = ("A_j = - sum over positions of f_j * dL/df_j (activation x gradient through the target's decoder, "
                       "the first-order loss change when f_j is set to 0; > 0: the latent helps), L = mean NLL of the "
                       "tuned model's own correct answer, mean over questions")
RANDOM_CONTROL = ("per draw, each targeted latent is replaced by a random alive, non-targeted latent among the "
                  "`match_pool` closest in log mean write size (mean over held-out tokens of f_j * "
                  "||W_dec[j, source]||), without replacement: matched in size and activation magnitude")


@dataclass(frozen=True)
class Thresholds:
    """Classes from the decoder norms (rho_i = ||W_dec[j, i]|| / max_m ||W_dec[j, m]||) and latent scaling."""

    lacks: float = 1.0 / 9.0  # rho_i below: model i lacks the latent (two models: r > 0.9 or r < 0.1)
    uses: float = 3.0 / 7.0  # every rho_i at least: shared (two models: 0.3 <= r <= 0.7)
    nu: float = 0.3  # a model-only latent stays so only when every other model's nu_eps and nu_rec are below this
    min_beta: float = 0.1  # ... and its own beta_eps is at least this (else the latent explains too little to judge)

    def describe(self, labels: list[str]) -> str:
        two = len(labels) == 2
        r = (f" (two models: {labels[0]}-only r < 0.1, {labels[1]}-only r > 0.9, shared 0.3 <= r <= 0.7)" if two else "")
        return (f"rho_i = ||W_dec[j, i]|| / max_m ||W_dec[j, m]||; dead: {DEAD}; shared: every rho_i >= {self.uses:.4g}; "
                f"X-only: rho_i < {self.lacks:.4g} for every model but X{r}, and latent scaling: every other model's "
                f"nu_eps and nu_rec < {self.nu:g} and beta_eps(X) >= {self.min_beta:g} (else 'X-only-norm': only the "
                f"norms say so); a subset A+B: those rho >= {self.uses:.4g}, the rest < {self.lacks:.4g}; "
                "intermediate: anything else")


@dataclass
class FeatureSettings:
    """What `circuitdiff features` does; see docs/features.md."""

    layer: int | None = None  # None: n_layers // 2
    tokens: int = 250_000  # kept positions per model (train + held out)
    dict_size: int = 8  # n_latents = dict_size * d_model
    k: int = 32
    ctx_len: int = 256
    text: tuple[str, ...] = ("run", "gsm8k", "math")  # token sources in order; also paths of .jsonl/.txt files
    held_out: float = 0.1  # share of shards held out for FVU, classes and contexts
    shard_tokens: int = 16_384
    epochs: int = 2
    batch_size: int = 1024
    lr: float = 1e-3
    aux_coef: float = 1.0 / 32.0
    dead_tokens: int | None = None  # None: max(10_000, min(10_000_000, training tokens // 10))
    seed: int = 0
    stream: bool = False  # collect -> train -> delete chunk by chunk (every model in memory at once)
    chunk_tokens: int = 2_000_000
    null_model: str | None = None  # None: the base model itself on the same tokens
    thresholds: Thresholds = field(default_factory=Thresholds)
    top_k: int = 20  # compact set: top-K latents per dataset by attribution
    n_questions: int = 40  # intervention questions per dataset (not used for attribution)
    n_random: int = 3
    match_pool: int = 10
    factors: tuple[float, ...] = (2.0, 4.0)  # amplification in the base
    attribution: bool = True
    interventions: bool = True
    max_new_tokens: int | None = None  # None: the run's
    n_boot: int = 10000
    # not part of any key
    model_batch_size: int = 16
    gen_batch_size: int = 16
    checkpoint_every: int = 200

    UNKEYED = ("model_batch_size", "gen_batch_size", "checkpoint_every")

    def check(self) -> "FeatureSettings":
        for name in ("tokens", "dict_size", "k", "ctx_len", "shard_tokens", "epochs", "batch_size", "top_k",
                     "n_questions", "chunk_tokens", "model_batch_size", "gen_batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"features: --{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.ctx_len < 2:
            raise UserError("features: --ctx-len must be at least 2 (position 0 is never stored)")
        if not 0.0 < self.held_out < 0.5:
            raise UserError(f"features: held_out {self.held_out} must lie in (0, 0.5)")
        if self.lr <= 0:
            raise UserError(f"features: --lr {self.lr} must be positive")
        if self.layer is not None and self.layer < 0:
            raise UserError(f"features: --layer {self.layer} must be >= 0 (0-based decoder layer)")
        if self.n_random < 0 or self.match_pool < 1:
            raise UserError("features: --n-random must be >= 0 and match_pool >= 1")
        return self

    def keyed(self, *names: str) -> dict:
        """The settings named (all keyed ones when none), as plain JSON."""
        data = asdict(self)
        data["text"] = list(self.text)
        data["factors"] = list(self.factors)
        return {k: v for k, v in data.items() if (k in names if names else k not in self.UNKEYED)}
