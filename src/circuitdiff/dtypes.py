"""The model dtypes circuitdiff accepts, by name (torch-free: the CLI and the config read this list).

Attribution scores accumulate in float32 for every dtype except float64, which keeps float64.
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
