"""The user's data files (litgpt's JSON module), read and checked as litgpt will read them, and where each sample sits in them."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from litgpt_seqlen.errors import UserInputError

REQUIRED_TEXT_FIELDS = ("instruction", "output")  # SFTDataset reads both of every sample


OPTIONAL_TEXT_FIELDS = ("input", "sys_prompt")  # passed to the prompt style; null means absent, as litgpt treats it


def check_json_paths(json_path: Path, val_split_fraction: float | None) -> None:
    """What litgpt's JSON module needs of ``--data.json_path`` and ``--data.val_split_fraction``, said up front."""
    if not json_path.exists():
        raise UserInputError(
            f"--data.json_path {str(json_path)!r} does not exist. Give a .json or .jsonl file (split into train and val"
            " by --data.val_split_fraction) or a directory holding train.json and val.json (or .jsonl)."
        )
    if json_path.is_dir():
        if val_split_fraction is not None:
            raise UserInputError(
                f"--data.val_split_fraction {val_split_fraction} applies to a single file only; --data.json_path"
                f" {str(json_path)!r} is a directory, whose train and val files are the splits. Drop --data.val_split_fraction."
            )
        for name in ("train", "val"):
            if all((json_path / f"{name}{suffix}").is_file() for suffix in (".json", ".jsonl")):
                raise UserInputError(
                    f"--data.json_path {str(json_path)!r} holds both {name}.json and {name}.jsonl: litgpt would read"
                    f" {name}.json and ignore {name}.jsonl. Keep one of them (remove or rename the other)."
                )
        missing = [name for name in ("train", "val") if _find_split(json_path, name) is None]
        if missing:
            present = sorted(p.name for p in json_path.iterdir())[:10]
            raise UserInputError(
                f"--data.json_path {str(json_path)!r} is a directory without {' and '.join(f'{m}.json (or {m}.jsonl)' for m in missing)};"
                f" it holds {present or 'nothing'}. Name the files train.json and val.json, or point --data.json_path at one file."
            )
        return
    if json_path.suffix not in (".json", ".jsonl"):
        raise UserInputError(
            f"--data.json_path {str(json_path)!r} ends in {json_path.suffix or 'no suffix'!r}: litgpt reads .json (one list"
            " of objects) or .jsonl (one object per line). Rename the file to what it holds."
        )
    if val_split_fraction is not None and not (0 < val_split_fraction < 1):
        raise UserInputError(
            f"--data.val_split_fraction must be between 0 and 1 (the share of {json_path.name} used for validation),"
            f" got {val_split_fraction}."
        )


def _find_split(directory: Path, name: str) -> Path | None:
    for suffix in (".json", ".jsonl"):  # litgpt's JSON.find_split order
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    return None


@dataclass(frozen=True)
class DataFiles:
    """Where each split's samples come from: its file, and for each sample index its position in that file."""

    files: dict[str, Path]
    positions: dict[str, list[int]]

    def where(self, split: str, index: int) -> str:
        """'position 10 of /data/all.json' (0-based, in the file's list) or 'line 11 of /data/train.jsonl'."""
        file = self.files[split]
        position = self.positions[split][index]
        return f"line {position + 1} of {file}" if file.suffix == ".jsonl" else f"position {position} of {file}"

    def source(self, split: str, index: int) -> dict:
        """{"file": ..., "position": ...} for a record (dropped_samples.jsonl); position is 0-based in the file."""
        return {"file": str(self.files[split]), "position": self.positions[split][index]}

    def counts(self) -> dict[str, int]:
        return {split: len(positions) for split, positions in self.positions.items()}


def split_files(data) -> dict[str, Path] | None:
    """The file each split of litgpt's JSON module reads (the same one for both under val_split_fraction); None for
    any other data module."""
    from litgpt.data import JSON

    if not isinstance(data, JSON):
        return None
    path = Path(data.json_path)
    if path.is_file():
        return {"train": path, "val": path}
    return {name: _find_split(path, name) for name in ("train", "val")}


def file_positions(data, count: int | None = None) -> dict[str, list[int]]:
    """For each split of litgpt's JSON module, the position in the user's file of each of its samples.

    A single file is split by litgpt with ``random_split(data, [1 - f, f], generator=Generator().manual_seed(seed))``;
    the same call on ``range(count)`` gives the positions (``count``: the file's samples, read from it when not given).
    A directory's train and val files are the splits themselves: positions are 0, 1, ...
    """
    import torch
    from torch.utils.data import random_split

    files = split_files(data)
    if files is None:
        raise TypeError(f"file_positions needs litgpt's JSON data module, got {type(data).__name__}")
    if files["train"] != files["val"]:  # a directory: each split is its own file
        return {name: list(range(len(load_samples(file)))) for name, file in files.items()}
    count = len(load_samples(files["train"])) if count is None else count
    fraction = data.val_split_fraction
    with warnings.catch_warnings():  # "Length of split at index 1 is 0": check_data_files says it better
        warnings.simplefilter("ignore", UserWarning)
        train, val = random_split(
            range(count), [1.0 - fraction, fraction], generator=torch.Generator().manual_seed(data.seed)
        )
    return {"train": list(train.indices), "val": list(val.indices)}


