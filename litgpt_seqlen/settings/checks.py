"""Every setting that can never work, upstream's included, refused in one error before anything is read or built."""

from __future__ import annotations

import importlib.util
import tempfile
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import data_utils
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.settings.optimizer import optimizer_problems
from litgpt_seqlen.training.schedule import Steps, check_schedule

QUANTIZE_PRECISIONS = ("16-true", "bf16-true", "32-true")


def _problems_to_error(problems: Sequence[str]) -> None:
    if problems:
        raise UserInputError("\n".join(problems))


def check_settings(
    method,
    train,
    eval,
    seq,
    devices: int,
    num_nodes: int,
    quantize: str | None,
    precision: str | None,
    out_dir: Path | None = None,
    flags: Mapping | None = None,
) -> None:
    """All settings that can never work, upstream's included, in one ``UserInputError`` (one line per problem, each
    naming the flag and the fix). ``out_dir`` (when given) is created, as the run would create it, and tested for
    writing; of ``flags`` (the method's upstream flags, when given) the data module, logger_name and optimizer are
    checked too."""
    flags = flags or {}
    problems = [*_train_problems(train, devices, num_nodes), *_eval_problems(eval), *_seq_problems(seq, train)]
    problems += _data_module_problems(flags.get("data")) + _logger_problems(flags.get("logger_name"))
    problems += optimizer_problems(flags.get("optimizer", "AdamW"), quantize)
    problems += _hardware_problems(devices, num_nodes, quantize, precision)
    problems += _upstream_problems(method, train, eval)
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
        data_utils.check_settings(seq.headroom, train.max_seq_length, seq.over_length, seq.truncate_from)
        problems = []
    except data_utils.LengthError as problem:
        problems = [str(problem)]
    problems += _at_least("--seq.scan_workers", seq.scan_workers, 1, "CPU processes for the length scan", optional=True)
    margin = seq.memory_margin
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        problems.append(
            f"--seq.memory_margin must be a share of the device's memory, >= 0 and < 1 (0.1 keeps 10% free), got"
            f" {margin!r}."
        )
    if seq.pack and seq.group_by_length:
        problems.append(
            "--seq.pack true and --seq.group_by_length true exclude each other (packing already fills the rows);"
            " set one of them to false."
        )
    if seq.pack and seq.loss_weighting == "batch":
        problems.append(
            "--seq.pack true and --seq.loss_weighting batch exclude each other: packed rows train with token weighting"
            " (every supervised token of a step weighs the same). Drop --seq.loss_weighting (or set it to token), or"
            " set --seq.pack false."
        )
    return problems


def _data_module_problems(data) -> list[str]:
    """What the data module's loaders would refuse only after the data is read (litgpt's modules all have these)."""
    workers = getattr(data, "num_workers", None)
    if workers is None:
        return []
    return _at_least("--data.num_workers", workers, 0, "DataLoader worker processes, 0 to load in the main process")


# The packages Lightning's logger for each --logger_name needs (any one of them), as litgpt's choose_logger builds it.
LOGGER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "litlogger": ("litlogger",),
}


def _logger_problems(logger_name: str | None) -> list[str]:
    packages = LOGGER_PACKAGES.get(logger_name, ())
    if not packages or any(importlib.util.find_spec(package) is not None for package in packages):
        return []
    needs = " or ".join(packages)
    return [
        f"--logger_name {logger_name} needs the {needs} package, which is not installed: pip install {packages[0]},"
        " or use --logger_name csv."
    ]


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
    return tuple(dict.fromkeys(str(value) for value in flat))  # the same value can come from two literals


def _upstream_problems(method, train, eval) -> list[str]:
    """litgpt's own ``validate_args`` for the method (what its script does not support, what it requires), with its
    messages turned into flag names: its list of arguments stays litgpt's."""
    import re

    command = method.command
    try:
        method.upstream.validate_args(train, eval)
    except ValueError as problem:
        problems = []
        for line in str(problem).splitlines():
            named = re.search(r"(doesn't support|requires) the '(\w+)' argument", line)
            if named is None:
                if "epochs or max_steps" in line:
                    problems.append(f"{command} needs --train.epochs or --train.max_steps.")
                continue
            group = "train" if hasattr(train, named[2]) else "eval"
            if named[1] == "requires":
                problems.append(f"{command} needs --{group}.{named[2]}; it is unset.")
            else:
                problems.append(f"{command} does not support --{group}.{named[2]} (litgpt's neither): remove it.")
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


def check_run(train, eval, kept: Mapping[str, Sequence[int]], steps: Steps) -> list[dict]:
    """After the length plan (``kept``: the indices each split keeps), before any loader or model: the run takes an
    optimizer step, its warmup does not crash litgpt's scheduler (warnings for one that never peaks), and an integer
    --eval.evaluate_example names a sample. A dry run checks all of it too."""
    found = check_schedule(
        train.lr_warmup_steps,
        steps.total,
        micro_batches_per_epoch=steps.micro_batches_per_epoch,
        epochs=train.epochs,
        max_steps=train.max_steps,
        accumulation=steps.accumulation,
    )
    check_evaluate_example(eval.evaluate_example, len(kept["val"]), len(kept["train"]))
    return found
