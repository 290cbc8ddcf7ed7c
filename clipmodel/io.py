"""Atomic file output: write beside the target, then rename, so a crash never leaves half a file, and
the next write of the same target removes what a killed writer left beside it. A claim keeps a second
process from writing the same file at all."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) that replaces `path` on success.

    Whatever the body raises propagates, with the temporary removed and `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keep the suffix: np.save appends one
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries a killed writer of `path` left (`.{stem}.tmp-PID{suffix}` whose PID is gone);
    a live process's are kept. Returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):
        pid = tmp.name[len(f".{path.stem}.tmp-"):len(tmp.name) - len(path.suffix)]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Claimed(RuntimeError):
    """Another live process holds the claim on `path`; `pid` is its id as it recorded it ("unknown" if none)."""

    def __init__(self, path: Path, pid: str):
        super().__init__(f"{path} is claimed by pid {pid}")
        self.path, self.pid = path, pid


_CLAIMS: list = []  # this process's open lock files: a claim lasts as long as the process


def claim(path: str | Path) -> None:
    """Claim `path` for this process until it exits: an exclusive POSIX record lock (lockf) on
    `path`.lock, which records this pid. The kernel releases it however the process ends; unlike flock
    it is not inherited by forked children (DataLoader workers), which may outlive a killed parent by a
    moment. Linux and macOS (fcntl).

    Raises: Claimed when another process holds it; OSError when the lock file cannot be opened or locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # not "held by another process"
            raise
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise Claimed(path, pid) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _CLAIMS.append(lock)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON (ASCII, non-ASCII escaped; trailing newline), atomically.

    Raises: TypeError for an object json cannot serialise, with `path` left as it was.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def files_sha256(paths: list[str | Path]) -> str:
    """Hex SHA-256 of the files' bytes, one after another, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
