"""The command line that continues a run from a checkpoint, as the user typed it."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path


def resume_command(argv: Sequence[str], step_dir: Path, python: str = "python") -> str:
    """The command line that continues this run from ``step_dir``: ``argv`` with any --resume replaced, as the user
    typed it: ``python finetune_lora.py ...`` for the script, ``litgpt-seqlen ...`` for the console command (whose
    ``argv[0]`` is its full path; the bare name when that is what the shell finds)."""
    program = argv[0] if argv else "finetune_lora.py"
    if program.endswith(".py"):
        typed = [python, program]
    else:
        found = shutil.which(os.path.basename(program))
        same = found is not None and os.path.realpath(found) == os.path.realpath(program)
        typed = [os.path.basename(program) if same else program]
    kept, skip_next = [], False
    for argument in argv[1:]:
        if skip_next:
            skip_next = False
        elif argument == "--resume":
            skip_next = True
        elif not argument.startswith("--resume="):
            kept.append(argument)
    return shlex.join([*typed, *kept, "--resume", str(step_dir)])
