"""What an earlier run left in out_dir, and which of its files this run replaces.

``report_files(out_dir, dry_run, drop)``: where this run writes its reports, and which files of an earlier run it
removes first. A dry run into an out_dir that holds a trained run writes ``seq_lengths.dry_run.json`` (and
``dropped_samples.dry_run.jsonl``) beside it, leaving the trained run's report alone. ``begin_training``: a fresh
training run into an out_dir that holds an earlier run's checkpoints says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

UPSTREAM_MARK = "hyperparameters.yaml"  # in every final/ and step-*/ litgpt's scripts write, whatever the method


REPORT = "seq_lengths.json"


DROPPED = "dropped_samples.jsonl"


DRY_REPORT = "seq_lengths.dry_run.json"


DRY_DROPPED = "dropped_samples.dry_run.jsonl"


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
