"""One clear line and an exit code, never a traceback, for what is not a bug."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.ranks import launched_as_rank_zero


def _say(line: str) -> None:
    if launched_as_rank_zero():
        print(line, file=sys.stderr, flush=True)


class _Terminated(SystemExit):
    """SIGTERM outside any handler of the flow's own: leave through the ``finally`` blocks, exit 143."""


def _terminate(signum, frame) -> None:
    raise _Terminated(143)


def _leave_process_group() -> None:
    """Several ranks that stop together close their process group first: left to the interpreter's exit, its
    threads can end the process with an abort (exit 134) instead of the code meant."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def user_facing_exits():
    """Wrap the body of ``cli()`` (parse, instantiate, setup) with this."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except UserInputError as problem:
        _say(f"error: {problem}")
        _leave_process_group()
        sys.exit(2)
    except KeyboardInterrupt:
        _say("interrupted (Ctrl-C)")
        _leave_process_group()
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): end quietly, as a command does on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush into the closed pipe
        sys.exit(141)
    except _Terminated:
        _say("terminated (SIGTERM)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
