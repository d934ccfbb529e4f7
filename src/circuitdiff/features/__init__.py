"""Feature-level diffing: one crosscoder shared by a base model and its post-trained versions.

`features(run_dir, models, settings)` (circuitdiff.features.run) runs every step over a run directory
and writes RUN/features/layer={L}/ (or `out`); docs/features.md states the method and its conventions.
One module per step, pure functions over a run directory:

- `activations`: the token plan and each model's residual stream at one layer, float16 shards;
- `crosscoder`: the crosscoder (per-model encoders summed, per-model decoders, BatchTopK, AuxK), training
  with resume, held-out evaluation sums;
- `classes`: decoder norms, NRN, attribution share, latent scaling, classes, the null comparison;
- `attribution`: feature attribution on questions only the tuned model solves, the compact set;
- `interventions`: latent edits at the layer (error term kept), matched random sets, effects;
- `outputs`: latents.csv, summary.json, contexts, features.html;
- `lockstep`: several models on the same tokens (read one layer, edit one model from all);
- `steps`, `intervention_step`, `run`: the order of the steps; `settings`: every setting and convention.
"""

from circuitdiff.features.settings import FeatureSettings, Thresholds

__all__ = ["FeatureSettings", "Thresholds", "features"]


def features(*args, **kwargs):
    """circuitdiff.features.run.features (imported on first use: torch and transformers are heavy)."""
    from circuitdiff.features.run import features as run

    return run(*args, **kwargs)
