"""Keys: what made an artifact, so that a rerun skips work that is up to date and redoes the rest.

A stage computes the key of an output from the settings that change it and the keys of its
inputs (`settings_key`), writes the output atomically, then its key file (layout.key_file):

    {"key": "<16 hex>", "sha256": "<of the artifact's bytes>", "settings": {...}}

An output is up to date when its key file holds the same key and the artifact's bytes still
hash to the recorded checksum; a damaged artifact (truncated, overwritten) is recomputed.
Settings that do not change a result (batch sizes, device, progress bars) are never part of
a key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from circuitdiff import io
from circuitdiff.store.layout import key_file


def settings_key(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_key(artifact: Path, key: str, settings: dict | None = None) -> Path:
    """Record the key (and checksum) of an artifact that was just written."""
    record = {"key": key, "sha256": file_sha256(artifact), "settings": settings or {}}
    return io.write_json(key_file(artifact), record)


def read_key(artifact: Path) -> str | None:
    """The key recorded for an artifact, or None (no key file, or an unreadable one)."""
    path = key_file(artifact)
    try:
        record = io.read_json(path)
    except (OSError, io.DamagedFile):
        return None
    return record.get("key") if isinstance(record, dict) else None


def up_to_date(artifact: Path, key: str, log: Callable[[str], None] | None = None) -> bool:
    """True when the artifact exists, was made with `key`, and its bytes match the recorded checksum."""
    artifact = Path(artifact)
    if not artifact.exists():
        return False
    try:
        record = io.read_json(key_file(artifact))
    except (OSError, io.DamagedFile):  # no key, or a damaged one: the artifact cannot be trusted
        return False
    if not isinstance(record, dict) or record.get("key") != key:
        return False
    if "settings" in record and settings_key(record["settings"]) != key and record["settings"]:
        return False  # the key file itself was damaged: what it says made the artifact no longer hashes to its key
    if record.get("sha256") != file_sha256(artifact):
        if log is not None:
            log(f"{artifact} does not match its recorded checksum (damaged); recomputing it")
        return False
    return True
