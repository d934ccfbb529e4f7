"""The run-directory store: where everything lives (`layout`), what made it (`keys`), and how to
read and write it with numpy only (`artifacts`)."""

from circuitdiff.store import artifacts, keys, layout
from circuitdiff.store.artifacts import Attribution

__all__ = ["Attribution", "artifacts", "keys", "layout"]
