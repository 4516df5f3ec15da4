"""One run per out_dir at a time.

``hold_out_dir(out_dir)``: a lock for the run's life. ``OUT_DIR/.lock`` holds the holder's pid, host and start time
and is locked with ``fcntl.flock``, so the kernel releases it however the process ends (even ``kill -9``). A second
run into the same out_dir stops at once, naming the holder. A lock file left behind (the process was killed before
it could remove it) is taken over with a warning. Only the launching rank 0 takes it: the ranks Fabric starts run
``setup`` again and must not find their own run's lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from litgpt_seqlen.errors import UserInputError

LOCK_NAME = ".lock"


class OutDirInUse(UserInputError):
    pass


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another run (it has not written its pid yet)"
    host = "" if holder.get("host") == socket.gethostname() else f" on host {holder.get('host')}"
    return f"pid {holder.get('pid')}{host} (started {holder.get('started')})"


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold_out_dir(out_dir: Path, enabled: bool = True, warn=None) -> Iterator[Path | None]:
    """Holds ``out_dir/.lock`` for the body's life; raises ``OutDirInUse`` if another live process holds it.

    ``enabled=False`` (ranks > 0) holds nothing. ``warn`` prints the stale-lock warning (default: stderr)."""
    if not enabled:
        yield None
        return
    warn = warn or (lambda line: print(line, file=sys.stderr))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    descriptor = _acquire(path, warn)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:  # still ours: unlink before unlocking
                path.unlink()
        os.close(descriptor)


def _acquire(path: Path, warn) -> int:
    import fcntl  # POSIX only: imported here so that the entry point still imports elsewhere (no lock there)

    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutDirInUse(
                f"out_dir {str(path.parent)!r} is in use by {_describe(_holder(path))}. Wait for that run to end,"
                " or choose another --out_dir."
            ) from None
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder removed it between our open and our lock: try the new file
            os.close(descriptor)
            continue
        break
    previous = _holder(path)
    if previous:
        gone = (
            "is no longer running"
            if previous.get("host") == socket.gethostname() and not _pid_alive(previous.get("pid"))
            else (
                "no longer holds its lock (if that run still goes on, this file system does not share locks between hosts: stop one)"
            )
        )
        warn(
            f"warning: out_dir {str(path.parent)!r} has a lock left by {_describe(previous)}, which {gone}; taking it over."
        )
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(descriptor, 0)
    os.pwrite(
        descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0
    )
    os.fsync(descriptor)
    return descriptor
