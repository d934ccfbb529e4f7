"""The crosscoder: one sparse code for the residual streams of m models on the same tokens.

    pre [B, F]      = sum_i x_i [B, d] @ W_enc[i] [d, F] + b_enc          (per-model encoders, summed)
    f   [B, F]      = BatchTopK(ReLU(pre))                                 (training), or ReLU(pre) * (score > theta)
    x_hat_i [B, d]  = f @ W_dec[:, i] [F, d] + b_dec[i]                     (per-model decoders)

x_i are the models' residuals times one scalar per model (`input_scale`, settings.NORMALISATION).
BatchTopK keeps the k*B largest scores ReLU(pre_j) * sum_i ||W_dec[j, i]|| of a batch of B tokens;
k is annealed from 4k to k; dead latents get the AuxK loss (settings.ANNEALING, AUX_LOSS). Training
resumes from its checkpoint (weights, optimizer, step, dead counters), written atomically every
`checkpoint_every` steps and at the end of every pass. Everything accumulates in float32
(evaluation sums in float64).
"""

from __future__ import annotations

import io as _bytes
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from circuitdiff import io

NORM_TOKENS = 50_000  # tokens that set the input scale and the initial decoder bias
THETA_DECAY = 0.99


class Crosscoder(torch.nn.Module):
    """Parameters: W_enc [m, d, F], b_enc [F], W_dec [F, m, d], b_dec [m, d]; buffers input_scale [m], theta []."""

    def __init__(self, n_models: int, d_model: int, n_latents: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m, d, F = n_models, d_model, n_latents
        directions = torch.randn(F, m, d, generator=g)  # independent per model: a null pair is not symmetric by construction
        W_dec = 0.1 * directions / directions.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.permute(1, 2, 0).clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(F))
        self.b_dec = torch.nn.Parameter(torch.zeros(m, d))
        self.register_buffer("input_scale", torch.ones(m))
        self.register_buffer("theta", torch.tensor(float("nan")))
        self.n_models, self.d_model, self.n_latents = m, d, F

    def decoder_norms(self) -> torch.Tensor:
        """[F, m]: ||W_dec[j, i]||."""
        return self.W_dec.norm(dim=-1)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, m, d] (normalised) -> ReLU(pre) [B, F]."""
        B = x.shape[0]
        return torch.relu(x.reshape(B, -1) @ self.W_enc.reshape(-1, self.n_latents) + self.b_enc)

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        return acts * self.decoder_norms().sum(-1)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """f [B, F]: BatchTopK with k per token when k is given (training), else the inference threshold theta."""
        acts = self.pre(x)
        if k is not None:
            return batch_topk(acts, self.scores(acts), k)
        if not torch.isfinite(self.theta):
            raise RuntimeError("the crosscoder has no inference threshold yet (train it first)")
        return acts * (self.scores(acts) > self.theta)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, F] -> x_hat [B, m, d]."""
        return (f @ self.W_dec.reshape(self.n_latents, -1)).reshape(-1, self.n_models, self.d_model) + self.b_dec

    def code_of(self, h: torch.Tensor, partner_h: list[torch.Tensor], target: int) -> torch.Tensor:
        """f [batch * pos, F] (inference threshold) of one model's residual h [batch, pos, d] (crosscoder model
        `target`) and the other models' residuals on the same tokens (the crosscoder's order without `target`)."""
        residuals = list(partner_h)
        residuals.insert(target, h)
        return self.encode(self.normalise([r.reshape(-1, self.d_model) for r in residuals]))

    def normalise(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Per-model raw residuals [B, d] (any dtype) -> x [B, m, d] in the crosscoder's dtype (float32), times input_scale."""
        x = torch.stack([r.to(self.W_dec.device, self.W_dec.dtype) for r in raw], dim=1)
        return x * self.input_scale[None, :, None]


def batch_topk(acts: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """acts [B, F] with only the k*B largest `scores` of the whole batch kept (the rest set to 0)."""
    flat = scores.reshape(-1)
    n = min(int(k) * acts.shape[0], flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, n, sorted=False).indices] = True
    return acts * keep.view_as(acts)


def k_at(step: int, total: int, k: int, n_latents: int) -> int:
    """The annealed k: from min(4k, n_latents / 2) down to k over the first 20% of the steps."""
    start = max(k, min(4 * k, n_latents // 2))
    ramp = max(1, int(0.2 * total))
    return k if step >= ramp else int(round(start + (k - start) * step / ramp))


def lr_at(step: int, total: int, lr: float) -> float:
    warm, decay = max(1, int(0.05 * total)), max(1, int(0.2 * total))
    if step < warm:
        return lr * (step + 1) / warm
    if step >= total - decay:
        return lr * max(0.0, (total - step) / decay)
    return lr


@dataclass
class Pass:
    """One pass over a block of training tokens: `load()` -> per crosscoder model [rows, d] (float16, may repeat)."""

    rows: int
    seed: int
    load: Callable[[], list[torch.Tensor]]
    done: Callable[[], None] | None = None  # after the pass is checkpointed (stream: delete its shards)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float  # mean of the last 50 steps' reconstruction loss
    curve: list = field(default_factory=list)  # [step, k, loss, aux, dead share]
    left_out: dict = field(default_factory=dict)  # first step of a pass -> its planned rows not trained on
    seconds: float = 0.0
    resumed_at: int = 0


def aux_loss(cc: Crosscoder, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK: the dead latents' top-k_aux pre-activations reconstruct the (detached) error; ||e - e_hat||^2 / ||e||^2."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    B = x.shape[0]
    err = (x - x_hat).detach().reshape(B, -1)
    k_aux = min(cc.d_model // 2, n_dead)
    dead_pre = torch.relu(x.reshape(B, -1) @ cc.W_enc.reshape(-1, cc.n_latents)[:, dead] + cc.b_enc[dead])
    top = torch.topk(dead_pre, k_aux, dim=-1)
    f_aux = torch.zeros_like(dead_pre).scatter(-1, top.indices, top.values)
    e_hat = f_aux @ cc.W_dec[dead].reshape(n_dead, -1)
    return ((err - e_hat) ** 2).sum() / (err**2).sum().clamp_min(1e-12)


def training_forward(cc: Crosscoder, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat [B, m, d] with gradient, latents that fired [n], their kept scores [n]) of one BatchTopK step.

    Dense: on a CPU the gathered (sparse) form of the k*B kept pairs measured 3.7x slower than the dense
    matmuls (d_model 576, 4608 latents, B 1024, k 32), its backward being a scatter."""
    acts = cc.pre(x)
    with torch.no_grad():
        scores = cc.scores(acts)
    f = batch_topk(acts, scores, k)
    with torch.no_grad():
        on = f > 0
    return cc.decode(f), on.any(0).nonzero()[:, 0], scores[on]


def init_from(cc: Crosscoder, first: list[torch.Tensor]) -> None:
    """Input scales (settings.NORMALISATION) and the decoder bias (the mean input) from the first training tokens."""
    with torch.no_grad():
        scales = []
        for raw in first:
            x = raw[:NORM_TOKENS].to(torch.float64)
            scales.append(math.sqrt(cc.d_model / float((x**2).sum(-1).mean().clamp_min(1e-30))))
        cc.input_scale.copy_(torch.tensor(scales))
        x = cc.normalise([raw[:NORM_TOKENS] for raw in first])
        cc.b_dec.copy_(x.mean(0))


def save_checkpoint(path: Path, cc: Crosscoder, opt, step: int, since_fired: torch.Tensor, key: str, done: bool,
                    result: TrainResult, extra: dict | None = None) -> None:
    buffer = _bytes.BytesIO()
    torch.save({"state": cc.state_dict(), "optim": opt.state_dict() if opt is not None else None, "step": step,
                "since_fired": since_fired.cpu(), "key": key, "done": done, "shape": [cc.n_models, cc.d_model, cc.n_latents],
                "result": result.__dict__, "extra": extra or {}}, buffer)
    io.write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint's contents, or None when it is missing or unreadable (a damaged one is trained again)."""
    if not Path(path).exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - any damage: start over
        return None


def crosscoder_from(ckpt: dict, device: str = "cpu") -> Crosscoder:
    m, d, F = ckpt["shape"]
    cc = Crosscoder(m, d, F)
    cc.load_state_dict(ckpt["state"])
    return cc.to(device).eval()


class Trainer:
    """Trains one crosscoder pass by pass; resumes from `checkpoint` when it holds the same key.

    total_steps fixes the schedules (k, learning rate); run(pass, first_step) trains the steps of a pass
    that are not done yet (global steps first_step .. first_step + rows // batch_size - 1).
    """

    def __init__(self, cc: Crosscoder, total_steps: int, *, k: int, lr: float, batch_size: int, aux_coef: float,
                 dead_tokens: int, checkpoint: Path, key: str, checkpoint_every: int = 200, device: str = "cpu",
                 log: Callable[[str], None] = print, progress: bool = False):
        if total_steps < 1:
            raise ValueError("no full training batch")
        self.cc, self.total, self.k, self.lr, self.batch_size = cc.to(device).train(), total_steps, k, lr, batch_size
        self.aux_coef, self.dead_tokens, self.checkpoint, self.key = aux_coef, dead_tokens, Path(checkpoint), key
        self.checkpoint_every, self.log, self.progress = checkpoint_every, log, progress
        if str(device).startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products, float32 accumulation
        self.opt = torch.optim.Adam(cc.parameters(), lr=lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(cc.n_latents, dtype=torch.long, device=device)
        self.result, self.step, self.losses = TrainResult(0, 0, float("nan")), 0, []
        saved = load_checkpoint(self.checkpoint)
        if saved is not None and saved.get("key") == key:
            cc.load_state_dict(saved["state"])
            if saved.get("optim") is not None:
                self.opt.load_state_dict(saved["optim"])
            self.since_fired = saved["since_fired"].to(device)
            self.step = int(saved["step"])
            self.result = TrainResult(**saved["result"])
            self.result.resumed_at = self.step
            if self.step:
                log(f"crosscoder {self.checkpoint.stem}: " + ("trained, up to date" if self.done else
                                                              f"resuming at step {self.step} of {total_steps}"))
        elif saved is not None:
            log(f"crosscoder {self.checkpoint.stem}: made with other settings or inputs; training anew")

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def steps_of(self, pass_: Pass) -> int:
        return pass_.rows // self.batch_size

    def run(self, pass_: Pass, first_step: int, data: list[torch.Tensor] | None = None,
            rows: torch.Tensor | None = None) -> None:
        """Train the steps of `pass_` not done yet; data: its tensors when already loaded; rows: the row numbers to
        train on (default all; when fewer than the pass plans, the shuffled rows are used cyclically)."""
        from tqdm.auto import tqdm

        cc, n_steps = self.cc, self.steps_of(pass_)
        if self.step >= first_step + n_steps:
            return
        t0 = time.perf_counter()
        data = data if data is not None else pass_.load()
        rows = rows if rows is not None else torch.arange(int(data[0].shape[0]))
        self.result.left_out[str(first_step)] = int(pass_.rows - len(rows))
        if self.step == 0:
            init_from(cc, [t[rows[:NORM_TOKENS]] for t in data])
        perm = rows[torch.from_numpy(np.random.default_rng(pass_.seed).permutation(len(rows)))]
        batch = torch.arange(self.batch_size)
        bar = tqdm(total=n_steps, initial=self.step - first_step, desc=f"crosscoder {self.checkpoint.stem}",
                   unit="step", disable=not self.progress)
        for offset in range(self.step - first_step, n_steps):
            idx = perm[(offset * self.batch_size + batch) % len(perm)]
            x = cc.normalise([t[idx] for t in data])
            k_now = k_at(self.step, self.total, self.k, cc.n_latents)
            x_hat, fired, kept = training_forward(cc, x, k_now)
            loss = ((x - x_hat) ** 2).sum((1, 2)).mean()
            dead = self.since_fired >= self.dead_tokens
            aux = aux_loss(cc, x, x_hat, dead) if self.aux_coef > 0 else x.new_zeros(())
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, self.total, self.lr)
            self.opt.zero_grad(set_to_none=True)
            (loss + self.aux_coef * aux).backward()
            self.opt.step()
            with torch.no_grad():
                self.since_fired += x.shape[0]
                self.since_fired[fired] = 0
                if kept.numel():
                    smallest = float(kept.min())
                    theta = float(cc.theta)
                    cc.theta.fill_(smallest if not math.isfinite(theta) else
                                   THETA_DECAY * theta + (1 - THETA_DECAY) * smallest)
            self.losses.append(float(loss.detach()))
            self.step += 1
            self.result.tokens_seen += x.shape[0]
            if self.step % 50 == 0 or self.step == self.total:
                self.result.curve.append([self.step, k_now, float(np.mean(self.losses[-50:])), float(aux.detach()),
                                          float(dead.float().mean())])
            if self.step % self.checkpoint_every == 0:
                self.save(t0)
                t0 = time.perf_counter()
            bar.update(1)
        bar.close()
        self.save(t0)

    def save(self, t0: float) -> None:
        r = self.result
        r.steps = self.step
        r.final_loss = float(np.mean(self.losses[-50:])) if self.losses else r.final_loss
        r.seconds = round(r.seconds + time.perf_counter() - t0, 3)
        save_checkpoint(self.checkpoint, self.cc, None if self.done else self.opt, self.step, self.since_fired,
                        self.key, self.done, r)


def train(cc: Crosscoder, passes: list[Pass], *, batch_size: int, **kwargs) -> TrainResult:
    """Train `cc` over `passes` in order (Trainer's keyword arguments); resumes from the checkpoint."""
    trainer = Trainer(cc, sum(p.rows // batch_size for p in passes), batch_size=batch_size, **kwargs)
    first = 0
    for pass_ in passes:
        trainer.run(pass_, first)
        first += trainer.steps_of(pass_)
        if pass_.done is not None:
            pass_.done()
    trainer.cc.eval()
    return trainer.result


@dataclass
class EvalSums:
    """Sums over held-out tokens (float64 numpy) that FVU, frequencies, shares and latent scaling are made of.

    n tokens; sq_err [m]; sum_x [m, d]; sum_sq_x [m]; fired [F] (count f > 0); sum_f [F]; sum_f2 [F];
    along [m, F] = sum f_j <W_dec[j, i] / ||W_dec[j, i]||, x_i - b_dec[i]>; err_u [m, F] = sum f_j <u_j, e_i>;
    rec_u [m, F] = sum f_j <u_j, x_hat_i - b_dec[i]>; u_j = W_dec[j, t(j)], t(j) = argmax_i ||W_dec[j, i]||.
    """

    n: int
    sq_err: np.ndarray
    sum_x: np.ndarray
    sum_sq_x: np.ndarray
    fired: np.ndarray
    sum_f: np.ndarray
    sum_f2: np.ndarray
    along: np.ndarray
    err_u: np.ndarray
    rec_u: np.ndarray

    def fvu(self) -> np.ndarray:
        """[m] fraction of variance unexplained (settings.FVU)."""
        total = self.sum_sq_x - (self.sum_x**2).sum(-1) / self.n
        return self.sq_err / total


@torch.no_grad()
def evaluate(cc: Crosscoder, data: list[torch.Tensor], batch_size: int = 4096) -> EvalSums:
    """EvalSums of `cc` (inference threshold) on held-out raw residuals, one [n, d] tensor per model."""
    cc.eval()
    device = cc.W_dec.device
    m, F = cc.n_models, cc.n_latents
    norms = cc.decoder_norms()
    owner = norms.argmax(-1)
    U = cc.W_dec[torch.arange(F, device=device), owner]  # [F, d]
    unit = cc.W_dec / norms[..., None].clamp_min(1e-12)  # [F, m, d]
    acc = {name: torch.zeros(shape, dtype=torch.float64, device=device) for name, shape in {
        "sq_err": (m,), "sum_x": (m, cc.d_model), "sum_sq_x": (m,), "fired": (F,), "sum_f": (F,), "sum_f2": (F,),
        "along": (m, F), "err_u": (m, F), "rec_u": (m, F)}.items()}  # fmt: skip
    n = int(data[0].shape[0])
    for start in range(0, n, batch_size):
        x = cc.normalise([t[start : start + batch_size] for t in data])
        f = cc.encode(x)
        x_hat = cc.decode(f)
        centred = x - cc.b_dec
        err = x - x_hat
        f64 = f.double()
        acc["sq_err"] += (err.double() ** 2).sum((0, 2))
        acc["sum_x"] += x.double().sum(0)
        acc["sum_sq_x"] += (x.double() ** 2).sum((0, 2))
        acc["fired"] += (f > 0).sum(0).double()
        acc["sum_f"] += f64.sum(0)
        acc["sum_f2"] += (f64**2).sum(0)
        for i in range(m):
            acc["along"][i] += (f64 * (centred[:, i].double() @ unit[:, i].double().T)).sum(0)
            acc["err_u"][i] += (f64 * (err[:, i].double() @ U.double().T)).sum(0)
            acc["rec_u"][i] += (f64 * ((x_hat[:, i] - cc.b_dec[i]).double() @ U.double().T)).sum(0)
    return EvalSums(n=n, **{name: value.cpu().numpy() for name, value in acc.items()})
