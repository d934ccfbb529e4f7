"""benchmarks/gpu_check.py without a GPU: its arguments, the 7B configs, the model builder, the table and the JSON.

The GPU measurements themselves need a GPU machine (README: not run yet); here the same code runs on
CPU with shrunk configs of the same architectures.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(gpu_check):
    args = gpu_check.parse_args([])
    assert args.models == ["llama-7b", "qwen2.5-7b", "mistral-7b"]
    assert args.lengths == [2048, 8192, 16384, 32768]
    assert args.modes == ["plain", "eap", "plain+gc", "eap+gc"] and args.device == "cuda"
    args = gpu_check.parse_args(["--models", "mistral-7b", "--lengths", "64", "--device", "cpu", "--tiny"])
    assert args.models == ["mistral-7b"] and args.lengths == [64] and args.tiny
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "gpt-7b"])


# published parameter counts of the hub models whose shapes the check copies
PUBLISHED = {"llama-7b": 6.91e9, "qwen2.5-7b": 7.62e9, "mistral-7b": 7.24e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_shapes_have_the_published_parameter_counts(gpu_check, name):
    import transformers

    config = gpu_check.model_config(name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PUBLISHED[name], rel=0.01)
    tiny = gpu_check.model_config(name, tiny=True)
    assert type(tiny) is type(config) and tiny.hidden_size == 64 and tiny.num_hidden_layers == 2


def test_builder_materialises_random_weights_that_run(gpu_check):
    config = gpu_check.model_config("qwen2.5-7b", tiny=True)
    model = gpu_check.build_model(config, torch.bfloat16, ["cpu"])
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    assert torch.equal(params["model.norm.weight"], torch.ones_like(params["model.norm.weight"]))
    assert float(params["model.layers.0.self_attn.q_proj.bias"].abs().max()) == 0.0  # Qwen2 has q/k/v biases
    std = float(params["model.layers.0.mlp.up_proj.weight"].float().std())
    assert 0.015 < std < 0.025  # normal(0, initializer_range=0.02)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_cpu_smoke_run_writes_the_table_and_json(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    result = gpu_check.main(["--device", "cpu", "--tiny", "--models", "llama-7b", "--lengths", "16", "32",
                             "--no-vllm", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["attribution"] == result["attribution"] and len(data["attribution"]) == 8
    assert all(c["status"] == "ok" and c["seconds"] > 0 for c in data["attribution"])
    assert {(c["tokens"], c["mode"]) for c in data["attribution"]} == {(n, m) for n in (16, 32) for m in gpu_check.MODES}
    gen = {g["backend"]: g for g in data["generation"]}
    assert gen["hf"]["tokens_per_s"] > 0 and gen["vllm"]["status"] == "not run (--no-vllm)"
    printed = capsys.readouterr().out
    assert "float32 EAP accumulation" in printed and printed.count("llama-7b ") >= 8


def test_table_marks_oom_and_skipped_cells_and_ratios(gpu_check):
    result = {"device_name": "X", "n_devices": 1, "torch": "t", "models": ["m"], "seconds": 1.0, "generation": [
        {"backend": "hf", "prompts": 64, "new_tokens": 256, "seconds": 10.0, "tokens_per_s": 100.0},
        {"backend": "vllm", "prompts": 64, "new_tokens": 256, "seconds": 2.0, "tokens_per_s": 800.0}],
        "attribution": [
            {"model": "m", "tokens": 8, "mode": "plain", "status": "ok", "seconds": 2.0, "peak_gb": 10.0},
            {"model": "m", "tokens": 8, "mode": "eap", "status": "ok", "seconds": 3.0, "peak_gb": 15.0},
            {"model": "m", "tokens": 9, "mode": "eap", "status": "OOM"},
            {"model": "m", "tokens": 9, "mode": "eap+gc", "status": "skipped (budget)"}]}
    text = gpu_check.table(result)
    assert "1.50" in text.splitlines()[3]  # 3.0 / 2.0 s and 15 / 10 GB
    assert "OOM" in text and "skipped (budget)" in text and "vllm / hf: 8.00x" in text
