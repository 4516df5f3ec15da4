"""``--optimizer`` in the forms litgpt's ``instantiate_torch_optimizer`` builds: a class name of ``torch.optim``
(``AdamW``) or a class path (``torch.optim.AdamW``), or a mapping of ``class_path`` and ``init_args`` (from a
``--config`` file, or one JSON value on the command line). Anything else stops litgpt after the model is built; here it
is refused before anything is read, naming the form that works."""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from collections.abc import Mapping

EXAMPLE = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.0002}}


def optimizer_problems(optimizer, quantize: str | None = None) -> list[str]:
    """What litgpt could not build from ``optimizer`` (one line per problem); under ``--quantize bnb.*`` an optimizer
    that is not AdamW, which litgpt refuses there."""
    if isinstance(optimizer, Mapping) and set(optimizer) - {"class_path", "init_args"}:
        return [settings_apart(optimizer)]
    if isinstance(optimizer, Mapping):
        class_path, init_args = optimizer.get("class_path"), optimizer.get("init_args")
        if not isinstance(class_path, str) or "." not in class_path or not isinstance(init_args, Mapping):
            return [
                f"--optimizer as a mapping needs class_path (module.Class) and init_args (a mapping, {{}} for the"
                f" defaults), got {json.dumps(optimizer, default=str)}; e.g. --optimizer '{json.dumps(EXAMPLE)}'."
            ]
    elif isinstance(optimizer, str):
        class_path, init_args = optimizer, {}
    else:
        return [f"--optimizer must be a class name or a mapping of class_path and init_args, got {optimizer!r}."]
    cls = _optimizer_class(class_path)
    if cls is None:
        return [unknown_optimizer(class_path)]
    problems = _init_args_problems(cls, class_path, init_args)
    if quantize and quantize.startswith("bnb.") and "AdamW" not in class_path:
        problems.append(
            f"--quantize {quantize} trains with bitsandbytes' PagedAdamW: --optimizer {class_path} cannot be used with it"
            " (litgpt's neither). Use --optimizer AdamW, or drop --quantize."
        )
    return problems


def settings_apart(optimizer: Mapping) -> str:
    """Settings jsonargparse read as a mapping apart from the class (``--optimizer.lr 0.01`` without ``--optimizer
    NAME`` on the command line), from which litgpt cannot build an optimizer, or ignores them beside a ``--config``
    file's ``class_path`` and ``init_args``."""
    apart = {key: value for key, value in optimizer.items() if key not in ("class_path", "init_args")}
    given = " ".join(f"--optimizer.{key} {value}" for key, value in apart.items())
    class_path = optimizer.get("class_path") or "AdamW"  # litgpt's default
    return (
        f"{given}: an optimizer setting needs its class on the command line too: --optimizer {class_path} {given}"
        " (litgpt would stop on it after the model is built, or ignore it beside a --config file's optimizer); or"
        " give the class and its settings together in a --config file, under optimizer: as class_path and init_args."
    )


def unknown_optimizer(class_path: str) -> str:
    import torch

    names = sorted(
        name
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    )
    lowered = {name.lower(): name for name in names}
    close = difflib.get_close_matches(class_path.rpartition(".")[2].lower(), list(lowered), n=1)
    hint = f" Did you mean {lowered[close[0]]}?" if close else ""
    return (
        f"--optimizer {class_path!r} is not an optimizer class litgpt can import.{hint} Use a class of torch.optim"
        f" ({', '.join(names)}) or a class path (module.Class)."
    )


def _init_args_problems(cls, class_path: str, init_args: Mapping) -> list[str]:
    """Settings the class does not take, and text where it takes a number (a JSON value in quotes)."""
    parameters = inspect.signature(cls).parameters
    any_name = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    problems = []
    for name, value in init_args.items():
        if name not in parameters and not any_name:
            close = difflib.get_close_matches(name, list(parameters), n=1)
            hint = f" Did you mean {close[0]}?" if close else f" It takes {', '.join(list(parameters)[1:])}."
            problems.append(f"--optimizer {class_path} has no setting {name!r}.{hint}")
            continue
        default = parameters[name].default if name in parameters else None
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            problems.append(f"--optimizer {class_path}'s {name} must be a number, got the text {value!r}.")
    return problems


def _optimizer_class(class_path: str):
    """The class ``class_path`` names, as litgpt resolves it (a bare name from ``torch.optim``), or None."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "torch.optim"), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None
