"""The pipeline's stages, one module each, each a function of a run directory (`stage(ctx)`).

generate -> grade -> select -> attribute -> validation -> intervention (circuitdiff.pipeline runs
them in this order). A stage reads what earlier stages wrote through circuitdiff.store, never
another stage's code.
"""
