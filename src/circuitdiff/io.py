"""Atomic file writes and small readers shared by every pipeline stage.

Every stage writes through these helpers: the data goes to a temporary file in
the same directory, is flushed to disk, then renamed over the target. A run
killed mid-write therefore leaves either the old file or the new one, never a
truncated one. Files can still be damaged from outside (a full disk, an editor, a
copy cut short): the readers say which file and line, in one UserError line
(`DamagedFile`), instead of a traceback or a silently shorter table. The one damage
a kill can leave, a cut-off LAST line of an appended JSONL, is expected and ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from circuitdiff.errors import UserError


class DamagedFile(UserError):
    """A file circuitdiff wrote earlier cannot be read back as what it should be."""


# ---------------------------------------------------------------- fault injection (tests only)
# Every write passes two kill points (after the data is on disk under a temporary name, and after
# the rename; for an append: after half a row, and after the rows). With CIRCUITDIFF_KILL_AT=N the
# process kills itself (SIGKILL, no cleanup) at the N-th point; with CIRCUITDIFF_FAULT_LOG=FILE it
# lists every point it passes ("N<TAB>what<TAB>path"). Both unset (always, outside tests): nothing.
_KILL_AT = int(os.environ.get("CIRCUITDIFF_KILL_AT", "0") or 0)
_FAULT_LOG = os.environ.get("CIRCUITDIFF_FAULT_LOG")
_points = [0]


def _kill_point(what: str, path: Path) -> None:
    if not (_KILL_AT or _FAULT_LOG):
        return
    _points[0] += 1
    if _FAULT_LOG:
        with open(_FAULT_LOG, "a", encoding="utf-8") as f:
            f.write(f"{_points[0]}\t{what}\t{path}\n")
    if _points[0] == _KILL_AT:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_open(path: Path, mode: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any other file
    return os.fdopen(fd, mode), Path(tmp)


def _finish(handle, tmp: Path, path: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    _kill_point("written under a temporary name", path)
    os.replace(tmp, path)
    _kill_point("renamed into place", path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    handle, tmp = _atomic_open(path, "wb")
    try:
        handle.write(data)
        _finish(handle, tmp, path)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)
    return write_text(path, text)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    path = Path(path)
    handle, tmp = _atomic_open(path, "wb")
    try:
        np.savez_compressed(handle, **arrays)
        _finish(handle, tmp, path)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a damaged one (cut off, overwritten, not UTF-8) is a DamagedFile naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} is not valid JSON ({str(err).splitlines()[0]}): the file is damaged; delete it and "
                          "run the command again to rebuild it") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DamagedFile(f"{path} line {number}: not valid JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DamagedFile(f"{path} line {number}: not a JSON object; fix or remove that line")
            yield row


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync; a partial last line (killed mid-append) is dropped by `read_jsonl_tolerant`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            line = json.dumps(row, default=_json_default) + "\n"
            if i == 0 and (_KILL_AT or _FAULT_LOG):  # a kill mid-append leaves half a line
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
                _kill_point("half a row appended", path)
                line = line[len(line) // 2 :]
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    _kill_point("rows appended", path)


def read_jsonl_rows(path: str | os.PathLike, valid=None) -> tuple[list[dict], int | None]:
    """(rows, first damaged line) of a file written by `append_jsonl`.

    The rows are those before the first damaged line (None: no damage). A last line without its
    newline is what a kill mid-append leaves: it is dropped and is not damage. Any other line that
    is not a JSON object (bad bytes, cut in the middle of the file, a number), or that `valid(row)`
    refuses (a row's own checksum, its fields), is damage.
    """
    path = Path(path)
    if not path.exists():
        return [], None
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines.pop()  # after the last newline: b"" when the file ends cleanly, else a line cut off by a kill
    rows = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return rows, number
        if not isinstance(row, dict) or (valid is not None and not valid(row)):
            return rows, number
        rows.append(row)
    return rows, None


def read_jsonl_tolerant(path: str | os.PathLike, valid=None) -> list[dict]:
    """Rows of a file written by `append_jsonl`: a cut-off last line is ignored, any other damage is a
    DamagedFile naming the file and the line (never a silently shorter table)."""
    rows, damaged = read_jsonl_rows(path, valid)
    if damaged is not None:
        raise DamagedFile(f"{path} line {damaged} is damaged (not a JSON object with the fields of a row, or not matching "
                          "its checksum); the rows after it cannot be trusted: "
                          "restore the file, or delete it from that line on and rerun the stage that wrote it")
    return rows


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
