"""Where a resumable checkpoint's files lie, and how they are named and fingerprinted.

    OUT_DIR/step-000040/          upstream's files, unchanged (lit_model.pth.lora, configs, hyperparameters.yaml, ...)
    OUT_DIR/resume/step-000040/   state.json (what must match before a weight is read; sha256 of every file) and
                                  state.pt (the training state, one dict written by ``fabric.save``)

litgpt's own test requires a step directory to hold exactly upstream's files, which is why the state lives beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = 2
STATE_DIR = "resume"
HEADER = "state.json"
STATE_FILE = "state.pt"
LORA_FILE = "lit_model.pth.lora"
TEMP_PREFIX = ".tmp-"


def state_dir_for(step_dir: Path) -> Path:
    return Path(step_dir).parent / STATE_DIR / Path(step_dir).name


def temp_path_for(final_path: Path) -> Path:
    return Path(final_path).parent / f"{TEMP_PREFIX}{Path(final_path).name}"


def step_dirs_newest_first(out_dir: Path) -> list[Path]:
    found = []
    for path in Path(out_dir).glob("step-*"):
        number = path.name.removeprefix("step-")
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found, reverse=True)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(directory: Path) -> dict[str, str]:
    """The sha256 of every file under ``directory`` (a sharded state is a folder), keyed by its relative path."""
    return {
        path.relative_to(directory).as_posix(): file_sha256(path)
        for path in sorted(Path(directory).rglob("*"))
        if path.is_file() and path.name != HEADER
    }
