"""Where a resumable checkpoint's files lie, and how they are named and fingerprinted.

    OUT_DIR/step-000040/          upstream's files, unchanged (the method's weights, configs, hyperparameters.yaml)
    OUT_DIR/resume/step-000040/   state.json (what must match before a weight is read; sha256 of every file) and
                                  state.pt (the training state, one dict written by ``fabric.save``)

litgpt's own test requires a step directory to hold exactly upstream's files, which is why the state lives beside it.

The base model's ``lit_model.pth`` (up to hundreds of GB) is fingerprinted by sampling: its size and the sha256 of
``SAMPLED_BLOCKS`` blocks of ``SAMPLE_BLOCK`` bytes, the first, the last and evenly spaced ones between (a file of at
most that many blocks is hashed whole).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FORMAT = 4
STATE_DIR = "resume"
HEADER = "state.json"
STATE_FILE = "state.pt"
TEMP_PREFIX = ".tmp-"
BASE_WEIGHTS = "lit_model.pth"
SAMPLE_BLOCK = 1 << 20
SAMPLED_BLOCKS = 32


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


def sampled_offsets(size: int, block: int = SAMPLE_BLOCK, count: int = SAMPLED_BLOCKS) -> list[int]:
    """Where the sampled blocks of a ``size``-byte file start: every block when there are at most ``count``, else the
    first, the last (ending at the file's end) and ``count - 2`` evenly spaced between."""
    if size <= block * count:
        return list(range(0, size, block))
    last = size - block
    return sorted({last * i // (count - 1) for i in range(count)})


def sampled_fingerprint(path: Path, block: int = SAMPLE_BLOCK, count: int = SAMPLED_BLOCKS) -> dict:
    """``{"size", "block_size", "blocks": [[offset, sha256], ...]}`` of the file at ``path``: reads at most
    ``count * block`` bytes, however large the file."""
    size = os.stat(path).st_size
    blocks = []
    with open(path, "rb") as file:
        for offset in sampled_offsets(size, block, count):
            file.seek(offset)
            blocks.append([offset, hashlib.sha256(file.read(block)).hexdigest()])
    return {"size": size, "block_size": block, "blocks": blocks}


def sampled_difference(saved: dict, now: dict) -> str | None:
    """None when two ``sampled_fingerprint`` results agree, else what differs, in words."""
    if saved["size"] != now["size"]:
        return f"size {saved['size']} bytes then, {now['size']} now"
    if saved["block_size"] != now["block_size"] or [o for o, _ in saved["blocks"]] != [o for o, _ in now["blocks"]]:
        return "sampled differently then (another version of this code)"
    for (offset, was), (_, digest) in zip(saved["blocks"], now["blocks"]):
        if was != digest:
            return f"same size ({now['size']} bytes), other bytes in the sampled block at offset {offset}"
    return None
