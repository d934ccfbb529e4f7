"""The lab: reward, DPO pairs, SFT targets, tiny SFT/GRPO/DPO runs (checkpoints, resume) and tracking."""

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as sps
from transformers import TrainerCallback

from circuitdiff.store import layout
from circuitdiff.cli import build_parser
from circuitdiff.cli import main as cli_main
from circuitdiff.data import Problem, _arith_rows
from circuitdiff.errors import UserError
from circuitdiff.decoding import HFBackend
from circuitdiff.io import read_jsonl_tolerant as read_rows
from circuitdiff.grade import extract_answer, grade, is_correct
from circuitdiff.io import read_json, write_jsonl
from circuitdiff.lab.reward import make_trl_reward, reward
from circuitdiff.lab.callback import TrackCallback
from circuitdiff.lab.settings import TrackSettings, TrainSettings
from circuitdiff.lab.rows import build_dpo_pairs, gold_solution
from circuitdiff.lab.train import train
from circuitdiff.models import load_model
from circuitdiff.prompts import encode
from pipeline_helpers import save_tiny_lm, write_gsm8k_file

MAX_NEW = 16
N_QUESTIONS = 8
QUIET = lambda *a: None  # noqa: E731


# ---------------------------------------------------------------------- reward

@pytest.mark.parametrize("text, gold, expected", [
    ("so 7 + 9 = 16, \\boxed{16}", "16", 3.0),                      # correct, boxed
    ("\\boxed{8}", "10", -0.5 + 2.0 * (1 - 2 / 10)),                # |8-10|/10 = 0.2 -> 1.1
    ("\\boxed{15}", "10", 0.5),                                      # dev 0.5 -> -0.5 + 2*0.5
    ("\\boxed{25}", "10", -0.5),                                     # dev 1.5: no credit left
    ("the answer is -8", "-6", -0.5 + 2.0 * (1 - 2 / 6)),            # negative gold: dev 1/3 -> 0.8333
    ("I do not know.", "16", -0.5),                                  # no number
    ("\\boxed{many}", "16", -0.5),                                   # not a number
    ("\\boxed{0}", "0", 3.0),                                        # gold 0, correct
    ("\\boxed{0.25}", "0", 1.0),                                     # gold 0: dev = |pred| = 0.25
    ("\\boxed{2}", "0", -0.5),                                       # gold 0: dev 2
    ("\\boxed{1,080}", "1080", 3.0),                                 # thousands comma
    ("the answer is 1,000", "1080", -0.5 + 2.0 * (1 - 80 / 1080)),   # comma, partial: 1.35185...
    ("\\boxed{\\frac{1}{2}}", "0.5", 3.0),                           # fraction equal to the gold
    ("\\boxed{\\frac{3}{4}}", "1", 1.0),                             # fraction, dev 0.25
    ("\\boxed{3/4}", "1", 1.0),
])
def test_reward_hand_cases(text, gold, expected):
    assert reward(text, gold) == pytest.approx(expected, abs=1e-12)


def test_reward_trl_form_and_bounds():
    trl_reward = make_trl_reward(eos_ids=[0])
    got = trl_reward(["\\boxed{4}", [{"role": "assistant", "content": "it is \\boxed{5}"}], "no idea"],
                     gold=["4", "4", "4"], kind=["numeric"] * 3)
    assert got == pytest.approx([3.0, -0.5 + 2.0 * 0.75, -0.5])
    # a near miss never earns what a correct answer earns, and an integer gold is matched exactly
    assert reward("\\boxed{1000.5}", "1000") < 1.5 < 3.0
    assert reward("\\boxed{17999}", "18000") < 1.5
    # the reward shares the grader's truncation rule: ids without EOS were cut at the cap
    cut = trl_reward(["so 2 + 2 = 4", "so 2 + 2 = 4", "\\boxed{4} and then"], gold=["4"] * 3, kind=["numeric"] * 3,
                     completion_ids=[[7, 8, 0], [7, 8, 9], [5, 6]])
    assert cut == pytest.approx([3.0, -0.5, 3.0])  # finished; cut without a box; cut after a box


# ---------------------------------------------------------------------- DPO pairs

def _samples():
    return [
        {"prompt": "p0", "idx": 0, "completions": ["a", "b", "c", "d", "e"], "correct": [True, False, True, False, False]},
        {"prompt": "p1", "idx": 1, "completions": ["f", "g"], "correct": [True, True]},
        {"prompt": "p2", "idx": 2, "completions": ["h", "i"], "correct": [False, False]},
        {"prompt": "p3", "idx": 3, "completions": ["j", "k"], "correct": [False, True]},
        {"prompt": "p4", "idx": 4, "completions": ["same", "same"], "correct": [True, False]},
    ]


