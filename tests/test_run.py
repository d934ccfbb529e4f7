"""`circuitdiff run`: config validation, presets, the whole pipeline on tiny models, and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from circuitdiff.store import layout
from circuitdiff.attribute import Attribution, attribute
from circuitdiff.cli import main as cli_main
from circuitdiff.config import RunConfig, load_config, parse_config, preset_names
from circuitdiff.errors import UserError
from circuitdiff.decoding import HFBackend
from circuitdiff.io import read_jsonl_tolerant as read_rows
from circuitdiff.grade import extract_answer, is_correct
from circuitdiff.io import read_json
from circuitdiff.models import load_model
from circuitdiff.prompts import encode
from circuitdiff.pipeline import RunContext, run_stages
from pipeline_helpers import save_tiny_lm, write_gsm8k_file

N_QUESTIONS, MAX_NEW = 12, 16
WRONG = "123456789"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny models that share their weights except the EOS row: the same digits, other lengths."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_lm(root / "base", seed=0, eos_scale=3.0), save_tiny_lm(root / "tuned", seed=0, eos_scale=3.5)


def questions(n):
    return [f"Question {i}: what is {i} plus {2 * i}?" for i in range(n)]


def oracle_generate(model_dir, qs):
    loaded = load_model(str(model_dir), "float64")
    prompts = [encode(q, loaded.tokenizer, "chat") for q in qs]
    gens = HFBackend(loaded.model, loaded.tokenizer, MAX_NEW).generate(prompts)
    texts = [loaded.tokenizer.decode(g.answer_ids, skip_special_tokens=True) for g in gens]
    return prompts, gens, [extract_answer(t) for t in texts]


@pytest.fixture(scope="module")
def world(pair, tmp_path_factory):
    """A dataset whose gold is the base model's own answer on most questions (computed outside the pipeline)."""
    root = tmp_path_factory.mktemp("data")
    qs = questions(N_QUESTIONS)
    prompts, base_gens, base_pred = oracle_generate(pair[0], qs)
    _, tuned_gens, tuned_pred = oracle_generate(pair[1], qs)
    golds = [p.replace(",", "") if p is not None and i % 4 != 3 else WRONG for i, p in enumerate(base_pred)]
    data = write_gsm8k_file(root / "qa.jsonl", golds, qs)
    both = {i for i in range(N_QUESTIONS)
            if is_correct(base_pred[i], golds[i]) and is_correct(tuned_pred[i], golds[i])}
    assert 3 <= len(both) < N_QUESTIONS, "the tiny models must leave something to select"
    return {"data": data, "prompts": prompts, "base": base_gens, "tuned": tuned_gens, "both": both}


def make_config(pair, data, **over) -> RunConfig:
    """The tiny random models stop at their token cap on most questions: these pipeline tests grade cut answers
    by their text (lenient) and select without the finished filter; test_strict_grading_and_the_finished_filter
    runs the defaults."""
    cfg = {
        "name": "tiny",
        "base": str(pair[0]),
        "tuned": str(pair[1]),
        "datasets": [{"name": "gsm8k", "source": str(data)}],
        "alphas": [0.1, 0.5],
        "n_samples": 5,
        "seed": 3,
        "selection": {"delta": 0.9, "require_finished": False},
        "grading": {"truncated": "lenient"},
        "dtype": "float64",
        "max_new_tokens": MAX_NEW,
        "gen_batch_size": 4,
        "attr_batch_size": 5,
    }
    cfg.update(over)
    return parse_config(cfg)


