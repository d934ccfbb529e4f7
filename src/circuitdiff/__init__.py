"""circuitdiff: what did post-training change inside this model?

Python API (the CLI wraps the same functions):

    from circuitdiff import attribute, load_model
    W = attribute("smollm2-135m-instruct", "samples.jsonl", granularity="block")
    W.scores  # float32 [n_samples, n_dst, n_src]; W.src_names, W.dst_names, W.edge_mask

Importing the package imports neither torch nor transformers; `attribute`, `load_model` and
`run` load them when first used.
"""

from circuitdiff.graph import Graph
from circuitdiff.store.artifacts import Attribution

__all__ = ["Attribution", "Graph", "attribute", "load_model", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "attribute":
        from circuitdiff.attribute import attribute

        return attribute
    if name == "load_model":
        from circuitdiff.models import load_model

        return load_model
    if name == "run":
        from circuitdiff.pipeline import run

        return run
    raise AttributeError(f"module 'circuitdiff' has no attribute {name!r}")