def test_build_dpo_pairs():
    samples = _samples()
    right = {s["idx"]: {c for c, ok in zip(s["completions"], s["correct"]) if ok} for s in samples}
    wrong = {s["idx"]: {c for c, ok in zip(s["completions"], s["correct"]) if not ok} for s in samples}
    for max_pairs, per_question in ((2, {0: 2, 3: 1}), (1, {0: 1, 3: 1}), (5, {0: 2, 3: 1})):
        pairs = build_dpo_pairs(samples, max_pairs=max_pairs, seed=0)
        counts = {i: sum(p["idx"] == i for p in pairs) for i in {p["idx"] for p in pairs}}
        assert counts == per_question  # only questions with a right and a wrong answer; never chosen == rejected
        for p in pairs:
            assert p["prompt"] == f"p{p['idx']}"
            assert p["chosen"] in right[p["idx"]] and p["rejected"] in wrong[p["idx"]]
        q0 = [p for p in pairs if p["idx"] == 0]
        assert len({p["chosen"] for p in q0}) == len(q0) and len({p["rejected"] for p in q0}) == len(q0)
    assert build_dpo_pairs(samples, 2, seed=7) == build_dpo_pairs(samples, 2, seed=7)
    draws = {json.dumps(build_dpo_pairs(samples, 1, seed=s)) for s in range(12)}
    assert len(draws) > 1  # the seed picks which completions are paired
    assert build_dpo_pairs([s for s in samples if s["idx"] in (1, 2)]) == []


# ---------------------------------------------------------------------- SFT targets

def test_gold_solution_gsm8k_and_arith():
    raw = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                       "in May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}
    text = gold_solution("gsm8k", raw, Problem(0, raw["question"], "72", "numeric"))
    assert text == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
                    "\nThe final answer is \\boxed{72}.")
    assert "<<" not in text and "####" not in text and grade(text, "72").correct and reward(text, "72") == 3.0

    row = _arith_rows("train")[0]
    problem = Problem(0, row["question"], "-6", "numeric")
    assert row["expression"] == "3 - 9"
    text = gold_solution("arith", row, problem)
    assert text == "3 - 9 = -6\nThe final answer is \\boxed{-6}." and text.endswith("\\boxed{-6}.")
    assert grade(text, "-6").correct
    with pytest.raises(UserError, match="worked solutions"):
        gold_solution("svamp", {}, problem)


# ---------------------------------------------------------------------- training

