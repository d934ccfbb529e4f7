"""Classes of latents: which model a latent belongs to, from its decoder norms, checked by latent scaling.

For latent j and model i (settings.NRN, ATTRIBUTION_SHARE, LATENT_SCALING, Thresholds):
- norm_i = ||W_dec[j, i]|| (normalised units), NRN_i = norm_i / sum_m norm_m, rho_i = norm_i / max_m norm_m;
- share_i: the share of the latent's pull along its decoder direction that model i's activations carry;
- beta_eps_i, beta_rec_i: closed-form least squares of model i's error without the latent, and of its other
  latents' reconstruction, on f_j * u_j (u_j the decoder vector of the latent's largest-norm model t);
  nu = beta(other) / beta_eps(t).
A latent that the norms call X-only stays X-only only when no other model explains it (every nu below
the threshold); otherwise it is "X-only-norm". The null control (base against a null model) goes through
the same function; its model-only count is the number of spurious model-only latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuitdiff.features.crosscoder import EvalSums
from circuitdiff.features.settings import Thresholds

SHARED, DEAD, INTERMEDIATE = "shared", "dead", "intermediate"


def only(label: str) -> str:
    return f"{label}-only"


def scaling_beta(f: np.ndarray, y: np.ndarray, u: np.ndarray) -> float:
    """The closed form: argmin_beta sum_x ||y(x) - beta f(x) u||^2 = sum f <u, y> / (||u||^2 sum f^2). f [n], y [n, d], u [d]."""
    f, y, u = (np.asarray(a, dtype=np.float64) for a in (f, y, u))
    den = float(u @ u) * float(f @ f)
    return float(f @ (y @ u)) / den if den > 0 else float("nan")


@dataclass
class LatentTable:
    """One entry per latent (arrays [F] or [m, F]) and the labels of the models (the crosscoder's order)."""

    labels: list[str]
    norms: np.ndarray  # [m, F]
    nrn: np.ndarray  # [m, F]
    share: np.ndarray  # [m, F]
    frequency: np.ndarray  # [F] share of held-out tokens where f > 0
    mean_activation: np.ndarray  # [F] mean f over held-out tokens (zeros included)
    beta_eps: np.ndarray  # [m, F]
    beta_rec: np.ndarray  # [m, F]
    owner: np.ndarray  # [F] index of the largest decoder norm
    norm_class: list[str]
    klass: list[str]
    n_tokens: int

    @property
    def n_latents(self) -> int:
        return int(self.norms.shape[1])

    def nu(self) -> tuple[np.ndarray, np.ndarray]:
        """([F], [F]): the largest nu_eps and nu_rec over the models other than the owner."""
        F = self.n_latents
        own = self.beta_eps[self.owner, np.arange(F)]
        with np.errstate(divide="ignore", invalid="ignore"):
            eps, rec = self.beta_eps / own, self.beta_rec / own
        others = np.ones_like(eps, dtype=bool)
        others[self.owner, np.arange(F)] = False
        if len(self.labels) < 2:
            return np.full(F, np.nan), np.full(F, np.nan)
        pick = lambda a: np.where(others, a, -np.inf).max(0)  # noqa: E731
        return pick(eps), pick(rec)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.klass:
            out[c] = out.get(c, 0) + 1
        return dict(sorted(out.items()))

    def model_only(self) -> dict[str, int]:
        """X-only counts (after latent scaling) for every model X, zeros included."""
        counts = self.counts()
        return {only(label): counts.get(only(label), 0) for label in self.labels}

    def relative_norm(self, label: str) -> np.ndarray:
        return self.nrn[self.labels.index(label)]


def norm_class(rho: np.ndarray, labels: list[str], th: Thresholds) -> str:
    """The class of one alive latent from its rho [m] alone."""
    uses = rho >= th.uses
    lacks = rho < th.lacks
    if uses.all():
        return SHARED
    if (uses | lacks).all():
        members = [label for label, u in zip(labels, uses) if u]
        return only(members[0]) if len(members) == 1 else "+".join(members)
    return INTERMEDIATE


def classify(sums: EvalSums, W_dec: np.ndarray, labels: list[str], th: Thresholds = Thresholds()) -> LatentTable:
    """The LatentTable of a crosscoder (W_dec [F, m, d], normalised units) from its held-out EvalSums."""
    W = np.asarray(W_dec, dtype=np.float64)
    F, m, _ = W.shape
    if m != len(labels):
        raise ValueError(f"{m} decoders but {len(labels)} labels")
    norms = np.linalg.norm(W, axis=-1).T  # [m, F]
    total = norms.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        nrn = norms / total
        rho = norms / norms.max(0)
        pull = np.clip(sums.along, 0.0, None)
        share = pull / pull.sum(0)
    owner = norms.argmax(0)
    U = W[np.arange(F), owner]  # [F, d]
    G = np.einsum("fmd,fd->mf", W, U)  # <u_j, W_dec[j, i]>
    S = sums.sum_f2
    den = (U**2).sum(-1) * S
    with np.errstate(divide="ignore", invalid="ignore"):
        beta_eps = np.where(den > 0, (sums.err_u + G * S) / den, np.nan)
        beta_rec = np.where(den > 0, (sums.rec_u - G * S) / den, np.nan)
    frequency = sums.fired / max(sums.n, 1)
    table = LatentTable(labels, norms, nrn, share, frequency, sums.sum_f / max(sums.n, 1), beta_eps, beta_rec, owner,
                        [], [], sums.n)
    nu_eps, nu_rec = table.nu()
    for j in range(F):
        if sums.fired[j] == 0:
            table.norm_class.append(DEAD)
            table.klass.append(DEAD)
            continue
        c = norm_class(rho[:, j], labels, th)
        table.norm_class.append(c)
        if c.endswith("-only") and m > 1:
            kept = (beta_eps[owner[j], j] >= th.min_beta and nu_eps[j] < th.nu and nu_rec[j] < th.nu)
            c = c if kept else f"{c}-norm"
        table.klass.append(c)
    return table


def null_comparison(main: LatentTable, null: LatentTable) -> dict:
    """Each model-only count of the main crosscoder beside the null's spurious model-only count."""
    spurious = sum(null.model_only().values())
    return {
        "null_labels": null.labels,
        "null_model_only": null.model_only(),
        "spurious_model_only": spurious,
        "null_norm_model_only": sum(1 for c in null.norm_class if c.endswith("-only")),
        "main_model_only": main.model_only(),
        "excess_over_null": {c: n - spurious for c, n in main.model_only().items()},
        "reading": ("a model-only count no larger than the null's spurious count is what a crosscoder finds between a "
                    "model and itself; only the excess can be a difference between the models"),
    }


def rows(table: LatentTable, target: str | None = None) -> list[dict]:
    """latents.csv rows: one per latent; relative_norm = NRN of `target` (default: the last model)."""
    target = target or table.labels[-1]
    nu_eps, nu_rec = table.nu()
    rel = table.relative_norm(target)
    out = []
    for j in range(table.n_latents):
        row = {"latent": j, "class": table.klass[j], "norm_class": table.norm_class[j]}
        row.update({f"norm_{label}": float(table.norms[i, j]) for i, label in enumerate(table.labels)})
        row["relative_norm"] = float(rel[j])
        row.update({f"nrn_{label}": float(table.nrn[i, j]) for i, label in enumerate(table.labels)})
        row.update({f"share_{label}": float(table.share[i, j]) for i, label in enumerate(table.labels)})
        row.update({"frequency": float(table.frequency[j]), "mean_activation": float(table.mean_activation[j]),
                    "owner": table.labels[int(table.owner[j])], "nu_eps": float(nu_eps[j]), "nu_rec": float(nu_rec[j])})
        row.update({f"beta_eps_{label}": float(table.beta_eps[i, j]) for i, label in enumerate(table.labels)})
        row.update({f"beta_rec_{label}": float(table.beta_rec[i, j]) for i, label in enumerate(table.labels)})
        out.append(row)
    return out
