"""Generation and attribution spread over many workers (GPUs, nodes) with Ray; results equal one process's.

    plan.py         the one-process batches grouped into shards balanced by length (no torch, no Ray)
    shards.py       run planned shards on a pool: one atomic file per finished shard, skipped on resume
    pool.py         the Ray workers (actors, each loads its model once) and the dynamic queue; Ray is
                    imported only here, only when a pool opens (`pip install "circuitdiff[ray]"`)
    attribution.py  `attribute_sharded`: circuitdiff.attribute's W, shard by shard

The generate stage shards its batches the same way (stages/generate.py). See docs/parallel.md.
"""
