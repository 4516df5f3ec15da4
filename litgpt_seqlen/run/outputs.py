"""One run per out_dir at a time, and an out_dir whose files all come from the same run.

``hold_out_dir(out_dir)``: a lock for the run's life. ``OUT_DIR/.lock`` holds the holder's pid, host and start time
and is locked with ``fcntl.flock``, so the kernel releases it however the process ends (even ``kill -9``). A second
run into the same out_dir stops at once, naming the holder. A lock file left behind (the process was killed before
it could remove it) is taken over with a warning. Only the launching rank 0 takes it: the ranks Fabric starts run
``setup`` again and must not find their own run's lock.

``report_files(out_dir, dry_run, drop)``: where this run writes its reports, and which files of an earlier run it
removes first. A dry run into an out_dir that holds a trained run writes ``seq_lengths.dry_run.json`` (and
``dropped_samples.dry_run.jsonl``) beside it, leaving the trained run's report alone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from litgpt_seqlen.errors import UserInputError

LOCK_NAME = ".lock"
UPSTREAM_MARK = "hyperparameters.yaml"  # in every final/ and step-*/ litgpt's scripts write, whatever the method


REPORT = "seq_lengths.json"


DROPPED = "dropped_samples.jsonl"


DRY_REPORT = "seq_lengths.dry_run.json"


DRY_DROPPED = "dropped_samples.dry_run.jsonl"


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


@dataclass(frozen=True)
class ReportFiles:
    report: Path  # seq_lengths.json, or seq_lengths.dry_run.json beside a trained run
    dropped: Path | None  # where --seq.over_length drop writes its samples; None when this run drops nothing
    removed: list[Path] = field(
        default_factory=list
    )  # files of an earlier run, removed because this run will not rewrite them
    note: str | None = None  # a line for the user when the dry run writes beside a trained run


def trained_run_in(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a trained run: checkpoints in final/ or step-*/ (any method's), or a report not marked dry run."""
    if earlier_checkpoints(out_dir):
        return True
    report = out_dir / REPORT
    if report.is_file():
        try:
            return not json.loads(report.read_text()).get("dry_run", False)
        except (OSError, ValueError, AttributeError):
            return True  # unreadable: treat as a trained run's, never overwrite it in a dry run
    return False


def report_files(out_dir: Path, dry_run: bool, drop: bool) -> ReportFiles:
    """Where this run writes ``seq_lengths.json`` and ``dropped_samples.jsonl``, after removing the files an earlier
    run left that this run will not rewrite (call it on rank 0, under the lock, before writing).

    - A training run writes seq_lengths.json (and under drop dropped_samples.jsonl); it removes an earlier
      dropped_samples.jsonl when it drops nothing, and any earlier dry-run files (they describe other settings).
    - A dry run into an out_dir without a trained run does the same (its report is marked ``"dry_run": true``).
    - A dry run into an out_dir with a trained run writes seq_lengths.dry_run.json (and dropped_samples.dry_run.jsonl)
      and touches none of the trained run's files.
    """
    beside_trained = dry_run and trained_run_in(out_dir)
    if beside_trained:
        report, dropped_name, stale = out_dir / DRY_REPORT, DRY_DROPPED, [] if drop else [DRY_DROPPED]
    else:
        report, dropped_name, stale = out_dir / REPORT, DROPPED, [DRY_REPORT, DRY_DROPPED] + ([] if drop else [DROPPED])
    removed = []
    for name in stale:
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(out_dir / name)
    note = (
        f"dry run: {str(out_dir)!r} holds a trained run, whose {REPORT} stays; this report is {report.name}."
        if beside_trained
        else None
    )
    return ReportFiles(report=report, dropped=out_dir / dropped_name if drop else None, removed=removed, note=note)


def earlier_checkpoints(out_dir: Path) -> list[str]:
    """The checkpoint directories (final/, step-*/) an earlier run left in ``out_dir``, for a warning before a
    training run replaces them (final/ at the end, step-* as it reaches them)."""
    return sorted(p.name for p in [*out_dir.glob("step-*"), out_dir / "final"] if (p / UPSTREAM_MARK).is_file())


def begin_training(out_dir: Path, resumed: bool, log) -> None:
    """On rank 0 as training starts: a fresh run into an out_dir that holds an earlier run's checkpoints says so."""
    if not resumed and (earlier := earlier_run_warning(out_dir)):
        log(earlier)


def earlier_run_warning(out_dir: Path) -> str | None:
    """The line a training run prints when ``out_dir`` holds checkpoints of an earlier run, or None."""
    earlier = earlier_checkpoints(out_dir)
    if not earlier:
        return None
    return (
        f"warning: out_dir {str(out_dir)!r} holds {', '.join(earlier)} from an earlier run; this run replaces final/"
        " at its end and the step-* directories it reaches."
    )
