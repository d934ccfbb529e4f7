"""Generation: batched greedy vs a naive no-cache loop, EOS handling, prompts, and resume after a failure."""

import json

import pytest
import torch

from circuitdiff.data import Problem
from circuitdiff.errors import UserError
from circuitdiff.decoding import Generation, HFBackend, VLLMBackend, eos_token_ids
from circuitdiff.io import read_jsonl_tolerant as read_rows
from circuitdiff.stages.generate import generate_dataset
from circuitdiff.prompts import INSTRUCTION, encode, render
from pipeline_helpers import byte_tokenizer, tiny_lm

QUESTIONS = [f"Question {i}: what is {i} plus {2 * i}?" + " more words" * (i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_lm(0).to(torch.float64)


def naive_greedy(model, prompt, max_new_tokens, eos):
    """Full forward pass over the whole sequence at every step, no cache, no padding."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([seq])).logits[0, -1]
            token = int(logits.argmax())
            if token in eos:
                return Generation(out, "eos")
            out.append(token)
            seq.append(token)
    return Generation(out, "length")


def test_batched_generation_matches_naive_loop(model, tok):
    prompts = [encode(q, tok, "chat") for q in QUESTIONS[:5]]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    backend = HFBackend(model, tok, max_new_tokens=20)
    batched = backend.generate(prompts)
    naive = [naive_greedy(model, p, 20, {1}) for p in prompts]
    assert batched == naive
    assert {g.stop for g in naive} == {"eos", "length"}  # both endings exercised
    assert all(1 not in g.answer_ids for g in batched)  # EOS is not part of the answer
    assert all(len(g.answer_ids) == 20 for g in batched if g.stop == "length")


def test_eos_ids_union(model, tok):
    model.generation_config.eos_token_id = [1, 7]
    try:
        assert eos_token_ids(model, tok) == [1, 7]
        prompts = [encode(q, tok, "chat") for q in QUESTIONS[:3]]
        got = HFBackend(model, tok, 10).generate(prompts)
        assert got == [naive_greedy(model, p, 10, {1, 7}) for p in prompts]
    finally:
        model.generation_config.eos_token_id = 1


def test_prompt_presets(tok):
    q = "What is 1+1?"
    assert render(q, "deepseek") == (
        "User: What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:"
    )
    assert render(q, "mistral") == "[INST] What is 1+1?[/INST]"
    assert render(q, "qwen-chatml") == (
        f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(q, "chat", tok) == f"Q: {q}\n{INSTRUCTION}\nA:"
    assert render(q, "chat", tok, instruction="") == f"Q: {q}\nA:"
    assert tok.decode(encode(q, tok, "mistral")) == "[INST] What is 1+1?[/INST]"
    with pytest.raises(UserError, match="unknown"):
        render(q, "alpaca")
    bare = byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        render(q, "chat", bare)


def problems(n):
    return [Problem(idx=i, question=QUESTIONS[i], gold=str(i), kind="numeric") for i in range(n)]


class FailingBackend:
    """Wraps a backend; raises after `fail_after` batches (a crash in the middle of a run)."""

    name = "hf"

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls, self.seen = inner, fail_after, 0, []

    def generate(self, prompts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        self.seen.extend(prompts)
        return self.inner.generate(prompts)


def _sorted(rows):
    return sorted(rows, key=lambda r: r["idx"])


def test_resume_after_failure_gives_the_same_rows(model, tok, tmp_path):
    probs = problems(8)
    prompts = [encode(p.question, tok, "chat") for p in probs]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    reference = generate_dataset(tmp_path / "ref.jsonl", probs, prompts, HFBackend(model, tok, 10), decode,
                                 batch_size=3, progress=False)
    path = tmp_path / "gen.jsonl"
    crashing = FailingBackend(HFBackend(model, tok, 10), fail_after=2)
    with pytest.raises(RuntimeError, match="injected"):
        generate_dataset(path, probs, prompts, crashing, decode, batch_size=3, progress=False)
    kept = read_rows(path)
    assert len(kept) == 6  # two finished batches survived the crash
    resumed = FailingBackend(HFBackend(model, tok, 10))
    rows = generate_dataset(path, probs, prompts, resumed, decode, batch_size=3, progress=False)
    assert len(resumed.seen) == 2  # only the unfinished questions were generated again
    assert _sorted(rows) == _sorted(reference)
    assert {r["idx"] for r in rows} == set(range(8))
    row = _sorted(rows)[0]
    assert set(row) >= {"idx", "question", "gold", "prompt_ids", "answer_ids", "answer_text", "prediction", "correct"}
    assert row["prompt_ids"] == prompts[0]


def test_cut_off_last_line_is_dropped_and_file_repaired(model, tok, tmp_path):
    probs = problems(5)
    prompts = [encode(p.question, tok, "chat") for p in probs]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    path = tmp_path / "gen.jsonl"
    generate_dataset(path, probs[:2], prompts[:2], HFBackend(model, tok, 10), decode, batch_size=2, progress=False)
    with open(path, "a") as f:
        f.write('{"idx": 4, "question": "half a li')  # killed mid-append
    rows = generate_dataset(path, probs, prompts, HFBackend(model, tok, 10), decode, batch_size=2, progress=False)
    assert sorted(r["idx"] for r in rows) == list(range(5))
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)


def test_vllm_backend_needs_vllm():
    pytest.importorskip  # noqa: B018 - vllm is not installed here; the error must say how to get it
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install vllm"):
            VLLMBackend("whatever/model", "bfloat16", 16, [1])
    else:
        pytest.skip("vllm is installed: the import guard is not exercised")


def test_bad_batch_size(model, tok, tmp_path):
    with pytest.raises(UserError, match="batch size"):
        generate_dataset(tmp_path / "x.jsonl", problems(1), [[5, 6]], HFBackend(model, tok, 4), str, batch_size=0)
