"""One clear line and an exit code, never a traceback, for what is not a bug."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from litgpt_seqlen.errors import UserInputError, free_space, out_of_space_in, readable_size, reason_of
from litgpt_seqlen.ranks import launched_as_rank_zero


def _say(line: str) -> None:
    if launched_as_rank_zero():
        print(line, file=sys.stderr, flush=True)


# How the collectives' backends say that another rank is gone (gloo on CPU, NCCL on CUDA, the TCP store).
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "NCCL communicator was aborted",
    "Broken pipe",
)


def lost_peer(problem: BaseException) -> str | None:
    """The backend's words when ``problem`` is a collective that failed because another rank ended; None otherwise."""
    if not isinstance(problem, RuntimeError):  # torch's DistBackendError and DistNetworkError are RuntimeErrors
        return None
    text = str(problem)
    return next((words for words in PEER_LOST if words in text), None)


def out_of_space(error: OSError) -> str:
    """A full disk met outside the checkpoint writers, in words: the file (where the error names it), the space left,
    and the way on."""
    where = f"{error.filename} " if error.filename else ""
    free = f"; {readable_size(free_space(error.filename))} free on the file system that holds it" if where else ""
    return (
        f"out of space while writing {where or 'a file '}({reason_of(error)}){free}. Free space there (or choose an"
        " --out_dir with more room), then run the same command with --resume auto: it goes on from the newest"
        " complete checkpoint, if the run saved one."
    )


class _Terminated(SystemExit):
    """SIGTERM outside any handler of the flow's own: leave through the ``finally`` blocks, exit 143."""


def _terminate(signum, frame) -> None:
    raise _Terminated(143)


def end_process(code, exiting: bool = False) -> None:
    """Ends a run with ``code`` (SystemExit's: None is 0, a text is printed and 1); with ``code`` 0 and not
    ``exiting`` (no SystemExit was raised), one process returns to its caller. A run on several ranks ends here,
    its output flushed, without the interpreter's teardown: left to it, the distributed runtime's threads are
    sometimes destroyed out of order and abort a run that has ended (``terminate called without an active
    exception``, exit -6; about one two-rank run in ten on this machine)."""
    import torch.distributed

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code or exiting:
        sys.exit(code)


@contextlib.contextmanager
def user_facing_exits():
    """Wrap the body of ``cli()`` (parse, instantiate, setup) with this: every way out becomes an exit code and, for
    what is not a bug, one line (``end_process``)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    code, exiting = 0, False
    try:
        yield
    except UserInputError as problem:
        _say(f"error: {problem}")
        code = 2
    except KeyboardInterrupt:
        _say("interrupted (Ctrl-C)")
        code = 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): end quietly, as a command does on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush into the closed pipe
        code = 141
    except _Terminated:
        _say("terminated (SIGTERM)")
        code = 143
    except SystemExit as leaving:  # the flow's own exits (a stop by signal: 130, 143), --help (0)
        code, exiting = leaving.code, True
    except Exception as problem:
        full, words = out_of_space_in(problem), lost_peer(problem)
        if full is not None:  # a report file, a log, what no checkpoint writer named (those raise UserInputError)
            _say(f"error: {out_of_space(full)}")
            code = 2
        elif words is not None:
            # Not this rank's error: the rank that ended printed its own (a killed one prints none). One line, not
            # the waiting rank's traceback through the collective.
            _say(
                f"error: another rank of this run ended while this one waited for it ({words}); its error, if it"
                " printed one, is above (a rank killed by the system, e.g. out of host memory, prints none). To go on"
                " from the newest complete checkpoint: the same command with --resume auto."
            )
            code = 1
        else:
            raise  # a bug: its traceback
    finally:
        signal.signal(signal.SIGTERM, previous)
    end_process(code, exiting)
