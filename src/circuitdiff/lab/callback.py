"""`TrackCallback`: track each checkpoint while training, the same evaluation as `circuitdiff track`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from circuitdiff.errors import UserError
from circuitdiff.lab.settings import TrackSettings
from circuitdiff.lab.track import track
from circuitdiff.store import layout

def _rng_state():
    import torch

    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    return state


def _set_rng_state(state) -> None:
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency
    _CallbackBase = object


class TrackCallback(_CallbackBase):
    """Track each checkpoint as soon as the trainer saves it (the same evaluation as `circuitdiff track`).

    Writes into `out` (default: the trainer's output_dir/track), rebuilding track.csv/png. The
    random states (python, numpy, torch, cuda) are restored after each evaluation, so tracking
    does not change the training run. Only the main process evaluates. A UserError in the
    evaluation is logged and training goes on (`circuitdiff track` can redo that checkpoint).
    """

    def __init__(self, settings: TrackSettings | None = None, out: str | Path | None = None, log=print, **kwargs):
        self.settings = settings or TrackSettings(**kwargs)
        self.out = out
        self.log = log

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        train_dir = Path(args.output_dir)
        out = Path(self.out) if self.out is not None else layout.default_track_dir(train_dir)
        rng = _rng_state()
        try:
            track([train_dir], self.settings, out, steps=[state.global_step], log=self.log)
        except UserError as err:
            self.log(f"track: checkpoint-{state.global_step} not tracked: {err}")
        finally:
            _set_rng_state(rng)
