"""circuitdiff.parallel without a cluster: shard planning, and the one-line errors before any work."""

import random
import socket
import sys

import pytest

from circuitdiff.attribute import plan_batches
from circuitdiff.cli import main as cli_main
from circuitdiff.config import parse_config
from circuitdiff.errors import UserError
from circuitdiff.parallel.plan import batches_by_length, in_batch_order, n_shards_for, padded_cost, plan_shards
from circuitdiff.parallel.pool import Pool, check_address, import_ray


def _random_lengths(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 60), rng.randint(200, 900)]) for _ in range(n)]


@pytest.mark.parametrize("seed,n,batch,workers", [(0, 1, 1, 2), (1, 7, 3, 2), (2, 100, 1, 2), (3, 183, 32, 4),
                                                  (4, 57, 4, 3), (5, 400, 8, 16)])
def test_every_sample_in_exactly_one_shard_as_whole_one_process_batches(seed, n, batch, workers):
    lengths = _random_lengths(seed, n)
    batches = batches_by_length(lengths, batch)
    shards = plan_shards(batches, [padded_cost(b, lengths) for b in batches], n_shards_for(len(batches), workers))
    items = sorted(i for shard in shards for i in shard.items)
    assert items == list(range(n))  # every sample once
    # the shards hold the one-process batches themselves, unchanged
    assert sorted(b for shard in shards for b in shard.batches) == sorted(tuple(b) for b in batches)
    # the one-process order, rebuilt from the shards
    rebuilt = [shards[s].batches[j] for s, j in in_batch_order(shards, batches)]
    assert rebuilt == [tuple(b) for b in batches]
    assert [s.number for s in shards] == list(range(len(shards)))
    assert [s.cost for s in shards] == sorted((s.cost for s in shards), reverse=True)  # the queue's order


@pytest.mark.parametrize("seed", range(6))
def test_shards_are_balanced_by_length(seed):
    """LPT bound: no shard exceeds the mean shard cost by more than the costliest batch; a naive contiguous split
    of the length-sorted batches is far worse (the first shard takes every long sample)."""
    lengths = _random_lengths(seed, 240)
    batches = batches_by_length(lengths, 4)
    costs = [padded_cost(b, lengths) for b in batches]
    n_shards = 8
    shards = plan_shards(batches, costs, n_shards)
    total = sum(costs)
    assert sum(s.cost for s in shards) == pytest.approx(total)
    mean = total / n_shards
    assert max(s.cost for s in shards) <= mean + max(costs) + 1e-9
    assert max(s.cost for s in shards) / min(s.cost for s in shards) < 1.25
    per = len(batches) // n_shards
    contiguous = [sum(costs[i : i + per]) for i in range(0, len(costs), per)]
    assert max(contiguous) > 1.5 * max(s.cost for s in shards)


def test_padded_cost_counts_the_padding_and_the_new_tokens():
    lengths = [10, 3, 7]
    assert padded_cost([0, 1, 2], lengths) == 30  # 3 rows x the longest (10)
    assert padded_cost([1, 2], lengths, extra=64) == 2 * (7 + 64)


def test_attribution_batches_are_the_one_process_order():
    """Longest (prompt + cut) first, ties in sample order: what attribute() has always run."""
    samples = [{"prompt_ids": [1] * p, "answer_ids": [2] * 9, "cut_len": c} for p, c in
               [(3, 2), (5, 1), (2, 3), (4, 4), (6, 1), (3, 2)]]
    lengths = [len(s["prompt_ids"]) + s["cut_len"] for s in samples]
    expected = sorted(range(6), key=lambda i: -lengths[i])  # stable: ties keep sample order
    assert plan_batches(samples, 4) == [expected[:4], expected[4:]]


def test_more_shards_than_batches_is_one_shard_per_batch():
    shards = plan_shards([[0], [1]], [5.0, 9.0], 8)
    assert [s.batches for s in shards] == [((1,),), ((0,),)]


# ---------------------------------------------------------------- errors before any work
def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UserError) as err:
        import_ray()
    assert 'pip install "circuitdiff[ray]"' in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"circuitdiff\[ray\]"):
        Pool(2).open()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_address_is_one_line_with_the_fix():
    port = _closed_port()
    with pytest.raises(UserError) as err:
        check_address(f"127.0.0.1:{port}")
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "ray start --head" in message and "\n" not in message
    for bad in ("nohost", "host:port", ":6379"):
        with pytest.raises(UserError, match="expected HOST:PORT"):
            check_address(bad)


def test_cli_unreachable_address_and_bad_workers(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"prompt_ids": [1, 2], "answer_ids": [3], "cut_len": 1}\n')
    port = _closed_port()
    base = ["attribute", "--model", "smollm2-135m-instruct", "--samples", str(samples), "--out", str(tmp_path / "W.npz")]
    assert cli_main(base + ["--workers", "2", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach a Ray cluster" in err
    assert cli_main(base + ["--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert cli_main(base + ["--ray-address", f"127.0.0.1:{port}"]) == 2  # an address without workers
    assert "--workers N" in capsys.readouterr().err
    assert not (tmp_path / "W.npz").exists()


def test_parallel_config_section():
    base = {"base": "a/b", "tuned": "a/c", "datasets": ["gsm8k"]}
    cfg = parse_config({**base, "parallel": {"workers": 4, "address": "10.0.0.1:6379"}})
    assert cfg.parallel.engine == "ray" and cfg.parallel.gpus("cuda") == 1 and cfg.parallel.gpus("cpu") == 0
    assert parse_config({**base, "parallel": {"workers": 2, "gpus_per_worker": 2}}).parallel.gpus("cpu") == 2
    for bad, words in (({"workers": 0}, "parallel.workers"), ({"engine": "dask"}, "parallel.engine"),
                       ({"threads": 2}, "parallel.threads")):
        with pytest.raises(UserError, match=words):
            parse_config({**base, "parallel": bad})
