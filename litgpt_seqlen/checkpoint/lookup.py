"""``--resume``: which checkpoint to go on from, and whether a checkpoint is complete and intact."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from litgpt_seqlen.args import Resume
from litgpt_seqlen.checkpoint.layout import (
    FORMAT,
    HEADER,
    file_sha256,
    state_dir_for,
    step_dirs_newest_first,
)
from litgpt_seqlen.errors import UserInputError


def find_checkpoint(out_dir: Path, resume: Resume, log: Callable[[str], None] = print) -> Path | None:
    """The step directory to resume from, or None to start fresh. ``log`` is told which was chosen and what was skipped.

    ``resume`` as ``args.parse_resume`` gives it. ``auto``: the newest complete checkpoint in ``out_dir``, None when
    there is none. ``True``: the same, but none is an error. A path: that step directory, which must be complete.
    """
    if resume is False:
        return None
    if isinstance(resume, Path):
        problem = incomplete_reason(resume)
        if problem:
            raise UserInputError(f"--resume {resume}: not a checkpoint to resume from: {problem}.")
        log(f"Resuming training from {weights_path(resume)} (--resume {resume}).")
        return resume
    for step_dir in step_dirs_newest_first(out_dir):
        problem = incomplete_reason(step_dir)
        if problem is None:
            log(
                f"Resuming training from {weights_path(step_dir)}, the newest complete checkpoint in --out_dir {out_dir}"
                f" (--resume {flag(resume)})."
            )
            return step_dir
        log(f"Skipping {step_dir}: {problem}.")
    if resume == "auto":
        log(f"No complete checkpoint in --out_dir {out_dir}: starting fresh (--resume auto).")
        return None
    raise UserInputError(
        f"--resume true: there is no complete checkpoint in --out_dir {out_dir} to resume from. Use --resume auto to"
        " start fresh when there is none, or --resume false."
    )


def newest_complete(out_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``out_dir`` (what ``--resume auto`` would choose), or None."""
    return next((step_dir for step_dir in step_dirs_newest_first(out_dir) if incomplete_reason(step_dir) is None), None)


def flag(resume: Resume) -> str:
    return str(resume).lower() if isinstance(resume, bool) else str(resume)


def incomplete_reason(step_dir: Path) -> str | None:
    """None when ``step_dir`` is a complete checkpoint, else what is wrong with it, in words."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "no such directory"
    state_dir = state_dir_for(step_dir)
    try:
        header = json.loads((state_dir / HEADER).read_text())
    except FileNotFoundError:
        return f"no training state at {state_dir / HEADER} (not saved by a resumable run, or it stopped while saving)"
    except (OSError, ValueError) as error:
        return f"its training state {state_dir / HEADER} is unreadable ({error})"
    if header.get("format") != FORMAT:
        return (
            f"its training state {state_dir / HEADER} is of format {header.get('format')!r}, this version reads"
            f" format {FORMAT} (saved by another version of this code, which can resume it)"
        )
    if header.get("step_dir") != step_dir.name:
        return f"{state_dir / HEADER} belongs to {header.get('step_dir')!r}"
    for name, digest in header["files"].items():
        if not (state_dir / name).is_file():
            return f"{state_dir} lacks {name}"
        if file_sha256(state_dir / name) != digest:
            return f"{state_dir / name} is damaged (its sha256 is not the one recorded when it was saved)"
    weights = header["weights"]["file"]
    if not (step_dir / weights).is_file():
        return f"it has no {weights}"
    if file_sha256(step_dir / weights) != header["weights"]["sha256"]:
        return f"its {weights} is not the one its training state was saved with (written over since?)"
    return None


def weights_path(step_dir: Path) -> Path:
    """The trained weights of a complete checkpoint: the file upstream's script for its method writes."""
    return Path(step_dir) / read_header(step_dir)["weights"]["file"]


def read_header(step_dir: Path) -> dict:
    """state.json of a checkpoint: progress, run settings, data fingerprint, length decision. Reads no tensor."""
    return json.loads((state_dir_for(step_dir) / HEADER).read_text())
