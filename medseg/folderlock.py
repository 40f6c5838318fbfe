"""An exclusive lock on a folder of a shared file system, and who owns a temporary file there.

``fcntl.flock`` where the file system supports it (local disks, NFSv4, Lustre mounted with ``flock``); where it
does not (Lustre without ``flock``, NFS mounted ``nolock``: ``flock`` fails with ENOSYS, ENOLCK, EOPNOTSUPP or
EINVAL), an atomic lock file (``O_CREAT | O_EXCL``) that records its owner (host, pid, process start time) and
that the holder touches every ``heartbeat_s``. A lock file is broken when its owner is provably gone: on the same
host, its process has ended (or its pid is another process now); on another host, its heartbeat is older than
``stale_after_s``, measured on the file server's clock (so clock skew between nodes does not matter).

Node-local ``flock`` (Lustre ``localflock``) cannot be told apart from a real one: two nodes may then both hold
the lock. Whatever runs under it must therefore stay correct when two holders overlap (the cache writes every
entry atomically and removes only temporary files whose owner is provably gone, :func:`owner_is_gone`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.distributed import process_start_time

log = logging.getLogger("medseg")

# flock errors of file systems without (cluster-wide) flock support
UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})
OWNER_FILE_SUFFIX = ".owner"


def owner_record() -> dict[str, Any]:
    """Who this process is: host, pid and process start time (a pid can be reused by another process later)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": process_start_time(pid), "token": uuid.uuid4().hex}


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record in ``path``, or ``None`` (missing, half-written or unreadable)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def server_now(folder: Path) -> float:
    """The file server's current time, as the modification time of a file written now in ``folder``."""
    probe = folder / f".clock-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def owner_is_gone(owner: dict[str, Any] | None, modified: float, now: float, stale_after_s: float) -> bool:
    """Whether the owner of a lock or temporary file is provably gone.

    Args:
        owner: its owner record (:func:`owner_record`), ``None`` if unknown.
        modified: the file's (or its heartbeat's) modification time, server clock.
        now: the server's time (:func:`server_now`).
        stale_after_s: how old a file of another host (or of an unknown owner) must be to count as abandoned.
    """
    if owner and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        started = process_start_time(owner["pid"])
        if started is None:  # no such process here
            return True
        recorded = owner.get("started")
        return recorded is not None and abs(started - float(recorded)) > 1.0  # the pid belongs to a newer process
    return now - modified > stale_after_s


class _Heartbeat(threading.Thread):
    """Touches a lock file every ``every_s`` seconds while its holder works."""

    def __init__(self, path: Path, every_s: float) -> None:
        super().__init__(daemon=True, name="medseg-lock-heartbeat")
        self.path, self.every_s, self.stopped = path, every_s, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                os.utime(self.path)
            except OSError:
                return


@contextmanager
def folder_lock(folder: Path, name: str = ".lock", stale_after_s: float = 600.0, poll_s: float = 2.0, what: str = "") -> Iterator[None]:
    """Hold the exclusive lock ``folder/name`` (blocking): ``flock`` where supported, else a lock file (see module).

    Args:
        stale_after_s: a lock file whose heartbeat is older than this (another host's) is broken.
        poll_s: how often a waiting process looks at a lock file again.
        what: what the holder does, for the waiting message.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process %s in %s", what or "holding the lock", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise
            log.info("%s: the file system has no flock (%s); using a lock file instead", folder, os.strerror(err.errno))
            with _lock_file(folder / f"{name}{OWNER_FILE_SUFFIX}", stale_after_s, poll_s, what):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _lock_file(path: Path, stale_after_s: float, poll_s: float, what: str) -> Iterator[None]:
    owner = owner_record()
    waiting = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_owner(path)
            try:
                modified = path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if owner_is_gone(holder, modified, server_now(path.parent), stale_after_s):
                log.warning("Breaking the lock %s of %s (its process is gone)", path, holder or "an unknown process")
                try:  # one breaker wins the rename; the others find the file gone and try again
                    os.rename(path, path.with_name(f"{path.name}.stale-{owner['token'][:8]}"))
                    path.with_name(f"{path.name}.stale-{owner['token'][:8]}").unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            if not waiting:
                log.info("Waiting for %s (pid %s on %s) %s in %s", "another process", (holder or {}).get("pid"), (holder or {}).get("host"), what or "holding the lock", path.parent)
                waiting = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
        break
    heartbeat = _Heartbeat(path, max(0.05, stale_after_s / 10))
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
        if (read_owner(path) or {}).get("token") == owner["token"]:  # never remove a lock another process now holds
            path.unlink(missing_ok=True)
