"""Model loading and per-architecture adapters."""

from circuitdiff.models.adapters import ADAPTERS, Adapter, adapter_for, get_module, model_shape
from circuitdiff.models.loading import LoadedModel, load_model, resolve_device, resolve_model

__all__ = ["ADAPTERS", "Adapter", "LoadedModel", "adapter_for", "get_module", "load_model", "model_shape", "resolve_device", "resolve_model"]
