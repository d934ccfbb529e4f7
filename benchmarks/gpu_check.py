"""The prepared GPU check (issue 16): 7B shapes, long sequences, EAP against its floor; vLLM against HF generation.

Random-weight models with the real shapes of the paper's pairs (Llama-7B / DeepSeek-Math-7B,
Qwen2.5-7B, Mistral-7B configs), bf16 weights, EAP scores accumulated in float32 (the engine's
rule for bf16 models), batch 1, prompt = answer = tokens/2, objective nll on the whole answer:

- attribution: for each model and length (2k/8k/16k/32k tokens), the time and peak GPU memory of
  `plain` (forward + input-only backward, parameters frozen: baselines.py) and of `eap` (the
  engine, block graph), each also with activation checkpointing per layer (+gc), in the same
  process on the same model; a cell that runs out of memory says OOM;
- with more than one GPU: the first model split over all of them (device_map), EAP at every length;
- generation: vLLM (`load_format="dummy"`, the same shapes) against HF batched greedy generation
  (`model.generate`, KV cache), 64 prompts of 256 tokens, 256 new tokens each, tokens per second.

It prints one table and writes JSON (--json). Cells are skipped, and say so, once --budget-s is
spent (the default keeps a one-GPU run under 8 minutes). Nothing is downloaded: the configs are
written here and the weights are random.

    python benchmarks/gpu_check.py                              # on a GPU machine: everything
    python benchmarks/gpu_check.py --models llama-7b --lengths 2048 8192
    python benchmarks/gpu_check.py --device cpu --tiny --no-vllm --lengths 64 128   # the CPU smoke run (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# real shapes (config.json of each hub model); vocab sizes as shipped
SHAPES = {
    "llama-7b": dict(arch="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                     num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=32768),  # deepseek-math-7b (Llama architecture; 30 layers)
    "qwen2.5-7b": dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=32768),
    "mistral-7b": dict(arch="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=32768, sliding_window=None),
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
MODES = ("plain", "eap", "plain+gc", "eap+gc")
GEN = dict(prompts=64, prompt_tokens=256, new_tokens=256)


def model_config(name: str, tiny: bool = False):
    """The transformers config of a shape: real, or (tiny) the same architecture and head layout shrunk."""
    import transformers

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    if tiny:
        ratio = shape["num_attention_heads"] // shape["num_key_value_heads"]
        shape.update(TINY, num_key_value_heads=TINY["num_attention_heads"] // min(ratio, TINY["num_attention_heads"]))
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    config = cls(**shape, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def build_model(config, dtype, devices: list[str]):
    """Random weights with the config's shapes, built on the meta device and materialised straight on `devices`
    (one: the whole model there; several: accelerate's device_map over them, split evenly)."""
    import torch
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if len(devices) == 1:
        device_map = {"": devices[0]}
    else:
        size = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
        per = int(size / len(devices) * 1.15)
        device_map = infer_auto_device_map(model, max_memory={int(d.split(":")[1]): per for d in devices},
                                           no_split_module_classes=model._no_split_modules, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    for name, param in list(model.named_parameters()):
        where = _device_of(name, device_map)
        value = torch.empty(param.shape, dtype=dtype, device=where)
        if "norm" in name:
            value.fill_(1.0)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.normal_(0.0, std)
        set_module_tensor_to_device(model, name, where, value=value)
    backbone = model.model
    backbone.rotary_emb = type(backbone.rotary_emb)(config).to(_device_of("model.layers.0", device_map))
    model.eval()
    return dispatch_model(model, device_map) if len(devices) > 1 else model


def _device_of(name: str, device_map: dict) -> str:
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    where = device_map[best]
    return f"cuda:{where}" if isinstance(where, int) else where


def measure(model, mode: str, n_tokens: int, device: str) -> dict:
    """One cell: seconds and peak memory of plain or eap (with +gc: activation checkpointing) at n_tokens."""
    import torch

    from baselines import plain_backward, random_sample
    from circuitdiff.engine import EdgeAttributor, input_device, make_batch

    method, _, gc_flag = mode.partition("+")
    checkpointing = gc_flag == "gc"
    batch = make_batch([random_sample(model.config.vocab_size, n_tokens)], 0, input_device(model))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        if method == "plain":
            plain_backward(model, batch, checkpointing)
        else:
            W, _ = EdgeAttributor(model, "block", checkpointing).scores(batch)
            assert torch.isfinite(W).all()
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"mode": mode, "tokens": n_tokens, "status": "OOM"}
    seconds = time.perf_counter() - start
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if cuda else None
    return {"mode": mode, "tokens": n_tokens, "status": "ok", "seconds": round(seconds, 3),
            "peak_gb": round(peak / 2**30, 2) if peak is not None else None}


def attribution_cells(args, devices: list[str], clock, label: str = "") -> list[dict]:
    import torch

    cells = []
    for name in args.models:
        if clock() > args.attr_budget_s:
            cells += [{"model": name + label, "tokens": n, "mode": m, "status": "skipped (budget)"}
                      for n in args.lengths for m in args.modes]
            continue
        model = build_model(model_config(name, args.tiny), torch.bfloat16, devices)
        measure(model, "eap", min(args.lengths), devices[0])  # warm-up: kernels, allocator
        for n in args.lengths:
            for mode in args.modes:
                cell = ({"mode": mode, "tokens": n, "status": "skipped (budget)"} if clock() > args.attr_budget_s
                        else measure(model, mode, n, devices[0]))
                cells.append({"model": name + label, **cell})
        del model
        gc.collect()
        if devices[0].startswith("cuda"):
            torch.cuda.empty_cache()
        if label:  # the split model: the first shape only
            break
    return cells


def generation_rows(args, device: str) -> list[dict]:
    """HF batched greedy generation vs vLLM on the first model's shape, tokens per second."""
    import torch

    config = model_config(args.models[0], args.tiny)
    n, p_len, new = GEN["prompts"], GEN["prompt_tokens"], GEN["new_tokens"]
    if args.tiny:
        n, p_len, new = 4, 16, 8
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, config.vocab_size, (n, p_len), generator=g)
    rows = []
    model = build_model(config, torch.bfloat16, [device])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                             do_sample=False, max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows.append({"backend": "hf", "prompts": n, "new_tokens": new, "seconds": round(seconds, 3),
                 "tokens_per_s": round((out.shape[1] - p_len) * n / seconds, 1)})
    del model, out
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    rows.append(_vllm_row(args, config, prompts, new) if not args.no_vllm else
                {"backend": "vllm", "status": "not run (--no-vllm)"})
    return rows