class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_lora_trained(ckpt: Path, base_spec: str, base_weights: dict) -> dict:
    """The checkpoint names its base, loads merged, differs from the base in LoRA-targeted weights only."""
    assert read_json(ckpt / "adapter_config.json")["base_model_name_or_path"] == base_spec
    loaded = load_model(str(ckpt), "float32")
    assert loaded.info["lora_adapter"] == str(ckpt)
    weights = _weights(loaded.model)
    assert weights.keys() == base_weights.keys()
    changed = {k for k in weights if not torch.equal(weights[k], base_weights[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert (weights["model.layers.0.self_attn.q_proj.weight"]
            - base_weights["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-6
    assert all(k.split(".")[-2] in TrainSettings("sft").lora_targets for k in changed)  # embeddings, norms untouched
    return weights


# the tiny random models stop at the token cap on most questions: tracking them grades cut answers by their
# text and selects without the finished filter (the defaults are tested in test_run.py)
TINY_GRADING = {"truncated": "lenient", "selection": {"require_finished": False}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, a test file whose golds are the base's own greedy answers (one wrong), a GRPO run tracked
    during training by TrackCallback."""
    root = tmp_path_factory.mktemp("lab")
    base = save_tiny_lm(root / "base")
    loaded = load_model(str(base), "float32")
    qs = [f"Calculate {i} + {i + 1}." for i in range(N_QUESTIONS)]
    gens = HFBackend(loaded.model, loaded.tokenizer, MAX_NEW).generate([encode(q, loaded.tokenizer, "chat") for q in qs])
    preds = [extract_answer(loaded.tokenizer.decode(g.answer_ids, skip_special_tokens=True)) for g in gens]
    golds = [p.replace(",", "") if p is not None and i != N_QUESTIONS - 1 else "99999" for i, p in enumerate(preds)]
    assert sum(g != "99999" for g in golds) >= 4
    data = write_gsm8k_file(root / "qa.jsonl", golds, qs)
    settings = TrackSettings(dataset="gsm8k", source=str(data), max_new_tokens=MAX_NEW, n_boot=200, device="cpu",
                             **TINY_GRADING)
    out = root / "grpo"
    log: list[str] = []
    # a random model never finishes an answer in 6 tokens: the lenient rule credits cut answers by their
    # last number, which gives GRPO the reward spread it needs (the strict reward is tested above)
    train(TrainSettings("grpo", base=str(base), dataset="arith", limit=4, steps=2, save_every=1, seed=1,
                        questions_per_step=2, num_generations=3, max_completion_length=6, device="cpu",
                        truncated="lenient"),
          out, callbacks=[TrackCallback(settings, log=log.append)], log=QUIET)
    return SimpleNamespace(root=root, base=base, base_weights=_weights(loaded.model), data=data, golds=golds,
                           settings=settings, out=out, log=log)


def test_grpo_checkpoints(world):
    assert [s for s, _ in layout.find_checkpoints(world.out)] == [1, 2]
    record = read_json(world.out / "train.json")
    assert record["settings"]["algorithm"] == "grpo" and "DAPO" in record["conventions"]["algorithm"]
    assert all(h["grad_norm"] > 0 for h in record["log_history"] if "grad_norm" in h)
    assert any("groups_dropped" in h for h in record["log_history"])  # dynamic sampling ran (on by default)
    w1 = assert_lora_trained(world.out / "checkpoint-1", str(world.base), world.base_weights)
    w2 = assert_lora_trained(world.out / "checkpoint-2", str(world.base), world.base_weights)
    assert not torch.equal(w1["model.layers.0.self_attn.q_proj.weight"], w2["model.layers.0.self_attn.q_proj.weight"])


def test_grpo_rerun_resumes(world, tmp_path):
    """A run killed after checkpoint-1 resumes from it: only step 2 is trained again."""
    out = tmp_path / "grpo"
    shutil.copytree(world.out, out, ignore=shutil.ignore_patterns("track", "checkpoint-2", "final"))
    kept = {p: p.read_bytes() for p in (out / "checkpoint-1").iterdir()}
    counter, log = StepCounter(), []
    train(TrainSettings("grpo", base=str(world.base), dataset="arith", limit=4, steps=2, save_every=1, seed=1,
                        questions_per_step=2, num_generations=3, max_completion_length=6, device="cpu",
                        truncated="lenient"),
          out, callbacks=[counter], log=log.append)
    assert counter.steps == [2]
    assert any("resuming from" in line and "checkpoint-1" in line for line in log)
    assert [s for s, _ in layout.find_checkpoints(out)] == [1, 2]
    assert {p: p.read_bytes() for p in (out / "checkpoint-1").iterdir()} == kept


def test_grpo_rerun_of_a_finished_run_trains_nothing(world, tmp_path):
    """Resuming GRPO from its last checkpoint used to train one step more (checkpoint-3 of a 2-step run). A finished
    run is left alone; a run killed after its last checkpoint but before OUT/final gets that checkpoint's adapter."""
    # 8 questions, 2 per step: the 2 steps end mid-epoch, where the trainer's resume logic ran one step more
    settings = TrainSettings("grpo", base=str(world.base), dataset="arith", limit=8, steps=2, save_every=1, seed=1,
                             questions_per_step=2, num_generations=3, max_completion_length=6, device="cpu",
                             truncated="lenient")
    out = tmp_path / "grpo"
    train(settings, out, log=QUIET)
    _rerun_does_nothing(settings, out)
    assert [s for s, _ in layout.find_checkpoints(out)] == [1, 2]

    shutil.rmtree(out / "final")
    record = json.loads((out / "train.json").read_text())
    record.pop("finished")
    (out / "train.json").write_text(json.dumps(record))
    _rerun_does_nothing(settings, out)
    assert [s for s, _ in layout.find_checkpoints(out)] == [1, 2]
    name = "adapter_model.safetensors"
    assert (out / "final" / name).read_bytes() == (out / "checkpoint-2" / name).read_bytes()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(world.base)


def _rerun_does_nothing(settings: TrainSettings, out: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("checkpoint-*/*")}
    counter = StepCounter()
    train(settings, out, callbacks=[counter], log=QUIET)
    assert counter.steps == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("checkpoint-*/*")} == stamps


def test_sft_tiny(world, tmp_path):
    settings = TrainSettings("sft", base=str(world.base), dataset="arith", limit=4, steps=2, save_every=1,
                             batch_size=2, device="cpu")
    train(settings, tmp_path / "sft", log=QUIET)
    assert [s for s, _ in layout.find_checkpoints(tmp_path / "sft")] == [1, 2]
    for step in (1, 2):
        assert_lora_trained(tmp_path / "sft" / f"checkpoint-{step}", str(world.base), world.base_weights)
    _rerun_does_nothing(settings, tmp_path / "sft")


def test_dpo_tiny(world, tmp_path):
    settings = TrainSettings("dpo", base=str(world.base), dataset="arith", limit=4, steps=2, save_every=1,
                             batch_size=2, dpo_samples=2, max_completion_length=8, device="cpu")
    # the random tiny model answers nothing right: no pair can be built from its own samples
    with pytest.raises(UserError, match="no question had both a correct and a wrong sampled answer"):
        train(settings, tmp_path / "nopairs", log=QUIET)
    # pairs cached in OUT/dpo_pairs.jsonl (as a first run writes them) are used as they are
    samples = [{"prompt": "Q: Calculate 3 - 9.\nA:", "idx": 0, "completions": [" \\boxed{-6}", " 12", " 3 - 9 = -6"],
                "correct": [True, False, True]},
               {"prompt": "Q: Calculate 7 + 9.\nA:", "idx": 2, "completions": [" 5", " 7 + 9 = 16"],
                "correct": [False, True]}]
    pairs = [{**p, "chosen": p["chosen"] + "<eos>", "rejected": p["rejected"] + "<eos>"}
             for p in build_dpo_pairs(samples, seed=0)]
    out = tmp_path / "dpo"
    write_jsonl(out / "dpo_pairs.jsonl", pairs)
    train(settings, out, log=QUIET)
    assert [s for s, _ in layout.find_checkpoints(out)] == [1, 2]
    for step in (1, 2):
        assert_lora_trained(out / f"checkpoint-{step}", str(world.base), world.base_weights)
    _rerun_does_nothing(settings, out)


# ---------------------------------------------------------------------- tracking

def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def _entropy(values: np.ndarray, lo: float, hi: float, bins: int = 100, eps: float = 1e-12) -> float:
    """Entropy of the pooled |values| histogram, values outside [lo, hi] clipped into the end bins."""
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p + eps)).sum())


def hand_fixed_set(start: list[dict], checkpoints: list[list[dict]], alpha=0.1, n=100, seed=0, beta=0.5, gamma=1.5):
    """The fixed question set's rules, re-implemented: all correct, the length rules and T_cut on the start's
    answers, every answer at least T_cut long, N drawn with the seed."""
    S = {r["idx"]: r for r in start}
    C = [{r["idx"]: r for r in rows} for rows in checkpoints]
    q = sorted(i for i in S if all(i in c for c in C) and S[i]["correct"] and all(c[i]["correct"] for c in C))
    L = {i: len(S[i]["answer_ids"]) for i in q}
    t_bar = sum(L.values()) / len(q)
    q = [i for i in q if beta * t_bar <= L[i] <= gamma * t_bar]
    t_cut = max(math.floor(alpha * t_bar + 0.5), 1)
    q = [i for i in q if L[i] >= t_cut and all(len(c[i]["answer_ids"]) >= t_cut for c in C)]
    return random.Random(seed).sample(q, min(n, len(q))), t_cut


COMBOS = [(o, sc, m) for o in ("nll", "logit") for sc, ms in (
    ("raw", ["activation_intensity", "information_complexity", "distribution_kurtosis", "diversity"]),
    ("unit", ["information_complexity", "distribution_kurtosis", "diversity"])) for m in ms]


def _W(run: Path, role: str, objective: str) -> np.ndarray:
    with np.load(layout.attribution(run, role, "gsm8k", 0.1, objective=objective)) as f:
        return f["scores"].astype(np.float64).reshape(len(f["scores"]), -1)


def test_track_during_training_then_cli_resume(world, capsys):
    """The callback chose the fixed set at checkpoint 1 and kept it at checkpoint 2; `circuitdiff track` resumes
    without recomputing; every number is re-derived here from the run files; --rechoose re-chooses the set."""
    out = world.out / "track"
    assert any("track grpo step 1" in line for line in world.log) and any("track grpo step 2" in line for line in world.log)
    first = _csv(out / "track.csv")
    assert (out / "track.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `circuitdiff track` over the same dir resumes: nothing regenerated or re-attributed, the same csv
    npz = sorted(out.glob("runs/grpo/checkpoint-*/attribution/*/*/gsm8k/*.npz"))
    assert len(npz) == 8  # 2 checkpoints x 2 roles x 2 objectives
    stamps = {p: p.stat().st_mtime_ns for p in npz}
    args = ["track", str(world.out), "--dataset", "gsm8k", "--source", str(world.data),
            "--max-new-tokens", str(MAX_NEW), "--n-boot", "200", "--device", "cpu", "--truncated", "lenient",
            "--keep-unfinished"]
    assert cli_main(args + ["--alpha", "0.3"]) == 2  # other settings never mix into one OUT
    assert "changed: alpha" in capsys.readouterr().err
    assert cli_main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in npz} == stamps
    rows = _csv(out / "track.csv")
    assert rows == first
    assert [(r["step"], r["objective"], r["scale"], r["metric"]) for r in rows] == [
        (str(s), *c) for s in (0, 1, 2) for c in COMBOS]
    assert {r["run"] for r in rows} == {"grpo"} and {r["algorithm"] for r in rows} == {"grpo"}
    assert {r["temperature"] for r in rows} == {"1.0"} and {r["entries"] for r in rows} == {"all"}
    assert {r["question_set"] for r in rows} == {"fixed"} and {r["alpha"] for r in rows} == {"0.1"}
    for r in rows[:len(COMBOS)]:
        assert float(r["diff"]) == float(r["diff_ci_low"]) == float(r["diff_ci_high"]) == 0.0

    # the set: chosen once, from the start and checkpoint 1 (the only checkpoint when the callback chose it)
    (start,) = out.glob("start-*")
    runs = {step: out / "runs" / "grpo" / f"checkpoint-{step}" for step in (1, 2)}
    answers = {0: read_rows(layout.generations(start, "base", "gsm8k"))}
    answers.update({step: read_rows(layout.generations(runs[step], "tuned", "gsm8k")) for step in (1, 2)})
    qset = read_json(layout.track_question_set(start))
    idx, t_cut = hand_fixed_set(answers[0], [answers[1]])
    assert qset["idx"] == idx and qset["T_cut"] == t_cut and qset["checkpoints"] == ["grpo/checkpoint-1"]
    for step in (1, 2):
        sel = read_json(layout.selection(runs[step], "gsm8k", 0.1))
        lengths = {a["idx"]: len(a["answer_ids"]) for a in answers[step]}
        assert sel["T_cut"] == t_cut and sel["idx"] == [i for i in idx if lengths[i] >= t_cut]
        if sel["idx"] == idx:  # the start's W on the full set is shared, byte for byte
            for o in ("nll", "logit"):
                assert (layout.attribution(runs[step], "base", "gsm8k", 0.1, objective=o).read_bytes()
                        == layout.attribution(start, "base", "gsm8k", 0.1, objective=o).read_bytes())
    # the raw histogram range of each objective: [0, max |W|] over the start and checkpoint 1, kept for step 2
    for o in ("nll", "logit"):
        hi = max(np.abs(_W(start, "base", o)).max(), np.abs(_W(runs[1], "tuned", o)).max())
        assert qset["ranges"][o] == pytest.approx([0.0, hi], rel=1e-12)

    for step in (0, 1, 2):
        correct = sum(is_correct(extract_answer(a["answer_text"]), world.golds[a["idx"]]) for a in answers[step])
        for r in [r for r in rows if r["step"] == str(step)]:
            assert int(r["correct"]) == correct and int(r["total"]) == N_QUESTIONS
            assert float(r["accuracy"]) == pytest.approx(correct / N_QUESTIONS)
            assert float(r["acc_ci_low"]) <= float(r["accuracy"]) <= float(r["acc_ci_high"])
        if step == 0:
            continue
        # the metric differences, recomputed from the two W files with plain numpy/scipy
        got = {(r["objective"], r["scale"], r["metric"]): r for r in rows if r["step"] == str(step)}
        for o in ("nll", "logit"):
            Wb, Wt = _W(runs[step], "base", o), _W(runs[step], "tuned", o)
            Ub, Ut = (W / np.abs(W).mean(axis=1, keepdims=True) for W in (Wb, Wt))
            lo, hi = qset["ranges"][o]
            unit_hi = max(np.abs(Ub).max(), np.abs(Ut).max())
            expected = {
                ("raw", "activation_intensity"): np.abs(Wt).mean() - np.abs(Wb).mean(),
                ("raw", "information_complexity"): _entropy(np.abs(Wt), lo, hi) - _entropy(np.abs(Wb), lo, hi),
                ("unit", "information_complexity"): _entropy(np.abs(Ut), 0, unit_hi) - _entropy(np.abs(Ub), 0, unit_hi),
                ("raw", "distribution_kurtosis"): (np.mean([sps.kurtosis(w, fisher=True) for w in Wt])
                                                   - np.mean([sps.kurtosis(w, fisher=True) for w in Wb])),
            }
            for (scale, metric), value in expected.items():
                r = got[(o, scale, metric)]
                assert float(r["diff"]) == pytest.approx(value, rel=1e-9, abs=1e-12), (o, scale, metric)
                assert float(r["diff_ci_low"]) <= float(r["diff_ci_high"])
                assert int(r["n_samples"]) == len(Wb) >= 2 and int(r["n_set"]) == len(idx)
                assert "T_cut" in r["loss"] and o in r["loss"]
        if step == 2:
            assert expected[("raw", "activation_intensity")] != 0.0  # the trained checkpoint changed the circuit

    # --rechoose: the set chosen again from the start and both checkpoints
    assert cli_main(args + ["--rechoose"]) == 0
    again = read_json(layout.track_question_set(start))
    idx2, t_cut2 = hand_fixed_set(answers[0], [answers[1], answers[2]])
    assert again["idx"] == idx2 and again["T_cut"] == t_cut2
    assert again["checkpoints"] == ["grpo/checkpoint-1", "grpo/checkpoint-2"]
    for step in (1, 2):
        assert read_json(layout.selection(runs[step], "gsm8k", 0.1))["idx"] == idx2


def test_track_on_the_starts_answers(world, tmp_path):
    """--text start: the set needs only the start correct (re-implemented), every checkpoint is scored on the
    start's answers (its W equals a direct attribution of the checkpoint model on those tokens), and the
    intensity difference is recomputed from the two W files."""
    import circuitdiff

    out = tmp_path / "track-start"
    args = ["track", str(world.out), "--dataset", "gsm8k", "--source", str(world.data), "--max-new-tokens",
            str(MAX_NEW), "--n-boot", "200", "--device", "cpu", "--truncated", "lenient", "--keep-unfinished",
            "--text", "start", "--out", str(out)]
    assert cli_main(args) == 0
    (start,) = out.glob("start-*")
    answers = {r["idx"]: r for r in read_rows(layout.generations(start, "base", "gsm8k"))}
    qset = read_json(layout.track_question_set(start))
    idx, t_cut = hand_fixed_set(list(answers.values()), [])
    assert qset["idx"] == idx and qset["T_cut"] == t_cut and qset["text"] == "start" and len(idx) >= 2
    rows = _csv(out / "track.csv")
    for step in (1, 2):
        run = out / "runs" / "grpo" / f"checkpoint-{step}"
        assert read_json(layout.selection(run, "gsm8k", 0.1))["idx"] == idx
        assert not layout.attribution(run, "tuned", "gsm8k", 0.1).exists()  # no own-text W in this mode
        with np.load(layout.attribution(run, "tuned", "gsm8k", 0.1, "base")) as f:
            Wt = f["scores"].astype(np.float64)
        samples = [{"prompt_ids": answers[i]["prompt_ids"], "answer_ids": answers[i]["answer_ids"], "cut_len": t_cut}
                   for i in idx]
        direct = circuitdiff.attribute(str(world.out / f"checkpoint-{step}"), samples, device="cpu")
        assert np.allclose(Wt, direct.scores, rtol=1e-5, atol=1e-6 * np.abs(direct.scores).max())
        Wb = _W(run, "base", "nll")
        got = next(r for r in rows if (r["step"], r["objective"], r["scale"], r["metric"])
                   == (str(step), "nll", "raw", "activation_intensity"))
        expected = np.abs(Wt.reshape(len(Wt), -1)).mean() - np.abs(Wb).mean()
        assert float(got["diff"]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with pytest.raises(UserError, match="fixed question set"):
        TrackSettings(text="start", question_set="per-checkpoint")


@pytest.mark.parametrize("n_right, reason", [(0, "no question survives the all_correct step"),
                                             (1, "only 1 question(s) selected")])
def test_track_with_too_few_both_correct(world, tmp_path, n_right, reason):
    """Golds that the models (almost) never give: accuracy recorded, metrics NaN with the reason; the
    callback path, which leaves the random state as it found it."""
    qs = [f"Calculate {i} + {i + 1}." for i in range(N_QUESTIONS)]
    golds = world.golds[:n_right] + ["99999"] * (N_QUESTIONS - n_right)
    data = write_gsm8k_file(tmp_path / "hard.jsonl", golds, qs)
    settings = TrackSettings(dataset="gsm8k", source=str(data), max_new_tokens=MAX_NEW, n_boot=200, device="cpu",
                             **TINY_GRADING)
    out = tmp_path / "track"
    callback = TrackCallback(settings, out=out, log=QUIET)
    before = torch.random.get_rng_state()
    callback.on_save(SimpleNamespace(output_dir=str(world.out)), SimpleNamespace(global_step=2, is_world_process_zero=True),
                     None)
    assert torch.equal(torch.random.get_rng_state(), before)
    rows = _csv(out / "track.csv")
    assert [r["step"] for r in rows] == ["0"] * len(COMBOS) + ["2"] * len(COMBOS)
    ckpt = [r for r in rows if r["step"] == "2"]
    answers = read_rows(layout.generations(out / "runs" / "grpo" / "checkpoint-2", "tuned", "gsm8k"))
    correct = sum(is_correct(extract_answer(a["answer_text"]), golds[a["idx"]]) for a in answers)
    for r in ckpt:
        assert int(r["correct"]) == correct <= n_right and int(r["total"]) == N_QUESTIONS
        assert math.isnan(float(r["diff"])) and math.isnan(float(r["diff_ci_low"]))
        assert r["note"].startswith("no metrics:") and reason in r["note"]
    assert (out / "track.png").exists()
    assert not list(out.glob("runs/grpo/checkpoint-2/attribution/*/*/*/*.npz"))


def test_per_checkpoint_selection_is_the_pipelines(world, tmp_path):
    """--question-set per-checkpoint: each checkpoint's selection is the pipeline's select() of start vs it."""
    from circuitdiff.select import SelectionSettings, select

    out = tmp_path / "track"
    assert cli_main(["track", str(world.out), "--dataset", "gsm8k", "--source", str(world.data), "--max-new-tokens",
                     str(MAX_NEW), "--n-boot", "200", "--device", "cpu", "--truncated", "lenient", "--keep-unfinished",
                     "--question-set", "per-checkpoint", "--objective", "nll", "--out", str(out)]) == 0
    (start,) = out.glob("start-*")
    assert not layout.track_question_set(start).exists()
    base = read_rows(layout.generations(start, "base", "gsm8k"))
    for step in (1, 2):
        run = out / "runs" / "grpo" / f"checkpoint-{step}"
        expected = select(base, read_rows(layout.generations(run, "tuned", "gsm8k")),
                          SelectionSettings(alpha=0.1, require_finished=False))
        sel = read_json(layout.selection(run, "gsm8k", 0.1))
        assert sel["idx"] == expected.idx and sel["T_cut"] == expected.T_cut
    rows = _csv(out / "track.csv")
    assert {r["objective"] for r in rows} == {"nll"} and {r["question_set"] for r in rows} == {"per-checkpoint"}


def test_cli_wiring():
    parser = build_parser()
    args = parser.parse_args(["track", "a", "b", "--dataset", "arith", "--limit", "5", "--alpha", "0.3", "--out", "o"])
    assert args.train_dirs == ["a", "b"] and args.limit == 5 and args.alpha == 0.3
    args = parser.parse_args(["train", "grpo", "--out", "o", "--track-dataset", "arith", "--track-limit", "20"])
    assert args.track_dataset == "arith" and args.track_limit == 20
    with pytest.raises(UserError, match="pass --out"):
        from circuitdiff.lab.track import track

        track(["a", "b"], TrackSettings())


def test_train_cli_tracks_while_training(world, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "grpo", "--base", str(world.base), "--dataset", "arith", "--limit", "4", "--steps", "1",
                     "--save-every", "1", "--questions-per-step", "2", "--num-generations", "2",
                     "--max-completion-length", "4", "--device", "cpu", "--out", str(out),
                     "--track-dataset", "arith", "--track-limit", "4"]) == 0
    rows = _csv(out / "track" / "track.csv")
    assert [r["step"] for r in rows] == ["0"] * len(COMBOS) + ["1"] * len(COMBOS)
    assert {r["dataset"] for r in rows} == {"arith"} and {r["total"] for r in rows} == {"4"}
    assert read_json(out / "track" / "track.json")["runs"]["run"]["path"] == str(out.resolve())


# ---------------------------------------------------------------------- null controls and DAPO pieces

def test_shuffled_rewards_keep_each_steps_multiset():
    from circuitdiff.lab.grpo import shuffled

    calls = [[3.0, -0.5, 1.1, -0.5, 0.2, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 3.0]]
    feed = iter(calls)
    wrapped = shuffled(lambda completions, **_: next(feed), seed=7)
    seen = [wrapped(completions=["x"] * len(c)) for c in calls]
    for k, (true, got) in enumerate(zip(calls, seen)):
        assert sorted(got) == sorted(true)  # the same rewards in the step
        order = list(range(len(true)))
        random.Random(7 + k).shuffle(order)  # call k's permutation, drawn independently here
        assert got == [true[i] for i in order]
    assert seen[1] != calls[1]  # a real permutation (6! orders; this seed moves them)
    assert wrapped.true_rewards == calls


def test_drop_equal_groups_masks_zero_advantage_groups():
    from circuitdiff.lab.grpo import drop_equal_groups

    mask = torch.ones(6, 4, dtype=torch.long)
    mask[1, 3] = 0
    advantages = torch.tensor([0.0, 0.0, 0.0, 1.2, -1.2, 0.0])  # group 0: all equal rewards; group 1: not
    kept, dropped = drop_equal_groups(mask, advantages, 3)
    assert dropped == 1
    assert kept[:3].sum() == 0 and torch.equal(kept[3:], mask[3:])  # a zero advantage inside a live group stays


def test_soft_overlong_is_daposs_penalty():
    from circuitdiff.lab.grpo import soft_overlong

    penalty = soft_overlong(max_length=10, buffer=4)
    assert penalty(completion_ids=[[1] * 5, [1] * 6, [1] * 8, [1] * 10, [1] * 12]) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(UserError, match="overlong_buffer"):
        TrainSettings("grpo", overlong="soft", overlong_buffer=300, max_completion_length=200)
    with pytest.raises(UserError, match="shuffle_rewards is a grpo setting"):
        TrainSettings("sft", shuffle_rewards=True)


def test_self_distill_trains_on_the_bases_finished_correct_answers(tmp_path, monkeypatch):
    """The rows are exactly the base's greedy answers (generated here, independently) that ended with EOS and
    match the gold; SFT on them writes LoRA checkpoints."""
    import circuitdiff.lab.rows as rows_module

    base = save_tiny_lm(tmp_path / "base", eos_scale=6.0)
    loaded = load_model(str(base), "float32")
    qs = [f"Calculate {i} + {i + 1}." for i in range(12)]
    gens = HFBackend(loaded.model, loaded.tokenizer, MAX_NEW).generate([encode(q, loaded.tokenizer, "chat") for q in qs])
    texts = [loaded.tokenizer.decode(g.answer_ids, skip_special_tokens=True) for g in gens]
    preds = [extract_answer(t) for t in texts]
    golds = [p.replace(",", "") if p is not None and i % 3 != 2 else "99999" for i, p in enumerate(preds)]
    expected = [i for i, (g, gold) in enumerate(zip(gens, golds)) if g.stop == "eos" and is_correct(preds[i], gold)]
    assert expected and len(expected) < len(qs), "the fixture must keep some answers and drop others"
    problems = [Problem(i, q, g, "numeric") for i, (q, g) in enumerate(zip(qs, golds))]
    monkeypatch.setattr(rows_module, "load_problems", lambda *a, **k: problems)
    settings = TrainSettings("self-distill", base=str(base), dataset="arith", steps=1, save_every=1, batch_size=4,
                             max_completion_length=MAX_NEW, device="cpu")
    out = tmp_path / "sd"
    train(settings, out, log=QUIET)
    made = read_rows(layout.self_distill_rows(out))
    assert [r["idx"] for r in made] == expected
    assert [r["completion"] for r in made] == [texts[i] + loaded.tokenizer.eos_token for i in expected]
    assert [s for s, _ in layout.find_checkpoints(out)] == [1]
    assert "NULL CONTROL" in read_json(out / "train.json")["conventions"]["algorithm"]
    assert_lora_trained(out / "checkpoint-1", str(base), _weights(loaded.model))


def test_grpo_with_shuffled_rewards_trains_and_says_so(world, tmp_path):
    out = tmp_path / "shuffled"
    train(TrainSettings("grpo", base=str(world.base), dataset="arith", limit=4, steps=1, save_every=1, seed=1,
                        questions_per_step=2, num_generations=3, max_completion_length=6, device="cpu",
                        truncated="lenient", shuffle_rewards=True), out, log=QUIET)
    record = read_json(out / "train.json")
    assert record["settings"]["shuffle_rewards"] and "rewards permuted within each step" in record["conventions"]["algorithm"]
    assert any("rewards/shuffled_circuitdiff_reward/mean" in h for h in record["log_history"])
    assert_lora_trained(out / "checkpoint-1", str(world.base), world.base_weights)
