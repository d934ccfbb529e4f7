"""The engine: every hook circuitdiff puts into a model.

- `batch`: samples -> a right-padded `Batch` and where the objective is read;
- `objectives`: the objective L (per batch row) whose gradient EAP reads;
- `nodes`: graph node name -> module and hook kind, granularity checks (`ModelNodes`);
- `attributor`: EAP scores W from one forward and one backward (`EdgeAttributor`);
- `editor`: edge edits, x_d - sum c * O_u (`EdgeEditor`);
- `ablation`: exact loss changes of edits, and greedy answers under edits.

Stages (circuitdiff.stages) and the commands use the engine; the engine knows nothing of run
directories.
"""

from circuitdiff.engine.ablation import exact_edge_effects, generate_with_edits, losses_with_edits
from circuitdiff.engine.attributor import EdgeAttributor
from circuitdiff.engine.batch import Batch, input_device, make_batch, pad_id_of
from circuitdiff.engine.editor import EdgeEditor
from circuitdiff.engine.nodes import ModelNodes
from circuitdiff.engine.objectives import OBJECTIVES, answer_loss, check_objective, score_dtype_for

__all__ = [
    "OBJECTIVES", "Batch", "check_objective", "EdgeAttributor", "EdgeEditor", "ModelNodes", "answer_loss", "exact_edge_effects",
    "generate_with_edits", "input_device", "losses_with_edits", "make_batch", "pad_id_of", "score_dtype_for",
]  # fmt: skip
