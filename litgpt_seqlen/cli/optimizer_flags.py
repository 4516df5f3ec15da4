"""``--optimizer SGD --optimizer.lr 0.01`` (or ``--optimizer.class_path torch.optim.SGD --optimizer.init_args.lr
0.01``) read as the one value a ``--config`` file gives: ``{"class_path": "torch.optim.SGD", "init_args": {"lr":
0.01}}``. jsonargparse alone would read the settings as a mapping without the class, from which litgpt cannot build
an optimizer."""

from __future__ import annotations

import json

import yaml

FLAG = "--optimizer"


def optimizer_in_one_value(args: list[str]) -> list[str]:
    """``args`` with the ``--optimizer`` flags, when they name the class (``--optimizer NAME`` or
    ``--optimizer.class_path``) and settings of it, as one ``--optimizer`` value (JSON) at the place of the first.
    Left as given: a class alone, settings without a class on the command line (it may come from a ``--config``
    file: the settings check then names the form that works), a class given as a mapping already."""
    split = _split(args)
    if split is None:
        return args
    rest, found, at = split
    classes = [value for name, value in found if name in (FLAG, f"{FLAG}.class_path")]
    settings = {
        name.rpartition(".")[2]: _typed(value)
        for name, value in found
        if name.count(".") and name != f"{FLAG}.class_path"
    }
    by_path = any(name == f"{FLAG}.class_path" for name, _ in found)
    if not classes or not (settings or by_path) or classes[-1].lstrip().startswith("{"):
        return args
    class_path = classes[-1] if "." in classes[-1] else f"torch.optim.{classes[-1]}"  # litgpt's rule for a bare name
    one_value = json.dumps({"class_path": class_path, "init_args": settings})
    # The name first: jsonargparse fails (AttributeError) on a mapping given over a --config file's mapping.
    return [*rest[:at], FLAG, class_path, FLAG, one_value, *rest[at:]]


def _split(args: list[str]) -> tuple[list[str], list[tuple[str, str]], int] | None:
    """The arguments other than ``--optimizer*``, those as (flag, value) pairs, and the place of the first; None
    when one has no value (jsonargparse says so)."""
    rest, found, at = [], [], None
    index = 0
    while index < len(args):
        name, equals, value = args[index].partition("=")
        if name == FLAG or name.startswith(f"{FLAG}."):
            if not equals and index + 1 == len(args):
                return None
            if not equals:
                value, index = args[index + 1], index + 1
            at = len(rest) if at is None else at
            found.append((name, value))
        else:
            rest.append(args[index])
        index += 1
    return rest, found, at


def _typed(value: str):
    """A setting's text as the value a config file would give: JSON first (``1e-4`` is a number there), then YAML."""
    try:
        return json.loads(value)
    except ValueError:
        return yaml.safe_load(value)
