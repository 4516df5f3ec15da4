"""Crash-safe writing: a directory appears under its final name only when it is whole, and is flushed to disk.

Every file is written beside its destination (a temporary name in the same directory, then renamed), never through
the system temp directory: a small or separate ``/tmp`` neither fails a save nor turns its rename into a copy. A
file system (or quota) that fills during a write ends it with ``OutOfSpace``, the half-written part removed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from litgpt_seqlen.checkpoint.layout import STATE_DIR, TEMP_PREFIX, state_dir_for, temp_path_for
from litgpt_seqlen.errors import OutOfSpace, out_of_space_in


def bytes_under(path: Path) -> int:
    """The size of the file at ``path``, or of every file under the directory at ``path``; 0 when there is none."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Deletes what a killed save left behind (``.tmp-*`` in ``out_dir`` and its ``resume/``); returns what it removed.
    Call it on rank 0 before the first save, never while another process writes into ``out_dir``."""
    removed = []
    for folder in (Path(out_dir), Path(out_dir) / STATE_DIR):
        for path in sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def alone(problem: OutOfSpace | None) -> None:
    """``agree`` for one process: its own problem is the only one."""
    if problem is not None:
        raise problem


def write_checkpoint_dir_atomically(
    final_path: Path,
    write_fn: Callable[[Path], None],
    is_writer: bool = True,
    agree: Callable[[OutOfSpace | None], None] = alone,
) -> None:
    """Runs ``write_fn(temporary_dir)`` (a sibling of ``final_path``), then renames the temporary directory to
    ``final_path`` (replacing an older one). Killed at any moment, ``final_path`` is either absent, the old one, or the
    new one whole.

    Several ranks: all call it (``write_fn`` may hold collectives, like the methods' weight writers); only the rank with
    ``is_writer`` creates, syncs and renames, so ``write_fn`` must write files on that rank only. Every rank calls
    ``agree(problem)`` after each of the three parts (create, write, sync and rename), with the ``OutOfSpace`` it met
    there or None: a collective that raises on every rank when any rank met one (``ranks.agree_on_error``) keeps the
    ranks together, also where a rank's write fails. Out of space, the temporary directory is removed at once; any
    other error leaves it to ``remove_stale_temporaries``.
    """
    final_path = Path(final_path)
    temporary = temp_path_for(final_path)

    def create() -> None:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)

    def finish() -> None:
        for file in temporary.rglob("*"):
            if file.is_file():
                fsync_path(file)
        replace_dir(temporary, final_path)

    agree(_unless_out_of_space(create if is_writer else None, final_path, temporary, is_writer))
    agree(_unless_out_of_space(lambda: write_fn(temporary), final_path, temporary, is_writer))
    agree(_unless_out_of_space(finish if is_writer else None, final_path, temporary, is_writer))


def _unless_out_of_space(part: Callable[[], None] | None, path: Path, temporary: Path, is_writer: bool):
    """Runs ``part`` of writing ``path`` (None: nothing to do on this rank); out of space, removes what was written
    (``temporary``, on the writer) and returns the ``OutOfSpace`` instead of raising it, so every rank can learn of it.
    """
    try:
        if part is not None:
            part()
    except Exception as raised:
        error = out_of_space_in(raised)
        if error is None:
            raise
        written = bytes_under(temporary) + getattr(error, "partial_bytes", 0)  # a file written beside, then removed
        if is_writer:
            shutil.rmtree(temporary, ignore_errors=True)
        return OutOfSpace(path, error, written)
    return None


def write_file_atomically(path: Path, write: Callable[[object], None]) -> None:
    """``write(file)`` into a binary file named ``.tmp-<name>`` beside ``path``, flushed, then renamed to ``path``.
    On any error the temporary file is removed; an OSError says in ``partial_bytes`` how much it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temp_path_for(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        if isinstance(error, OSError):
            error.partial_bytes = bytes_under(temporary)
            error.filename = error.filename or str(path)  # a failed write names no file; its destination is the one
        temporary.unlink(missing_ok=True)
        raise


class WriteBeside(TorchCheckpointIO):
    """``fabric.save``'s writer while checkpoints are written (``checkpoint_writes``): the file is written beside its
    destination and renamed. Lightning's own writer stages it in the system temp directory and moves it from there."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_file_atomically(Path(path), lambda file: torch.save(checkpoint, file))


def save_through_python_file(save: Callable) -> Callable:
    """``torch.save`` that opens a path it is given with Python's ``open`` and raises a full disk as the OSError(ENOSPC)
    it is: torch's own file writer reports it as a RuntimeError without an errno ("unexpected pos"), and into a Python
    file raises that RuntimeError over the OSError when it closes the archive. The same file."""

    @functools.wraps(save)
    def saving(obj, f, *args, **kwargs):
        try:
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as file:
                    return save(obj, file, *args, **kwargs)
            return save(obj, f, *args, **kwargs)
        except RuntimeError as error:
            full = out_of_space_in(error)
            if full is None:
                raise
            raise full from None

    return saving


def meet_the_barrier_when_out_of_space(fabric, save: Callable) -> Callable:
    """``fabric.save`` for several ranks: it ends with a barrier that the other ranks wait in, which the rank whose
    write fails (out of space) would skip; that rank takes it before raising, so the ranks meet again after it."""

    @functools.wraps(save)
    def saving(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        except Exception as error:
            if out_of_space_in(error) is not None:
                fabric.barrier()
            raise

    return saving


@contextlib.contextmanager
def checkpoint_writes(fabric) -> Iterator[None]:
    """While a checkpoint is written: ``fabric.save`` writes beside its destination (``WriteBeside``); ``torch.save``
    to a path (litgpt's weight writers and merge, Lightning's sharded save) reports a full disk as OSError with its
    errno (``save_through_python_file``); on several ranks a ``fabric.save`` that fails that way still meets the
    others (``meet_the_barrier_when_out_of_space``). All is put back afterwards."""
    strategy = getattr(fabric, "strategy", None)
    swap_io = strategy is not None and _uses_torch_checkpoint_io(strategy)
    wrap_save = getattr(fabric, "world_size", 1) > 1
    previous_io, previous_save = (strategy.checkpoint_io if swap_io else None), torch.save
    own_save = wrap_save and "save" in vars(fabric)  # an instance attribute (a test's) is put back, not deleted
    previous_fabric_save = fabric.save if wrap_save else None
    if swap_io:
        strategy.checkpoint_io = WriteBeside()
    if wrap_save:
        fabric.save = meet_the_barrier_when_out_of_space(fabric, previous_fabric_save)
    torch.save = save_through_python_file(previous_save)
    try:
        yield
    finally:
        torch.save = previous_save
        if wrap_save and own_save:
            fabric.save = previous_fabric_save
        elif wrap_save:
            del fabric.save
        if swap_io:
            strategy.checkpoint_io = previous_io


def _uses_torch_checkpoint_io(strategy) -> bool:
    try:
        return type(strategy.checkpoint_io) is TorchCheckpointIO
    except NotImplementedError:  # ModelParallelStrategy (several devices): it calls torch.save itself
        return False


def replace_dir(source: Path, target: Path) -> None:
    """Moves ``source`` to ``target``; an existing ``target`` is first renamed aside (to a temporary name), then
    removed. Should the move fail, the old ``target`` is put back."""
    if target.exists():
        aside = target.parent / f"{TEMP_PREFIX}old-{target.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
        try:
            os.replace(source, target)
        except OSError:
            os.replace(aside, target)
            raise
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
