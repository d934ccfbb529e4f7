"""Model loading from local directories, LoRA adapter directories and bad specs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model

from circuitdiff.errors import UserError
from circuitdiff.models import load_model
from circuitdiff.models.adapters import ADAPTERS, adapter_for, model_shape


def _save_tiny(tmp_path, arch="qwen2"):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model(arch, dtype=torch.float32, exact=False)
    path = tmp_path / arch
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(path)
    return model, path


def test_local_directory_gives_the_same_logits(tmp_path):
    model, path = _save_tiny(tmp_path)
    loaded = load_model(str(path), "float32")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert loaded.info["model_type"] == "qwen2" and loaded.info["dtype"] == "float32"
    assert loaded.tokenizer.vocab_size == model.config.vocab_size
    assert not loaded.model.training


def test_dtype_is_applied(tmp_path):
    _, path = _save_tiny(tmp_path)
    assert next(load_model(str(path), "bfloat16").model.parameters()).dtype == torch.bfloat16


def test_lora_adapter_directory_is_merged(tmp_path):
    import peft  # a dev dependency (scripts/setup.sh installs it)

    model, base_path = _save_tiny(tmp_path, "llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    adapter_path = tmp_path / "adapter"
    lora.save_pretrained(adapter_path)
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_path)
    (adapter_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_model(str(adapter_path), "float32")
    ids = torch.tensor([[2, 7, 1, 8, 2]])
    expected = lora(ids).logits
    assert not torch.allclose(expected, tiny_model("llama", dtype=torch.float32, exact=False)(ids).logits)
    torch.testing.assert_close(loaded.model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert loaded.info["lora_adapter"] == str(adapter_path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"  # merged: the engine sees a plain model


@pytest.mark.parametrize(
    "spec,message",
    [
        ("./no/such/dir", "does not exist"),
        ("/tmp/nothing-here.gguf", "does not exist"),
    ],
)
def test_bad_paths_are_one_line(spec, message):
    with pytest.raises(UserError, match=message) as err:
        load_model(spec)
    assert "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="neither config.json nor adapter_config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    with pytest.raises(UserError, match="could not load 'nobody-here/no-such-model'") as err:
        load_model("nobody-here/no-such-model")
    assert "\n" not in str(err.value)


def test_bad_dtype():
    with pytest.raises(UserError, match="dtype 'float8' is unknown"):
        load_model("smollm2-135m-instruct", "float8")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_adapter_and_shape(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    assert adapter is ADAPTERS[model.config.model_type]
    shape = model_shape(model, adapter)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_model) == (3, 4, 2, 16)
