"""Every bad setting and every bad data file stops with a clear ``UserInputError``, before anything is spent.

Three moments, each as early as what it needs allows:

- ``check_parsed(cfg)``: on the parsed CLI namespace, before jsonargparse builds the data module (litgpt's
  ``JSON.__post_init__`` raises on a missing ``json_path`` there, buried in a jsonargparse traceback).
- ``check_settings(...)`` and ``check_data_files(data)``: in ``setup``, before Fabric launches anything; the data
  files are read once, as litgpt will read them, and every sample is checked before a token is made.
- ``check_schedule(...)``: once the run's optimizer steps are known (after the length plan), before ``GPT(config)``.

Plus the outcome warnings (``outcome_warnings``): settings that run but train on little or nothing.
A sample is always named by its position in the user's file (``DataFiles.where``), also under
``--data.val_split_fraction``, whose random split is reproduced on indices (``file_positions``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import data_utils
from data_utils import UserInputError

REQUIRED_TEXT_FIELDS = ("instruction", "output")  # SFTDataset reads both of every sample
OPTIONAL_TEXT_FIELDS = ("input", "sys_prompt")  # passed to the prompt style; null means absent, as litgpt treats it
MAX_CUT_SHARE = 0.10  # above this share of a split dropped or truncated, the run warns
QUANTIZE_PRECISIONS = ("16-true", "bf16-true", "32-true")


def _problems_to_error(problems: Sequence[str]) -> None:
    if problems:
        raise UserInputError("\n".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# On the parsed namespace, before jsonargparse instantiates anything
# ---------------------------------------------------------------------------------------------------------------


def check_parsed(cfg) -> None:
    """Checks that would otherwise surface as exceptions inside jsonargparse's ``instantiate_classes``: the JSON data
    module's paths (``JSON.__post_init__``) and ``--train.lr_warmup_fraction`` (``TrainArgs.__post_init__``)."""
    data = cfg.get("data")
    if data is not None and _is_json_module(data.get("class_path")):
        init = data.get("init_args") or {}
        check_json_paths(Path(init.get("json_path")), init.get("val_split_fraction"))
    train = cfg.get("train")
    if train is not None and train.get("lr_warmup_fraction") is not None:
        raise UserInputError(
            f"--train.lr_warmup_fraction {train.get('lr_warmup_fraction')} is not supported by finetune_lora (nor by"
            " litgpt's): give the warmup in optimizer steps with --train.lr_warmup_steps N (0 for no warmup)."
        )


def _is_json_module(class_path) -> bool:
    if not isinstance(class_path, str):
        return False
    import importlib

    from litgpt.data import JSON

    module, _, name = class_path.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # jsonargparse itself reports an unknown class
        return False
    return isinstance(resolved, type) and issubclass(resolved, JSON)


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


def instantiation_error_message(problem: Exception) -> str:
    """The user's part of an exception jsonargparse raised while instantiating a class from the CLI: a Union's
    "Errors:" list without the "Expected a <class 'NoneType'>" line, or the message itself."""
    text = str(problem)
    if "Errors:" not in text:
        return text
    reasons = [
        line.strip()[2:]
        for line in text.partition("Errors:")[2].splitlines()
        if line.strip().startswith("- ") and "NoneType" not in line
    ]
    return "\n".join(reasons) or text


# ---------------------------------------------------------------------------------------------------------------
# Settings, in setup
# ---------------------------------------------------------------------------------------------------------------


def check_settings(
    train,
    eval,
    seq,
    devices: int,
    num_nodes: int,
    quantize: str | None,
    precision: str | None,
    out_dir: Path | None = None,
) -> None:
    """All settings that can never work, upstream's included, in one ``UserInputError`` (one line per problem, each
    naming the flag and the fix). ``out_dir`` (when given) is created, as the run would create it, and tested for writing."""
    problems = [*_train_problems(train, devices, num_nodes), *_eval_problems(eval), *_seq_problems(seq, train)]
    problems += _hardware_problems(devices, num_nodes, quantize, precision)
    problems += _upstream_problems(train, eval)
    _problems_to_error(problems)
    if out_dir is not None:
        check_out_dir(Path(out_dir))


def _at_least(flag: str, value, minimum: int, meaning: str, optional: bool = False) -> list[str]:
    if value is None and optional:
        return []
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        unset = " (or leave it unset)" if optional else ""
        return [f"{flag} must be a whole number >= {minimum}{unset}: {meaning}; got {value!r}."]
    return []


