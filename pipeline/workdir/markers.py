"""Completion markers, one JSON line per finished tensor, appended to this process's log in
``done/`` (``markers-<host>-<pid>.jsonl``); a line ``"removed": true`` withdraws a key's marker
(its result is being recomputed).

A log, not a file per tensor: every new file costs an inode, 0.5 ms apiece on this project's
VM (no-journal ext4 scans past the inodes a previous run deleted: 13% of a 1.3B merge's CPU
samples, 0.5 of its CPU-seconds) and a server round trip on NFS, and a 14B model has over
1,000 tensors.

Each process appends to its own log (so processes on several hosts never interleave), threads
one whole line per ``os.write`` under a lock. Lines carry the time they were written: reading
applies every log's lines in that order, so a later run's withdrawal or marker wins over an
earlier run's. A torn last line (a process killed while writing) is skipped: that tensor is
simply recomputed. Marker files of an older loraforge (``done/<key>.json``) are read as the
oldest lines."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time

from .own import entry_name, is_marker_log

_lock = threading.Lock()
_open: dict[str, tuple[int, int]] = {}  # log path -> (fd, inode), this process's


def log_name() -> str:
    """This process's log: host and pid keep processes sharing a work directory apart."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return f"markers-{host}-{os.getpid()}.jsonl"


def append(done: str, key: str, record: dict) -> None:
    """``key``'s marker ``record`` (``{"removed": True}`` withdraws it) as one line of this
    process's log in ``done``."""
    line = json.dumps({**record, "key": key, "at": time.time_ns()}, sort_keys=True) + "\n"
    data = line.encode()
    path = os.path.join(done, log_name())
    with _lock:
        fd = _log_fd(path)
        written = os.write(fd, data)
    if written != len(data):  # a regular file takes it all, short of a full disk
        raise OSError(errno.ENOSPC, "No space left on device", path)


def _log_fd(path: str) -> int:
    """The open log at ``path``; reopened when the file there is another (a work directory
    cleared and made again since), a torn last line first ended."""
    cached = _open.get(path)
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        inode = None
    if cached is not None and cached[1] == inode:
        return cached[0]
    if cached is not None:
        os.close(cached[0])
        del _open[path]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    size = os.fstat(fd).st_size
    if size and _last_byte(path, size) != b"\n":
        os.write(fd, b"\n")
    _open[path] = (fd, os.fstat(fd).st_ino)
    return fd


def _last_byte(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_all(done: str) -> dict[str, dict]:
    """Every key's marker now: legacy marker files first, then the logs' lines in the order
    they were written (a withdrawal drops the key)."""
    try:
        names = sorted(os.listdir(done))
    except FileNotFoundError:
        return {}
    lines: list[tuple[int, str, int, dict]] = []
    for name in names:
        path = os.path.join(done, name)
        if is_marker_log(name):
            lines.extend((at, name, i, record) for i, (at, record) in enumerate(_records(path)))
        elif name.endswith(".json") and (record := _legacy_record(path)) is not None:
            lines.append((0, "", 0, record))
    markers: dict[str, dict] = {}
    for _at, _name, _i, record in sorted(lines, key=lambda line: line[:3]):
        if record.get("removed"):
            markers.pop(record["key"], None)
        else:
            markers[record["key"]] = record
    return markers


def _legacy_record(path: str) -> dict | None:
    """An older loraforge's marker file ``<entry>.json``, when it is one and reads whole."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    key = record.get("key") if isinstance(record, dict) else None
    if not isinstance(key, str) or entry_name(key) + ".json" != os.path.basename(path):
        return None
    return record


def _records(path: str):
    """(time, record) per whole, well-formed line of a log."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # empty, or torn by a killed process
        if isinstance(record, dict) and isinstance(record.get("key"), str):
            at = record.pop("at", 0)
            yield (at if isinstance(at, int) else 0), record


def close_logs(done: str | None = None) -> None:
    """Close this process's open logs in ``done`` (all of them: None), as a run ends or its
    work directory is cleared; the next line reopens its log."""
    with _lock:
        for path in [p for p in _open if done is None or os.path.dirname(p) == done]:
            os.close(_open.pop(path)[0])
