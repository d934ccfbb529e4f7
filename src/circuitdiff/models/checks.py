"""Checks before work: what can be known about the models and the device without loading any weights.

A run checks both models' specs, the device and the tokenizers before it generates a single
answer, so that a typo in the tuned model does not surface after the whole base generation,
and two models with different tokenizers are never compared token by token.
"""

from __future__ import annotations

import json
import re

from circuitdiff.errors import UserError

_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
PROBE = "Natalia sold 48 clips in April, and half as many in May. How many clips did she sell? \\boxed{72}"


def check_device(device: str) -> str:
    """`device` if it names a device this machine has ("cpu", "auto", "mps", "cuda", "cuda:N")."""
    if not _DEVICE.match(str(device)):
        raise UserError(f"device {device!r} is unknown; use cpu, cuda, cuda:N, mps or auto")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: no CUDA device is available here; use device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise UserError("device 'mps' is not available here; use device cpu")
    return device


def _local_or_hub(spec: str):
    """(local dir or None, hub id, revision) of a spec; a LoRA adapter dir resolves to its base's."""
    from circuitdiff.models.loading import _materialise

    local, _ = _materialise(spec)
    if local is not None and (local / "adapter_config.json").exists():
        base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{local}/adapter_config.json names no base_model_name_or_path; add the base model's spec")
        if not (local / "tokenizer_config.json").exists():
            return _local_or_hub(base)
    if local is not None:
        return local, None, None
    repo, _, revision = spec.partition("@")
    return None, repo, revision or None


def check_spec(spec: str, trust_remote_code: bool = False) -> None:
    """The spec names a model that can be found (its config loads); no weights are read."""
    local, repo, revision = _local_or_hub(spec)
    if local is not None:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not find model {spec!r} ({first}); check the id or path, your network/HF_TOKEN, or "
                        "pass a local directory") from None


def _pretrained(auto, what: str, spec: str, local, repo, revision, trust_remote_code: bool):
    """auto.from_pretrained on a local dir or a hub id; a failure is one line naming `what` and the spec."""
    try:
        if local is not None:
            return auto.from_pretrained(str(local), trust_remote_code=trust_remote_code)
        return auto.from_pretrained(repo, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load the {what} of {spec!r} ({first}); check the id or path") from None


def tokenizer_for(spec: str, trust_remote_code: bool = False):
    """The tokenizer of a spec, without its weights (a LoRA adapter without one uses its base's)."""
    from transformers import AutoTokenizer

    return _pretrained(AutoTokenizer, "tokenizer", spec, *_local_or_hub(spec), trust_remote_code)


def config_for(spec: str, trust_remote_code: bool = False):
    """The model config of a spec, without its weights (a LoRA adapter: its base's)."""
    from transformers import AutoConfig

    local, repo, revision = _local_or_hub(spec)
    if local is not None and not (local / "config.json").exists() and (local / "adapter_config.json").exists():
        return config_for(json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"])
    return _pretrained(AutoConfig, "config", spec, local, repo, revision, trust_remote_code)


def tokenizer_difference(a, b) -> str | None:
    """Why two tokenizers would not give the same ids, or None: the vocabulary, then a probe text."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} and {len(b)})"
    if a.get_vocab() != b.get_vocab():
        return "the vocabularies differ"
    if a(PROBE, add_special_tokens=False)["input_ids"] != b(PROBE, add_special_tokens=False)["input_ids"]:
        return "they encode the same text differently"
    return None