def _train_problems(train, devices: int, num_nodes: int) -> list[str]:
    problems = _at_least(
        "--train.micro_batch_size", train.micro_batch_size, 1, "the samples per device in one forward pass"
    )
    problems += _at_least(
        "--train.global_batch_size", train.global_batch_size, 1, "the samples of one optimizer step over all devices"
    )
    problems += _at_least("--train.log_interval", train.log_interval, 1, "micro-batches between progress lines")
    problems += _at_least(
        "--train.save_interval", train.save_interval, 1, "optimizer steps between checkpoints", optional=True
    )
    problems += _at_least("--train.epochs", train.epochs, 1, "passes over the train split", optional=True)
    problems += _at_least("--train.max_steps", train.max_steps, 1, "a limit on optimizer steps", optional=True)
    problems += _at_least(
        "--train.lr_warmup_steps",
        train.lr_warmup_steps,
        0,
        "optimizer steps of linear warmup, 0 for none",
        optional=True,
    )
    if train.max_time is not None and not train.max_time > 0:
        problems.append(
            f"--train.max_time must be a number of seconds > 0 (or leave it unset), got {train.max_time!r}."
        )
    if not problems and devices * num_nodes >= 1:
        problems += _batch_size_problems(train.global_batch_size, train.micro_batch_size, devices * num_nodes)
    return problems


def _batch_size_problems(global_batch_size: int, micro_batch_size: int, ranks: int) -> list[str]:
    """litgpt takes global // ranks samples per rank and (that) // micro_batch_size micro-batches per step, asserting
    both are > 0 and silently rounding down the rest: here the global batch must be exactly what a step sees."""
    unit = micro_batch_size * ranks
    if global_batch_size % unit == 0:
        return []
    lower, upper = (global_batch_size // unit) * unit, (global_batch_size // unit + 1) * unit
    on = (
        f"{ranks} devices × --train.micro_batch_size {micro_batch_size}"
        if ranks > 1
        else f"--train.micro_batch_size {micro_batch_size}"
    )
    if lower == 0:
        return [
            f"--train.global_batch_size {global_batch_size} is smaller than one micro-batch on every device ({on} = {unit}):"
            f" raise it to {unit} (or a multiple), or lower --train.micro_batch_size."
        ]
    return [
        f"--train.global_batch_size {global_batch_size} is not a multiple of {on} = {unit}; a step would take"
        f" {lower} samples, not {global_batch_size}. Use {lower} or {upper}, or change --train.micro_batch_size."
    ]


def _eval_problems(eval) -> list[str]:
    problems = _at_least("--eval.interval", eval.interval, 1, "optimizer steps between validations")
    problems += _at_least("--eval.max_iters", eval.max_iters, 1, "val micro-batches per periodic validation")
    problems += _at_least(
        "--eval.max_new_tokens", eval.max_new_tokens, 0, "tokens generated for the example", optional=True
    )
    example = eval.evaluate_example
    if isinstance(example, str) and example not in ("first", "random"):
        problems.append(f"--eval.evaluate_example must be 'first', 'random' or a sample index, got {example!r}.")
    return problems


def _seq_problems(seq, train) -> list[str]:
    try:
        data_utils.check_settings(
            seq.headroom, train.max_seq_length, seq.over_length, getattr(seq, "truncate_from", "prompt")
        )
        problems = []
    except UserInputError as problem:
        problems = [str(problem)]
    problems += _at_least("--seq.scan_workers", seq.scan_workers, 1, "CPU processes for the length scan", optional=True)
    if getattr(seq, "pack", False) and seq.group_by_length:
        problems.append(
            "--seq.pack true and --seq.group_by_length true exclude each other (packing already fills the rows);"
            " set one of them to false."
        )
    return problems


def _hardware_problems(devices: int, num_nodes: int, quantize: str | None, precision: str | None) -> list[str]:
    problems = []
    if not isinstance(num_nodes, int) or num_nodes < 1:
        problems.append(f"--num_nodes must be at least 1, got {num_nodes!r}.")
    if not isinstance(devices, int) or devices < 1:
        problems.append(f"--devices must be at least 1 (or 'auto'), got {devices!r}.")
    known = _known_precisions()
    if precision is not None and known and precision not in known:
        problems.append(f"--precision {precision!r} is not one Lightning knows: use one of {', '.join(known)}.")
    if quantize is not None and quantize.startswith("bnb."):
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"--quantize {quantize} needs the bitsandbytes package, which is not installed: pip install bitsandbytes (a CUDA GPU is needed), or drop --quantize."
            )
        if precision is not None and precision not in QUANTIZE_PRECISIONS:
            problems.append(
                f"--quantize {quantize} needs a '-true' --precision ({', '.join(QUANTIZE_PRECISIONS)}), got {precision!r}."
            )
        if isinstance(devices, int) and isinstance(num_nodes, int) and devices * num_nodes > 1:
            problems.append(
                f"--quantize {quantize} works on a single device only: set --devices 1 --num_nodes 1, or drop --quantize."
            )
    return problems


