"""`tidal batch`'s output file: what OUT already answers, and appending to it safely.

Owns: reading OUT for resume (`scan_output`: the custom_ids, duplicate-error records and id-less
line numbers it already holds, cutting a torn last line left by a crash) and `_Writer`, which
holds an exclusive lock on OUT, appends each record with one write and fsyncs every few seconds.
Must not: read the input, validate requests or talk to the engine (batch.py and
batch_requests.py do those).
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter

from tidal.errors import TidalError

_DUPLICATE = "duplicate_custom_id"
_FSYNC_EVERY_S = 2.0   # a crash loses at most this much finished work to the page cache


class Done:
    """What OUT already answers: custom_ids, duplicate-error counts, and input lines without an id."""

    def __init__(self):
        self.ids: set[str] = set()
        self.duplicates: Counter = Counter()
        self.lines: set[int] = set()
        self.records = 0


def scan_output(path: str) -> Done:
    """Read OUT, cutting a torn last line (a crash mid-write) so the next record starts on a line of its own."""
    done = Done()
    if not os.path.exists(path):
        return done
    good_end = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                rec = None
            if rec is None and f.read(1):   # only the last line can be torn; anything else is damage
                raise TidalError(f"{path} line {lineno} is not a complete JSON record, so it is not a tidal batch "
                                 "output (or it was damaged); move it away or repair that line")
            if rec is None:
                break
            if not isinstance(rec, dict) or "custom_id" not in rec:
                raise TidalError(f"{path} line {lineno} has no custom_id; it is not a batch output file")
            good_end += len(raw)
            done.records += 1
            cid, err = rec["custom_id"], rec.get("error") or {}
            if err.get("code") == _DUPLICATE:
                done.duplicates[cid] += 1
            elif cid is not None:
                done.ids.add(cid)
            elif isinstance(err.get("line"), int):
                done.lines.add(err["line"])
    if good_end < os.path.getsize(path):
        os.truncate(path, good_end)
    return done


class _Writer:
    """Appends whole records with one write each (a kill leaves at most one torn line) and fsyncs
    every few seconds and at close. Holds an exclusive lock on OUT: two runs appending to one file
    would answer lines twice. The kernel drops the lock when the process dies, even by kill -9."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TidalError(f"another `tidal batch` is writing {path}; wait for it or stop it first")
        self.last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data):]
        if time.monotonic() - self.last_sync > _FSYNC_EVERY_S:
            os.fsync(self.fd)
            self.last_sync = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
