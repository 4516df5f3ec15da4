"""One run per out_dir at a time.

``hold_out_dir(out_dir)``: a lock for the run's life on ``OUT_DIR/.lock``, taken with ``filelock`` (``flock`` on
POSIX), so the kernel releases it however the process ends (even ``kill -9``); a process the run forks (the scan's
pool) does not hold it. The file names its holder (pid, host, start time), and a second run into the same out_dir
stops at once, naming it. The run removes the file while it still holds the lock (a run that finds the file gone
under its lock is refused by filelock and stops too: only in the instant the first run ends); a file left behind was
left by a process killed while it held the lock, and is taken over with a warning. Only the launching rank 0 takes
it: the ranks Fabric starts run ``setup`` again and must not find their own run's lock.
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

from filelock import FileLock, Timeout

from litgpt_seqlen.errors import UserInputError

LOCK_NAME = ".lock"


class OutDirInUse(UserInputError):
    pass


def _holder(content: bytes | str) -> dict:
    try:
        holder = json.loads(content)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


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
    # Not blocking: a second run stops at once. No soft fallback: a lock the kernel does not release on kill -9 would
    # shut out every later run.
    lock = FileLock(path, blocking=False, fallback_to_soft=False, on_acquired=lambda fd: _claim(fd, path, warn))
    try:
        lock.acquire()
    except Timeout:
        holder = {}
        with contextlib.suppress(OSError):
            holder = _holder(path.read_bytes())
        raise OutDirInUse(
            f"out_dir {str(path.parent)!r} is in use by {_describe(holder)}. Wait for that run to end,"
            " or choose another --out_dir."
        ) from None
    holder_pid = os.getpid()
    try:
        yield path
    finally:
        if os.getpid() == holder_pid:  # not in a forked child leaving through this frame: the lock is not its own
            try:
                with contextlib.suppress(OSError):
                    path.unlink()  # still held: nothing is left in out_dir, and the next run finds no holder
            finally:
                lock.release()


def _claim(descriptor: int, path: Path, warn) -> None:
    """Just locked: a holder still named was killed while it held the lock (say so); then this process is named."""
    previous = _holder(os.pread(descriptor, 1 << 16, 0))
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