def _known_precisions() -> tuple[str, ...]:
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # a private name: without it, Fabric checks the value itself
        return ()
    flat: list = []
    for part in typing.get_args(_PRECISION_INPUT):
        flat.extend(typing.get_args(part) or [part])
    return tuple(str(value) for value in flat)


def _upstream_problems(train, eval) -> list[str]:
    """litgpt's own ``validate_args`` (what finetune_lora does not support, what it requires), with its messages
    turned into flag names: its list of arguments stays litgpt's."""
    import re

    from litgpt.finetune.lora import validate_args

    try:
        validate_args(train, eval)
    except ValueError as problem:
        problems = []
        for line in str(problem).splitlines():
            named = re.search(r"(doesn't support|requires) the '(\w+)' argument", line)
            if named is None:
                if "epochs or max_steps" in line:
                    problems.append("finetune_lora needs --train.epochs or --train.max_steps.")
                continue
            group = "train" if hasattr(train, named[2]) else "eval"
            if named[1] == "requires":
                problems.append(f"finetune_lora needs --{group}.{named[2]}; it is unset.")
            else:
                problems.append(f"finetune_lora does not support --{group}.{named[2]} (litgpt's neither): remove it.")
        return problems or [str(problem)]
    return []


def check_out_dir(out_dir: Path) -> None:
    """Creates ``out_dir`` (and its parents) and checks that a file can be written there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except FileExistsError:
        raise UserInputError(
            f"--out_dir {str(out_dir)!r} is a file, not a directory: choose another --out_dir."
        ) from None
    except NotADirectoryError:
        blocking = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
        raise UserInputError(
            f"--out_dir {str(out_dir)!r} cannot be created: {str(blocking) if blocking else 'a part of it'!r} is a file."
            " Choose another --out_dir."
        ) from None
    except PermissionError:
        raise UserInputError(
            f"--out_dir {str(out_dir)!r} cannot be created or written (permission denied): choose another --out_dir."
        ) from None
    except OSError as problem:
        raise UserInputError(
            f"--out_dir {str(out_dir)!r} cannot be created or written ({problem.strerror}): choose another --out_dir."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# The schedule: once the run's step count is known, before GPT(config)
# ---------------------------------------------------------------------------------------------------------------


def planned_steps(
    train_samples: int,
    micro_batch_size: int,
    ranks: int,
    accumulation: int,
    epochs: int | None,
    max_steps: int | None,
    group_by_length: bool = False,
) -> tuple[int, int]:
    """(optimizer steps per epoch, the run's optimizer steps) as the flow computes them from ``len(train_loader)``:
    a DistributedSampler gives each rank ceil(samples / ranks) samples; the grouped sampler gives each rank
    ceil(ceil(samples / micro_batch_size) / ranks) micro-batches. Usable in a dry run, before any loader exists."""
    if group_by_length:
        batches_per_rank = math.ceil(math.ceil(train_samples / micro_batch_size) / ranks)
    else:
        batches_per_rank = math.ceil(math.ceil(train_samples / ranks) / micro_batch_size)
    per_epoch = batches_per_rank // accumulation
    total = per_epoch * epochs if epochs else math.inf
    if max_steps:
        total = min(total, max_steps)
    return per_epoch, int(total)


def check_schedule(
    warmup_steps: int | None,
    lr_max_steps: int,
    *,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    accumulation: int | None = None,
) -> list[dict]:
    """The run must take at least one optimizer step, and must not warm up for exactly as many steps as it takes.

    litgpt's ``get_lr_scheduler`` divides by zero when ``warmup_steps`` equals the run's steps (its cosine phase has
    ``T_max = max_steps - warmup_steps = 0``): refused. Above, the run ends still warming up (it never reaches
    --optimizer's learning rate and never decays): litgpt runs it (its own LoRA test does, with the default 100 steps
    of warmup over 6 steps), so it stays allowed, with a warning, returned as ``outcome_warnings`` returns them.
    0 (or None) means no warmup: see ``lr_schedule``."""
    how = _steps_explained(lr_max_steps, steps_per_epoch, epochs, max_steps)
    if lr_max_steps < 1:
        per_step = f" (one step takes {accumulation} micro-batches per device)" if accumulation else ""
        raise UserInputError(
            f"the run would take no optimizer step{how}: the train split is smaller than one global batch{per_step}."
            " Lower --train.global_batch_size, or add train samples."
        )
    if not warmup_steps or warmup_steps < lr_max_steps:
        return []
    example = f" (e.g. {lr_max_steps // 10})" if lr_max_steps >= 10 else ""  # a suggestion that is itself below
    fix = (
        f"Set --train.lr_warmup_steps below {lr_max_steps}{example}, or 0 for no warmup;"
        " or train longer (--train.epochs, --train.max_steps)."
    )
    if warmup_steps == lr_max_steps:
        raise UserInputError(
            f"--train.lr_warmup_steps {warmup_steps} equals the run's {lr_max_steps} optimizer steps{how}: litgpt's"
            f" scheduler divides by zero at the last step (its cosine phase would last 0 steps). {fix}"
        )
    return [
        {
            "kind": "warmup_beyond_run",
            "lr_warmup_steps": warmup_steps,
            "optimizer_steps": lr_max_steps,
            "message": f"--train.lr_warmup_steps {warmup_steps} is above the run's {lr_max_steps} optimizer steps{how}:"
            f" the learning rate never finishes warming up (its last step uses {(lr_max_steps - 1) / warmup_steps:.0%}"
            f" of --optimizer's lr) and never decays. {fix}",
        }
    ]


def check_run(
    train,
    eval,
    kept: Mapping[str, Sequence[int]],
    ranks: int,
    group_by_length: bool,
    packed_micro_batches: int | None = None,
) -> list[dict]:
    """After the length plan (``kept``: the indices each split keeps), before any loader or model: the run takes an
    optimizer step, its warmup does not crash litgpt's scheduler (warnings for one that never peaks), and an integer
    --eval.evaluate_example names a sample. A dry run checks all of it too. Under --seq.pack the train loader's length
    is the packed plan's, given as ``packed_micro_batches`` (this rank's, in the first epoch)."""
    accumulation = train.gradient_accumulation_iters(ranks, 1)
    steps_per_epoch, total = planned_steps(
        len(kept["train"]), train.micro_batch_size, ranks, accumulation, train.epochs, train.max_steps, group_by_length
    )
    if packed_micro_batches is not None:
        steps_per_epoch = packed_micro_batches // accumulation
        total = steps_per_epoch * train.epochs if train.epochs else math.inf
        total = int(min(total, train.max_steps or math.inf))
    found = check_schedule(
        train.lr_warmup_steps,
        total,
        steps_per_epoch=steps_per_epoch,
        epochs=train.epochs,
        max_steps=train.max_steps,
        accumulation=accumulation,
    )
    check_evaluate_example(eval.evaluate_example, len(kept["val"]), len(kept["train"]))
    return found


def _steps_explained(total: int, steps_per_epoch: int | None, epochs: int | None, max_steps: int | None) -> str:
    if max_steps and total == max_steps:
        return f" (--train.max_steps {max_steps})"
    if steps_per_epoch is not None and epochs:
        return f" ({epochs} epochs × {steps_per_epoch} steps per epoch)"
    return ""


def check_evaluate_example(evaluate_example, val_count: int, train_count: int) -> None:
    """An integer --eval.evaluate_example must name a sample: litgpt looks in val, then in train, and raises
    IndexError at the first validation otherwise (negative indices count from the end of val)."""
    if not isinstance(evaluate_example, int) or isinstance(evaluate_example, bool):
        return
    if -val_count <= evaluate_example < max(val_count, train_count):
        return
    raise UserInputError(
        f"--eval.evaluate_example {evaluate_example} names no sample: the val split has {val_count} and the train split"
        f" {train_count}. Use an index below {max(val_count, train_count)}, or 'first' / 'random'."
    )


# ---------------------------------------------------------------------------------------------------------------
# Data files (litgpt's JSON module), before tokenizing
# ---------------------------------------------------------------------------------------------------------------


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
        return "has a field 'prompt', which clashes with the prompt litgpt builds from 'instruction'. Rename it."
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


# ---------------------------------------------------------------------------------------------------------------
# Outcomes that run but train on little or nothing: warnings
# ---------------------------------------------------------------------------------------------------------------


def min_prompt_length(prompt_style, tokenizer) -> int:
    """Tokens of the prompt template alone: the style applied to an empty instruction (and no input), encoded as
    SFTDataset encodes a prompt (with BOS when the tokenizer adds one)."""
    return len(tokenizer.encode(prompt_style.apply(prompt="", input="")))


def outcome_warnings(
    lengths: Mapping[str, Sequence[int]],
    decision: data_utils.Decision,
    over_length: str,
    template_length: int,
    unsupervised: Mapping[str, Sequence[int]] | None = None,
    where=None,
    max_cut_share: float = MAX_CUT_SHARE,
) -> list[dict]:
    """Warnings for a run that would train on little or nothing, as dicts for ``seq_lengths.json`` (``kind``,
    ``message`` and the figures); ``warning_lines`` prints them.

    - ``cut_share``: more than ``max_cut_share`` of a split dropped (drop) or truncated (truncate);
    - ``shorter_than_template``: max_seq_length leaves no room for a response after the prompt template;
    - ``no_supervised_token``: the samples of ``unsupervised`` (per split, the indices the cut left with no token to
      learn from, which the plan leaves out), named.

    ``where(split, index)`` (e.g. ``DataFiles.where``) names a sample in the user's file.
    """
    limit = decision.max_seq_length
    found = []
    if over_length in ("truncate", "drop"):
        for split, split_lengths in lengths.items():
            over = data_utils.over_limit(split_lengths, limit)
            if split_lengths and len(over) / len(split_lengths) > max_cut_share:
                found.append(_cut_share_warning(split, len(over), len(split_lengths), over_length, decision))
    if limit <= template_length:
        found.append(
            {
                "kind": "shorter_than_template",
                "max_seq_length": limit,
                "template_length": template_length,
                "message": f"max_seq_length {limit} leaves no room for a response: the prompt template alone takes"
                f" {template_length} tokens (--data.prompt_style), so every sample is cut inside its prompt. Raise --train.max_seq_length.",
            }
        )
    for split, indices in (unsupervised or {}).items():
        if indices:
            found.append(_no_supervised_warning(split, sorted(indices), len(lengths[split]), limit, where))
    return found


def _cut_share_warning(split: str, count: int, total: int, over_length: str, decision: data_utils.Decision) -> dict:
    verb = "leaves out" if over_length == "drop" else "truncates"
    if decision.source == "override" and not decision.capped:
        fix = f"Raise --train.max_seq_length (up to block_size {decision.block_size}); the what-if table shows what each length costs."
    else:
        fix = (
            f"They are longer than the model's block_size {decision.block_size}: only shorter samples or a model with a"
            " longer context can keep them."
        )
    return {
        "kind": "cut_share",
        "split": split,
        "count": count,
        "of": total,
        "share": round(count / total, 4),
        "over_length": over_length,
        "message": f"--seq.over_length {over_length} {verb} {count} of {total} {split} samples ({count / total:.0%}), longer than"
        f" max_seq_length {decision.max_seq_length}. {fix}",
    }


def _no_supervised_warning(split: str, indices: list[int], total: int, limit: int, where) -> dict:
    named = ", ".join(f"{split}[{i}]" + (f" ({where(split, i)})" if where else "") for i in indices[:3])
    more = f" and {len(indices) - 3} more" if len(indices) > 3 else ""
    return {
        "kind": "no_supervised_token",
        "split": split,
        "count": len(indices),
        "of": total,
        "indices": indices,
        "message": f"{len(indices)} of {total} {split} samples have no token to learn from once cut to max_seq_length"
        f" {limit}, so they are left out (listed in dropped_samples.jsonl): {named}{more}. Raise --train.max_seq_length,"
        " or shorten these samples.",
    }


def warning_lines(warnings: Sequence[dict]) -> list[str]:
    return [f"warning: {w['message']}" for w in warnings]


def plan_warnings(plan, data, tokenizer, over_length: str, where=None) -> list[dict]:
    """``outcome_warnings`` for a ``seq_data.LengthPlan``: the template length from the data module's prompt style
    (other data modules, without one, skip that check) and the samples the plan left out for want of a target."""
    prompt_style = getattr(data, "prompt_style", None)
    template = min_prompt_length(prompt_style, tokenizer) if prompt_style is not None else 0
    unsupervised = {
        split: [i for i, reason in reasons.items() if reason == "unsupervised"]
        for split, reasons in plan.dropped.items()
    }
    return outcome_warnings(plan.lengths, plan.decision, over_length, template, unsupervised, where=where)
