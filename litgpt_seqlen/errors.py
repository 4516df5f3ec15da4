"""The errors a user causes or can act on: the entry point prints the message and exits 2, without a traceback. A
full disk is one of them: the message names the file, the space left, and the way on."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserInputError(Exception):
    """Bad input from the user (a flag, a data file, a checkpoint): the message names it and what to do."""


class OutOfSpace(UserInputError):
    """The file system that holds ``path`` (or the user's quota on it) filled while ``path`` was written; what was
    written of it (``written`` bytes) has been removed."""

    def __init__(self, path: Path, error: OSError, written: int) -> None:
        self.path, self.error, self.written = Path(path), error, written
        self.free = free_space(path)
        super().__init__(
            f"out of space while writing {path} ({reason_of(error)}): {readable_size(written)} of it had been written"
            f" (now removed); {readable_size(self.free)} free on the file system that holds it."
        )


def reason_of(error: OSError) -> str:
    return error.strerror or os.strerror(error.errno)


def out_of_space_in(error: BaseException | None) -> OSError | None:
    """The OSError(ENOSPC or EDQUOT) that ``error`` is, or that it was raised while handling (torch's writer, closing
    its archive after a failed write, raises a RuntimeError over it); None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def free_space(path: Path) -> int:
    """The bytes an unprivileged user may still write on the file system that holds ``path`` (or its nearest existing
    parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def readable_size(size: int) -> str:
    """``size`` bytes in words: "512 bytes", "2.9 KiB", ..., "1.5 TiB"."""
    value, units = float(size), ["bytes", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{size} bytes" if units[0] == "bytes" else f"{value:.1f} {units[0]}"
