"""Atomic writes: complete files or none, ordinary permissions, tolerant appends."""

import os
import stat

import numpy as np
import pytest

from circuitdiff import io


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "a" / "x.json"
    io.write_json(path, {"b": np.float32(1.5), "a": [1, 2]})
    assert io.read_json(path) == {"a": [1, 2], "b": 1.5}
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~io._umask()
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    io.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        io.write_json(path, {"v": object()})
    assert io.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_tolerant_reader_drops_an_unfinished_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    io.append_jsonl(path, [{"i": 0}, {"i": 1}])
    with open(path, "a") as f:
        f.write('{"i": 2, "text": "cut sho')
    assert io.read_jsonl_tolerant(path) == [{"i": 0}, {"i": 1}]


def test_npz_roundtrip(tmp_path):
    path = io.write_npz(tmp_path / "w.npz", scores=np.arange(6.0).reshape(1, 2, 3))
    with np.load(path) as data:
        assert data["scores"].shape == (1, 2, 3)
