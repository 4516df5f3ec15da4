"""Crash-safe writing: a directory appears under its final name only when it is whole, and is flushed to disk."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from litgpt_seqlen.checkpoint.layout import STATE_DIR, TEMP_PREFIX, state_dir_for, temp_path_for


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Deletes what a killed save left behind (``.tmp-*`` in ``out_dir`` and its ``resume/``); returns what it removed.
    Call it on rank 0 before the first save, never while another process writes into ``out_dir``."""
    removed = []
    for folder in (Path(out_dir), Path(out_dir) / STATE_DIR):
        for path in sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def write_checkpoint_dir_atomically(
    final_path: Path,
    write_fn: Callable[[Path], None],
    is_writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Runs ``write_fn(temporary_dir)``, then renames the temporary directory to ``final_path`` (replacing an older
    one). Killed at any moment, ``final_path`` is either absent, the old one, or the new one whole.

    Several ranks: all call it (``write_fn`` may hold collectives, like the methods' weight writers); only the rank with
    ``is_writer`` creates, syncs and renames, so ``write_fn`` must write files on that rank only. ``barrier`` keeps
    the others from touching the temporary directory before it exists or after it is renamed.
    """
    final_path = Path(final_path)
    temporary = temp_path_for(final_path)
    if is_writer:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    barrier()
    write_fn(temporary)
    barrier()
    if is_writer:
        for file in temporary.rglob("*"):
            if file.is_file():
                fsync_path(file)
        replace_dir(temporary, final_path)
    barrier()


def replace_dir(source: Path, target: Path) -> None:
    """Moves ``source`` to ``target``; an existing ``target`` is first renamed aside (to a temporary name), then removed."""
    if target.exists():
        aside = target.parent / f"{TEMP_PREFIX}old-{target.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside)
    else:
        os.replace(source, target)
    fsync_path(target.parent)


def fsync_path(path: Path) -> None:
    """Flushes a file or a directory entry to disk, so a machine crash (not only a killed process) keeps the order.
    A file that cannot be flushed raises; a directory may not be (some file systems refuse it), which is let pass."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(descriptor)


def forget_training_states(out_dir: Path) -> list[str]:
    """For a run that starts fresh in an ``out_dir`` holding another run's checkpoints: removes their training
    states (their step directories stay usable for generate and merge), so a later ``--resume auto`` cannot pick a
    checkpoint of the old run that is newer than any of this one. Returns the step directory names it made
    non-resumable. Rank 0 only."""
    state_root = Path(out_dir) / STATE_DIR
    forgotten = sorted(path.name for path in state_root.glob("step-*")) if state_root.is_dir() else []
    for name in forgotten:
        drop_training_state(Path(out_dir) / name)
    return forgotten


def drop_training_state(step_dir: Path) -> None:
    """Makes ``step_dir`` incomplete (before it is rewritten): its state directory is renamed aside, then removed."""
    state_dir = state_dir_for(step_dir)
    if state_dir.exists():
        aside = temp_path_for(state_dir)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(state_dir, aside)
        fsync_path(state_dir.parent)
        shutil.rmtree(aside)