def test_full_pipeline_then_rerun_skips_everything(pair, world, tmp_path):
    run = tmp_path / "run"
    log1 = []
    run_stages(RunContext(make_config(pair, world["data"]), run, progress=False, log=log1.append))

    # generations: the answers the models give outside the pipeline, with grades
    for role in layout.ROLES:
        rows = sorted(read_rows(layout.generations(run, role, "gsm8k")), key=lambda r: r["idx"])
        assert [r["idx"] for r in rows] == list(range(N_QUESTIONS))
        assert [r["answer_ids"] for r in rows] == [g.answer_ids for g in world[role]]
        assert [r["prompt_ids"] for r in rows] == world["prompts"]
        meta = read_json(layout.generations_meta(run, role, "gsm8k"))
        assert meta["accuracy"]["total"] == N_QUESTIONS and "Wilson" in meta["accuracy"]["interval"]
    assert {r["idx"] for r in read_rows(layout.generations(run, "base", "gsm8k")) if r["correct"]} >= world["both"]

    models = {role: load_model(str(path), "float64") for role, path in zip(layout.ROLES, pair)}
    for alpha in (0.1, 0.5):
        sel = read_json(layout.selection(run, "gsm8k", alpha))
        assert sel["counts"]["both_correct"] == len(world["both"])
        assert set(sel["idx"]) <= world["both"] and len(sel["idx"]) == min(5, sel["counts"]["cut"])
        assert sel["settings"]["length_rule"] == "paper" and sel["settings"]["delta"] == 0.9
        # attribution: the engine on samples rebuilt from the oracle generations
        for role in layout.ROLES:
            W = Attribution.load(layout.attribution(run, role, "gsm8k", alpha))
            samples = [{"prompt_ids": world["prompts"][i], "answer_ids": world[role][i].answer_ids,
                        "cut_len": sel["T_cut"]} for i in sel["idx"]]
            direct = attribute(models[role], samples, batch_size=5)
            np.testing.assert_allclose(W.scores, direct.scores.astype(np.float32), rtol=1e-6, atol=1e-9)
            assert np.abs(W.scores).sum() > 0
            assert W.meta["alpha"] == alpha and W.meta["idx"] == sel["idx"] and W.meta["T_cut"] == sel["T_cut"]

    manifest = read_json(layout.manifest(run))
    assert manifest["packages"]["torch"] and manifest["packages"]["transformers"]
    assert manifest["models"]["base"]["info"]["dtype"] == "float64"
    assert manifest["conventions"]["selection"]["length_rule"] == "paper"
    assert manifest["conventions"]["prompt"]["base"]["preset"] == "chat"
    assert manifest["seeds"]["selection_draw"] == 3
    assert manifest["accuracy"]["tuned"]["gsm8k"]["total"] == N_QUESTIONS
    assert manifest["finished_stage"] == "attribute"

    # a rerun does nothing: nothing loaded, nothing rewritten
    outputs = [p for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"]
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    log2 = []
    loads = []
    ctx = RunContext(make_config(pair, world["data"]), run, progress=False, log=log2.append)
    ctx.models.on_load = lambda role, loaded: loads.append(role)
    run_stages(ctx)
    assert loads == [] and not any("wrote" in line or "re-graded" in line for line in log2)
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps

    # a new alpha adds its files and leaves the others alone
    log3 = []
    run_stages(RunContext(make_config(pair, world["data"], alphas=[0.1, 0.5, 0.3]), run, progress=False, log=log3.append))
    assert layout.attribution(run, "base", "gsm8k", 0.3).exists()
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
    assert sum("wrote" in line for line in log3) == 2  # base and tuned at alpha 0.3 only

    # a changed generation setting cannot silently mix answers
    with pytest.raises(UserError, match="changed: max_new_tokens"):
        run_stages(RunContext(make_config(pair, world["data"], max_new_tokens=MAX_NEW + 1), run, progress=False, log=print))

    # a lost output is recomputed, identically, and nothing else is
    path = layout.attribution(run, "tuned", "gsm8k", 0.5)
    before = Attribution.load(path).scores
    path.unlink()
    log4 = []
    run_stages(RunContext(make_config(pair, world["data"]), run, progress=False, log=log4.append))
    assert sum("wrote" in line for line in log4) == 1
    np.testing.assert_array_equal(Attribution.load(path).scores, before)

    # a damaged output (cut off) is detected by its checksum and recomputed, identically
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    log5 = []
    run_stages(RunContext(make_config(pair, world["data"]), run, progress=False, log=log5.append))
    assert sum("damaged" in line for line in log5) == 1 and sum("wrote" in line for line in log5) == 1
    np.testing.assert_array_equal(Attribution.load(path).scores, before)


def test_strict_grading_and_the_finished_filter(pair, world, tmp_path):
    """The defaults: an answer cut at the cap without a \\boxed{} answer is wrong, and selection keeps only
    questions both models finished; the answers are those of the lenient run, only the grades differ."""
    run = tmp_path / "run"
    cfg = make_config(pair, world["data"], selection={"delta": 0.9}, grading={"truncated": "strict"})
    with pytest.raises(UserError) as err:
        run_stages(RunContext(cfg, run, progress=False, log=lambda *_: None), until="select")
    rows = {role: read_rows(layout.generations(run, role, "gsm8k")) for role in layout.ROLES}
    for role in layout.ROLES:
        assert [r["answer_ids"] for r in sorted(rows[role], key=lambda r: r["idx"])] == [g.answer_ids for g in world[role]]
        for r in rows[role]:
            cut = r["stop"] == "length" and "\\boxed" not in r["answer_text"]
            assert r["truncated"] == cut
            assert r["correct"] == (not cut and is_correct(extract_answer(r["answer_text"]), r["gold"]))
    both = {r["idx"] for r in rows["base"] if r["correct"]} & {r["idx"] for r in rows["tuned"] if r["correct"]}
    finished = {r["idx"] for r in rows["base"] if r["stop"] == "eos"} & {r["idx"] for r in rows["tuned"] if r["stop"] == "eos"}
    step = "both_correct" if not both else "finished"
    assert not both & finished and f"survives the {step} filter" in str(err.value)


def test_same_text_scores_both_models_on_identical_tokens(pair, world, tmp_path):
    """text: both, objective: nll and logit. Each same-text W file equals `attribute` of that model on the other
    model's prompt + answer tokens; the report compares them beside the own-text pairs."""
    from circuitdiff.report import Settings, build_report

    run = tmp_path / "run"
    cfg = make_config(pair, world["data"], text="both", objective=["nll", "logit"], alphas=[0.1])
    run_stages(RunContext(cfg, run, progress=False, log=lambda *_: None))
    sel = read_json(layout.selection(run, "gsm8k", 0.1))
    models = {role: load_model(str(path), "float64") for role, path in zip(layout.ROLES, pair)}
    rows = {role: {r["idx"]: r for r in read_rows(layout.generations(run, role, "gsm8k"))} for role in layout.ROLES}
    for objective in ("nll", "logit"):
        for model, text in (("tuned", "base"), ("base", "tuned"), ("tuned", "tuned")):
            W = Attribution.load(layout.attribution(run, model, "gsm8k", 0.1, text, objective))
            samples = [{"prompt_ids": rows[text][i]["prompt_ids"], "answer_ids": rows[text][i]["answer_ids"],
                        "cut_len": sel["T_cut"]} for i in sel["idx"]]
            direct = attribute(models[model], samples, objective=objective)
            np.testing.assert_allclose(W.scores, direct.scores.astype(np.float32), rtol=1e-6, atol=1e-9)
            assert W.meta["text"] == text and W.meta["objective"] == objective and W.meta["role"] == model
    out = build_report(run, Settings(n_boot=200, n_perm=200, entries=("edges",)))
    with open(out / "metrics.csv") as f:
        import csv

        comparisons = {(r["objective"], r["text"]) for r in csv.DictReader(f)}
    assert comparisons == {(o, t) for o in ("nll", "logit") for t in ("own", "base", "tuned")}
    html = (out / "report.html").read_text()
    assert "Same text" in html and "both models on the base model&#x27;s answers" in html


def test_a_second_method_adds_its_files_and_keeps_the_eap_ones(pair, world, tmp_path):
    """method: [eap, eap-ig] after a run with eap only: the EAP files stay up to date (their keys name no method),
    the EAP-IG files equal `attribute(method="eap-ig")` on the same samples, and the report compares both."""
    import csv

    from circuitdiff.config import override
    from circuitdiff.report import Settings, build_report

    run = tmp_path / "run"
    cfg = make_config(pair, world["data"], alphas=[0.1])
    run_stages(RunContext(cfg, run, progress=False, log=lambda *_: None))
    log = []
    run_stages(RunContext(override(cfg, {"method": ["eap", "eap-ig"], "ig_steps": 2}), run, progress=False,
                          log=log.append))
    assert any("method=eap: up to date" in line for line in log)
    sel = read_json(layout.selection(run, "gsm8k", 0.1))
    rows = {r["idx"]: r for r in read_rows(layout.generations(run, "tuned", "gsm8k"))}
    samples = [{"prompt_ids": rows[i]["prompt_ids"], "answer_ids": rows[i]["answer_ids"], "cut_len": sel["T_cut"]}
               for i in sel["idx"]]
    W = Attribution.load(layout.attribution(run, "tuned", "gsm8k", 0.1, objective="nll", method="eap-ig2"))
    direct = attribute(load_model(str(pair[1]), "float64"), samples, method="eap-ig", ig_steps=2)
    np.testing.assert_allclose(W.scores, direct.scores.astype(np.float32), rtol=1e-6, atol=1e-9)
    assert W.meta["method"] == "eap-ig2" and "Riemann midpoint" in W.meta["method_definition"]
    assert set(read_json(layout.manifest(run))["conventions"]["attribution"]["method"]) == {"eap", "eap-ig2"}
    out = build_report(run, Settings(n_boot=200, n_perm=200, entries=("edges",)))
    with open(out / "metrics.csv") as f:
        assert {(r["objective"], r["method"]) for r in csv.DictReader(f)} == {("nll", "eap"), ("nll", "eap-ig2")}
    with pytest.raises(UserError, match="ig_steps"):
        override(cfg, {"method": ["eap-ig"], "ig_steps": 0})
    with pytest.raises(UserError, match="method"):
        override(cfg, {"method": ["eap", "eap"]})


def test_same_text_needs_the_other_models_answers(pair, world, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(pair, world["data"], text="base", alphas=[0.1])
    ctx = RunContext(cfg, run, progress=False, log=lambda *_: None)
    run_stages(ctx, until="select")
    layout.generations(run, "base", "gsm8k").unlink()
    from circuitdiff.stages import attribute as attribute_stage

    with pytest.raises(UserError, match="run the generate stage first"):
        attribute_stage.attribute_one(ctx, "tuned", "base", cfg.datasets[0], 0.1)


def test_self_pair_copies_the_answers(pair, world, tmp_path):
    run = tmp_path / "run"
    log = []
    cfg = make_config(pair, world["data"], tuned=str(pair[0]), alphas=[0.1])
    run_stages(RunContext(cfg, run, progress=False, log=log.append), until="select")
    assert any("copied" in line for line in log)
    base = read_rows(layout.generations(run, "base", "gsm8k"))
    assert sorted(map(json.dumps, base)) == sorted(map(json.dumps, read_rows(layout.generations(run, "tuned", "gsm8k"))))
    sel = read_json(layout.selection(run, "gsm8k", 0.1))
    assert sel["counts"]["both_correct"] == sum(r["correct"] for r in base)


def test_kill_during_generation_then_resume(pair, tmp_path):
    """Kill `circuitdiff run` (SIGKILL) in the middle of generation; the rerun finishes with the same rows."""
    qs = questions(24)
    data = write_gsm8k_file(tmp_path / "qa24.jsonl", ["1"] * 24, qs)
    cfg = make_config(pair, data, gen_batch_size=2, tuned=str(pair[0])).model_dump(mode="json")
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "circuitdiff", "run", str(config_path), "--out", str(run),
                             "--until", "grade", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = layout.generations(run, "base", "gsm8k")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and len(read_rows(target)) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(read_rows(target))
    assert 4 <= done_at_kill < 24

    log = []
    run_stages(RunContext(parse_config(cfg), run, progress=False, log=log.append), until="grade")
    assert any(f"{24 - done_at_kill} of 24 questions" in line for line in log)
    prompts, gens, _ = oracle_generate(pair[0], qs)
    for role in layout.ROLES:
        got = sorted(read_rows(layout.generations(run, role, "gsm8k")), key=lambda r: r["idx"])
        assert [r["idx"] for r in got] == list(range(24))
        assert [r["answer_ids"] for r in got] == [g.answer_ids for g in gens]
        assert [r["prompt_ids"] for r in got] == prompts
    assert read_json(layout.manifest(run))["finished_stage"] == "grade"


# ---------------------------------------------------------------- config

def test_presets_validate():
    names = preset_names()
    assert {"deepseek-math-grpo", "mistral-ppo", "qwen-distill-grpo", "qwen25-dpo", "smoke"} <= set(names)
    specs = {n: load_config(n) for n in names}
    assert specs["deepseek-math-grpo"].tuned.spec == "deepseek-ai/deepseek-math-7b-rl"
    assert specs["deepseek-math-grpo"].prompt == "deepseek"
    assert specs["mistral-ppo"].prompt == "mistral"
    assert specs["qwen25-dpo"].prompt == "qwen-chatml"
    assert specs["qwen-distill-grpo"].tuned.spec == "nvidia/AceReason-Nemotron-7B"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"alphas": [0.1, 1.5]}, "alphas: Value error, alpha 1.5"),
        ({"prompt": "alpaca"}, "unknown prompt preset"),
        ({"datasets": ["gsm9k"]}, "datasets.0.name"),
        ({"datasets": ["gsm8k", "gsm8k"]}, "repeat"),
        ({"selection": {"length_rule": "mine"}}, "selection.length_rule"),
        ({"gen_batch_size": 0}, "gen_batch_size"),
        ({"temperature": 0.7}, "temperature: Extra inputs are not permitted"),
        ({"objective": "ce"}, "objective.0: Input should be 'nll' or 'logit'"),
        ({"objective": ["nll", "nll"]}, "objective repeats"),
        ({"text": "mine"}, "text: Input should be 'own', 'base', 'tuned' or 'both'"),
        ({"grading": {"truncated": "kind"}}, "grading.truncated"),
        ({"base": None}, "base"),
    ],
)
def test_config_errors_are_one_line(change, words):
    cfg = {"base": "a/b", "tuned": "a/c", "datasets": ["gsm8k"], **change}
    with pytest.raises(UserError) as err:
        parse_config(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_config_shorthands():
    cfg = parse_config({"base": {"spec": "a/b", "prompt": "mistral"}, "tuned": "a/c",
                        "datasets": ["gsm8k", {"name": "math_oai"}, {"name": "gsm8k", "split": "train", "limit": 5}]})
    assert cfg.prompt_for("base") == "mistral" and cfg.prompt_for("tuned") == "chat"
    assert [d.key for d in cfg.datasets] == ["gsm8k", "math500", "gsm8k_train"]


def test_cli_reports_bad_config(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: a/b\ntuned: [\n")
    assert cli_main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_alpha_tag():
    assert layout.alpha_tag(0.1) == "alpha=0.1" and layout.alpha_tag(0.03) == "alpha=0.03"
    assert layout.selection(Path("r"), "gsm8k", 0.5) == Path("r/selection/gsm8k/alpha=0.5.json")
    assert layout.attribution(Path("r"), "base", "math", 0.1) == Path("r/attribution/nll/base/math/alpha=0.1.npz")
    assert layout.attribution(Path("r"), "tuned", "math", 0.1, "base", "logit") == Path(
        "r/attribution/logit/tuned-on-base/math/alpha=0.1.npz")
    assert layout.parse_view("tuned-on-base") == ("tuned", "base") and layout.parse_view("base") == ("base", "base")
    assert layout.parse_view("x-on-base") is None


def test_vllm_backend_without_vllm_is_a_clear_error(pair, world, tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed: the import guard is not exercised")
    with pytest.raises(UserError, match="pip install vllm"):
        run_stages(RunContext(make_config(pair, world["data"], backend="vllm"), tmp_path / "v", progress=False, log=print))