def _vllm_row(args, config, prompts, new: int) -> dict:
    try:
        import vllm
    except ImportError:
        return {"backend": "vllm", "status": "not installed (pip install vllm)"}
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "mistral": "MistralForCausalLM"}[config.model_type]]
    config.save_pretrained(folder)
    start = time.perf_counter()
    llm = vllm.LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                   max_model_len=prompts.shape[1] + new + 16, gpu_memory_utilization=0.85)
    startup = time.perf_counter() - start
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    made = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"backend": "vllm", "prompts": len(prompts), "new_tokens": new, "seconds": round(seconds, 3),
            "tokens_per_s": round(made / seconds, 1), "startup_s": round(startup, 1)}


def table(result: dict) -> str:
    """The one table: every attribution cell with its ratios to plain, then the generation rows."""
    lines = [f"GPU check: {result['device_name']} x {result['n_devices']}, torch {result['torch']}, bf16 weights, "
             "float32 EAP accumulation, batch 1, block graph; x plain: against plain with the same checkpointing "
             "(+gc) on the same model in the same run",
             f"{'model':<24} {'tokens':>7} {'mode':>9} {'seconds':>8} {'x plain':>8} {'peak GB':>8} {'x plain':>8}"]
    cells = result["attribution"]
    plain = {(c["model"], c["tokens"], c["mode"].partition("+")[2]): c for c in cells
             if c["mode"].startswith("plain") and c.get("status") == "ok"}
    for c in cells:
        if c.get("status") != "ok":
            lines.append(f"{c['model']:<24} {c['tokens']:>7} {c['mode']:>9} {c['status']:>8}")
            continue
        base = plain.get((c["model"], c["tokens"], c["mode"].partition("+")[2]))
        ratio_t = f"{c['seconds'] / base['seconds']:.2f}" if base else "-"
        ratio_m = f"{c['peak_gb'] / base['peak_gb']:.2f}" if base and c["peak_gb"] and base["peak_gb"] else "-"
        peak = f"{c['peak_gb']:.1f}" if c["peak_gb"] is not None else "-"
        lines.append(f"{c['model']:<24} {c['tokens']:>7} {c['mode']:>9} {c['seconds']:>8.2f} {ratio_t:>8} "
                     f"{peak:>8} {ratio_m:>8}")
    gen = result["generation"]
    if gen:
        lines.append(f"generation ({result['models'][0]} shape, greedy, bf16): " + "; ".join(
            f"{g['backend']} {g['tokens_per_s']} tokens/s ({g['prompts']} prompts x {g['new_tokens']} new tokens, "
            f"{g['seconds']} s)" if "tokens_per_s" in g else f"{g['backend']}: {g['status']}" for g in gen))
        speeds = {g["backend"]: g.get("tokens_per_s") for g in gen}
        if speeds.get("hf") and speeds.get("vllm"):
            lines.append(f"vllm / hf: {speeds['vllm'] / speeds['hf']:.2f}x")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the smoke run)")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs of the same architectures (CPU smoke run)")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--attr-budget-s", type=float, default=300.0,
                        help="start no attribution cell after this many seconds (default 300)")
    parser.add_argument("--json", default="gpu_check.json", help="where the numbers go (default gpu_check.json)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --tiny for the smoke run)")
    n_dev = torch.cuda.device_count() if cuda else 1
    result = {"device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "n_devices": n_dev,
              "torch": torch.__version__, "models": args.models, "lengths": args.lengths, "tiny": args.tiny}
    result["attribution"] = attribution_cells(args, ["cuda:0" if cuda else "cpu"], clock)
    if n_dev > 1:
        result["attribution"] += attribution_cells(args, [f"cuda:{i}" for i in range(n_dev)], clock,
                                                   label=f" (split over {n_dev})")
    result["generation"] = [] if args.no_generation else generation_rows(args, "cuda:0" if cuda else "cpu")
    result["seconds"] = round(clock(), 1)
    print(table(result), flush=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