def load_samples(path: Path) -> list:
    """The samples of a .json or .jsonl file as litgpt's ``load_split`` reads them, or a ``UserInputError`` that
    names the file, the line and column, and what is wrong (not UTF-8, not JSON, not a list, a blank JSONL line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = raw[: problem.start].count(b"\n") + 1
        column = problem.start - (raw.rfind(b"\n", 0, problem.start) + 1) + 1
        raise UserInputError(
            f"{path} is not UTF-8 text: byte 0x{raw[problem.start]:02x} at line {line}, column {column} cannot be read."
            " Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    if not text.strip():
        raise UserInputError(f"{path} is empty: it needs a list of samples (.json) or one sample per line (.jsonl).")
    if text.startswith("\ufeff"):
        raise UserInputError(
            f"{path} starts with a UTF-8 byte order mark, which litgpt's JSON reader refuses. Save it as UTF-8 without BOM."
        )
    if path.suffix == ".jsonl":
        return _load_jsonl(path, text)
    try:
        samples = json.loads(text)
    except json.JSONDecodeError as problem:
        raise UserInputError(
            f"{path} is not valid JSON: {problem.msg} at line {problem.lineno}, column {problem.colno}.{_jsonl_hint(path, text)}"
        ) from None
    if not isinstance(samples, list):
        raise UserInputError(f"{path}: the top level must be a list of objects (samples), got {_describe(samples)}.")
    return samples


def _jsonl_hint(path: Path, text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and all(line.lstrip().startswith("{") for line in lines[:2]):
        return f" It looks like JSON Lines (one object per line): name it {path.with_suffix('.jsonl').name}."
    return ""


def _load_jsonl(path: Path, text: str) -> list:
    samples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            if number == text.count("\n") + 1:  # after the final newline
                continue
            raise UserInputError(
                f"{path}: line {number} is blank; litgpt reads every line of a .jsonl file as one sample. Remove it."
            )
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError as problem:
            raise UserInputError(
                f"{path}: line {number} is not valid JSON: {problem.msg} at column {problem.colno}."
            ) from None
    return samples


def _describe(value) -> str:
    if isinstance(value, Mapping):
        keys = ", ".join(repr(k) for k in list(value)[:5]) + (", ..." if len(value) > 5 else "")
        return f"an object with keys {keys}" if value else "an empty object"
    return {str: "a string", bool: "a boolean", type(None): "null", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def check_samples(samples: Sequence, path: Path) -> None:
    """Every sample is an object whose 'instruction' and 'output' are strings (and 'input', 'sys_prompt' strings or
    null), with no 'prompt' key (litgpt passes the sample's keys to the prompt style beside ``prompt=``)."""
    for position, sample in enumerate(samples):
        if (problem := sample_problem(sample)) is not None:
            where = (
                f"line {position + 1}"
                if path.suffix == ".jsonl"
                else f"the sample at position {position} (0-based{_line_of(path, position)})"
            )
            raise UserInputError(f"{path}: {where} {problem} Fix the data file.")


def sample_problem(sample) -> str | None:
    if not isinstance(sample, Mapping):
        return f"is {_describe(sample)}, not an object with 'instruction' and 'output'."
    for field in REQUIRED_TEXT_FIELDS:
        if field not in sample:
            return f"has no field {field!r}; every sample needs 'instruction' and 'output' (and may have 'input')."
        if not isinstance(sample[field], str):
            return f"has {field!r} = {_describe(sample[field])}, not a string (it would train on the text {str(sample[field])!r})."
    for field in OPTIONAL_TEXT_FIELDS:
        if sample.get(field) is not None and not isinstance(sample[field], str):
            return f"has {field!r} = {_describe(sample[field])}, not a string or null."
    if "prompt" in sample:
        return "has a field 'prompt', which clashes with the prompt litgpt builds from 'instruction': rename it."
    return None


def _line_of(path: Path, position: int) -> str:
    """', line N' where the sample at ``position`` of a JSON list starts (read again, only on the error path)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    for current in range(position + 1):
        while text[index] in " \t\r\n,":
            index += 1
        if current == position:
            return f", line {text.count(chr(10), 0, index) + 1}"
        _, index = decoder.raw_decode(text, index)
    return ""


def check_data_files(data) -> DataFiles | None:
    """Reads the files of litgpt's JSON data module as litgpt will, checks every sample, and returns where each
    split's samples sit in the user's files (None for any other data module: it loads its own data)."""
    files = split_files(data)
    if files is None:
        return None
    check_json_paths(Path(data.json_path), None if files["train"] != files["val"] else data.val_split_fraction)
    loaded = {}
    for file in dict.fromkeys(files.values()):
        loaded[file] = load_samples(file)
        check_samples(loaded[file], file)
    if files["train"] != files["val"]:
        return DataFiles(files, {name: list(range(len(loaded[file]))) for name, file in files.items()})
    positions = file_positions(data, count=len(loaded[files["train"]]))
    total = len(loaded[files["train"]])
    for name in ("train", "val"):
        if positions[name]:
            continue
        if total < 2:
            raise UserInputError(
                f"{files['train']} holds {total} sample(s): a train and a val split need at least 2. Add samples."
            )
        raise UserInputError(
            f"--data.val_split_fraction {data.val_split_fraction} of the {total} samples in {files['train']} leaves the"
            f" {name} split empty. Use a fraction that gives both splits a sample (at least {1 / total:.3g} and at most"
            f" {1 - 1 / total:.3g}), or add samples."
        )
    return DataFiles(files, positions)
