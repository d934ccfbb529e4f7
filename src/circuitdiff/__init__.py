"""circuitdiff: what did post-training change inside this model?

Python API (the CLI wraps the same functions):

    from circuitdiff import attribute, load_model
    W = attribute("smollm2-135m-instruct", "samples.jsonl", granularity="block")
    W.scores  # float32 [n_samples, n_dst, n_src]; W.src_names, W.dst_names, W.edge_mask
"""

from circuitdiff.attribute import Attribution, attribute
from circuitdiff.graph import Graph
from circuitdiff.models import load_model

__all__ = ["Attribution", "Graph", "attribute", "load_model"]
__version__ = "0.1.0"
