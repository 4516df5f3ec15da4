"""What ``cli()`` needs so that a user sees one clear line, never a traceback, for what is not a bug.

- ``FlowParser``: the parser class ``finetune_lora.build_parser`` uses. It runs ``input_checks.check_parsed`` before
  any class is built from the command line (litgpt's ``JSON`` raises on a missing file in its ``__post_init__``,
  deep inside jsonargparse) and turns what instantiation still raises into a ``UserInputError``.
  ``use_flow_help(parser)`` gives ``--help`` this flow's own words for the flags whose meaning it changed (``HELP``).
- ``user_facing_exits()``: ``UserInputError`` -> ``error: ...`` and exit 2; Ctrl-C -> ``interrupted (Ctrl-C)`` and
  exit 130; SIGTERM -> ``terminated (SIGTERM)`` and exit 143 (so ``finally`` blocks, the out_dir lock's included, run).
  Only rank 0 prints; the other ranks exit with the same code, so with 2 devices a message shows once. A handler
  installed inside (e.g. around training, to checkpoint before leaving) takes the signal first; its own
  ``sys.exit(130 / 143)`` passes through unchanged.
- ``agree_on_error(fabric, problem)``: a problem met on one rank is raised on every rank, with that rank's message.
- ``ignore_sigint``: an initializer for forked worker pools, so Ctrl-C reaches only the main process.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from jsonargparse import ArgumentParser

import input_checks
from data_utils import UserInputError
from run_lock import launched_as_rank_zero

HELP = {
    "train.max_seq_length": (
        "Override of the max_seq_length decided from the data. Unset (default): the longest sample of train, val (and"
        " test) plus --seq.headroom, capped at the model's block_size. Set: this value, capped at block_size (with a"
        " warning). Samples longer than it are handled by --seq.over_length. The value trained with is recorded in"
        " final/hyperparameters.yaml."
    ),
    "train.lr_warmup_steps": (
        "Optimizer steps of linear learning-rate warmup before the cosine decay; 0 for none. Must be below the run's"
        " optimizer steps (checked before the model is built)."
    ),
}


class FlowParser(ArgumentParser):
    """jsonargparse's parser, with the data paths checked before the data module is built from them."""

    def instantiate_classes(self, cfg, *args, **kwargs):
        input_checks.check_parsed(cfg)
        try:
            return super().instantiate_classes(cfg, *args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError) as problem:  # raised by a class built from user input
            raise UserInputError(input_checks.instantiation_error_message(problem)) from None


def use_flow_help(parser: ArgumentParser) -> None:
    """The help of the flags whose meaning this flow changed (``HELP``); every other text stays upstream's."""
    for action in parser._actions:
        if action.dest in HELP:
            action.help = HELP[action.dest]


def _say(line: str) -> None:
    if launched_as_rank_zero():
        print(line, file=sys.stderr, flush=True)


class _Terminated(SystemExit):
    """SIGTERM outside any handler of the flow's own: leave through the ``finally`` blocks, exit 143."""


def _terminate(signum, frame) -> None:
    raise _Terminated(143)


@contextlib.contextmanager
def user_facing_exits():
    """Wrap the body of ``cli()`` (parse, instantiate, setup) with this."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except UserInputError as problem:
        _say(f"error: {problem}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say("interrupted (Ctrl-C)")
        sys.exit(130)
    except _Terminated:
        _say("terminated (SIGTERM)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def agree_on_error(fabric, problem: UserInputError | None) -> None:
    """Called by every rank after a step that may fail on some ranks only (with ``problem`` the error this rank
    met, or None): if any rank met one, every rank raises the message of the lowest such rank, so rank 0 can say it."""
    if fabric.world_size == 1:
        if problem is not None:
            raise problem
        return
    import torch

    failed = fabric.all_gather(torch.tensor(problem is not None, device=fabric.device)).flatten().tolist()
    if not any(failed):
        return
    source = failed.index(True)
    message = fabric.broadcast(str(problem) if fabric.global_rank == source else None, src=source)
    raise UserInputError(message)


def ignore_sigint() -> None:
    """``multiprocessing.Pool(initializer=ignore_sigint)``: a forked worker ignores Ctrl-C (which the terminal sends
    to the whole process group); the main process gets KeyboardInterrupt and the pool's exit ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
