"""SIGTERM and Ctrl-C during training: finish the optimizer step, save a checkpoint, leave with 143 or 130 (the flow
prints the command that resumes: ``cli.resume_command``); a second signal stops at once, even when the run is stuck
where Python cannot act on it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch


class GracefulStop:
    """Within ``with GracefulStop() as stop:`` the first SIGTERM or SIGINT only sets ``stop.requested`` (the loop
    finishes its optimizer step, saves and leaves with ``stop.exit_code``: 143 or 130); a second SIGINT raises
    KeyboardInterrupt at once, and any second signal ends a process still running seconds later
    (``SecondSignalWatchdog``). The previous handlers come back on exit. Main thread only (Python's rule for signals)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self, log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)
    ) -> None:
        self.log = log
        self.signal_number: int | None = None
        self.checkpoint: Path | None = None  # set by the loop when it saved and left early
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number if self.signal_number is not None else 0

    def __enter__(self) -> GracefulStop:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        self._watchdog = SecondSignalWatchdog()
        return self

    def __exit__(self, *exc_info) -> None:
        self._watchdog.close()
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_number is None:
            self.signal_number = number
            self.log(
                f"{name} received: stopping after this optimizer step, with a checkpoint. Ctrl-C again to stop at once."
            )
        elif number == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            self.log(f"{name} received again: already stopping after this optimizer step.")

    def leave(self, fabric) -> None:
        """Ends the process after a stop with a checkpoint: the same last line on stderr as a stop at once
        (``interrupted (Ctrl-C)`` / ``terminated (SIGTERM)``, rank 0), and exit 130 / 143."""
        if fabric.global_rank == 0:
            line = "interrupted (Ctrl-C)" if self.signal_number == signal.SIGINT else "terminated (SIGTERM)"
            print(line, file=sys.stderr, flush=True)
        sys.exit(self.exit_code)

    def requested_on_any_rank(self, fabric) -> bool:
        """True on every rank when any rank was signalled, so all ranks stop at the same step (a collective)."""
        if fabric.world_size == 1:
            return self.requested
        flag_tensor = torch.tensor(int(self.requested), device=fabric.device)
        return bool(fabric.all_reduce(flag_tensor, reduce_op="sum").item())


class SecondSignalWatchdog:
    """Ends the process when a second SIGTERM or SIGINT finds it still running a few seconds later: a run stuck in a
    collective (a rank waiting for another) never returns to Python, where the signal handlers run.

    The C-level handler writes every signal to a pipe (``signal.set_wakeup_fd``) even while the main thread is stuck;
    a thread reads it. The first signal is the graceful stop's; after a second one the process has ``GRACE_SECONDS``
    to leave by itself, then it exits with 128 + the signal's number."""

    GRACE_SECONDS = 3.0

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._timer: threading.Timer | None = None
        self._thread = threading.Thread(target=self._watch, name="second-signal-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        seen = 0
        while chunk := os.read(self._read, 16):
            for number in chunk:
                if number not in (signal.SIGTERM, signal.SIGINT):
                    continue
                seen += 1
                if seen == 2:
                    self._timer = threading.Timer(self.GRACE_SECONDS, self._exit_now, args=(number,))
                    self._timer.daemon = True  # a process that leaves by itself does not wait for it
                    self._timer.start()

    @staticmethod
    def _exit_now(number: int) -> None:
        line = "interrupted (Ctrl-C)" if number == signal.SIGINT else "terminated (SIGTERM)"
        print(f"{line}: the run did not stop by itself", file=sys.stderr, flush=True)
        os._exit(128 + number)

    def close(self) -> None:
        """The run left the guarded part by itself: no exit is pending any more."""
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the reading thread sees the end of the pipe and returns
        self._thread.join(timeout=1)
        os.close(self._read)
        if self._timer is not None:
            self._timer.cancel()
