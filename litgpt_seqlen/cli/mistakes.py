"""A mistake on the command line, said in one paragraph: the flag, the value given, what the flag takes, and the
closest real flag or value when it looks like a typo. The input is the message jsonargparse would print under its
usage text; what a flag takes is read from the parser's own type for it, not from that message."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import types
import typing
from pathlib import Path

from litgpt_seqlen.methods import COMMANDS

_WORDS = {int: "a whole number", float: "a number", str: "text", Path: "a path", dict: "a mapping"}


def explain(parser, message: str, given: list[str]) -> str:
    """The paragraph for jsonargparse's error ``message`` about the arguments ``given``."""
    if message.startswith("Unrecognized arguments:"):
        return unknown_arguments(parser, message.partition(":")[2].split(), given)
    in_config = re.search(r"Group '([\w.]+)' does not accept nested key '(\w+)'", message)  # from a --config file
    if in_config:
        return unknown_arguments(parser, [f"--{in_config[1]}.{in_config[2]}"], given)
    key = re.match(r'Parser key "([\w.]+)":', message)
    action = _action(parser, key[1]) if key else None
    if action is not None and _typehint(action) is not None:
        return bad_value(action, message, given)
    if action is not None:  # --config, or a group given one value (--seq abc): jsonargparse's reason is the point
        reason = next(line.strip() for line in message[key.end() :].splitlines() + [""] if line.strip())
        return f"--{key[1]} {_value(given, f'--{key[1]}', message)!r}: {reason.rstrip('.')}."
    missing = re.match(r"argument (--[\w.]+): expected one argument", message)
    if missing:  # argparse names --data for a --data.json_path given last without a value: name what was given
        flag = next((arg for arg in reversed(given) if arg.startswith(f"{missing[1]}.")), missing[1])
        return f"{flag} needs a value after it{_takes_in_brackets(_action(parser, flag[2:]))}."
    required = re.match(r'Validation failed: Key "(\w+)" is required', message)
    if required and _action(parser, required[1]) is not None:
        name = required[1]
        return f"{name} is missing{_takes_in_brackets(_action(parser, name))}: give it first, before the --flags."
    return " ".join(message.split())


def unknown_arguments(parser, tokens: list[str], given: list[str]) -> str:
    """One sentence per unknown flag (``--name value`` or ``--name=value``) with the closest real flag and what it
    takes, and one per stray argument."""
    flags = {flag.lower(): flag for action in parser._actions for flag in action.option_strings if flag[:2] == "--"}
    sentences = []
    for at, token in enumerate(tokens):
        if not token.startswith("--"):
            if at == 0 or not tokens[at - 1].startswith("--") or "=" in tokens[at - 1]:  # not a flag's value
                sentences.append(stray_argument(token, given))
            continue
        flag, _, value = token.partition("=")
        if not value and at + 1 < len(tokens) and not tokens[at + 1].startswith("--"):
            value = tokens[at + 1]
        close = difflib.get_close_matches(flag.lower(), list(flags), n=1, cutoff=0.75)
        if close:
            real = flags[close[0]]
            advice = f"Did you mean {real}{_takes_in_brackets(_action(parser, real[2:]))}?"
        else:
            advice = "--help lists every flag."
        sentences.append(f"{_given(flag, value)}: there is no flag {flag}. {advice}")
    return " ".join(sentences)


def stray_argument(token: str, given: list[str]) -> str:
    """An argument without a flag after the checkpoint directory: the first argument may be a mistyped command."""
    command = difflib.get_close_matches(given[0], list(COMMANDS), n=1) if given else []
    if command:
        return f"unexpected argument {token!r}: {given[0]!r} is not a command. Did you mean {command[0]}?"
    return f"unexpected argument {token!r}: the checkpoint directory is the only argument without a --flag."


def bad_value(action, message: str, given: list[str]) -> str:
    """A value the flag's type refuses; for a class flag (``--data``): an unknown class, or a setting of the class
    (``--data.json_path``) that is unknown, missing or of the wrong type."""
    flag = f"--{action.dest}"
    chosen = re.search(r"Problem with given class_path '([\w.]+)'", message)
    if not chosen:
        return must_be(flag, _typehint(action), _value(given, flag, message))
    cls = _resolve(chosen[1])
    unknown = re.search(r"Key '(\w+)' is not expected", message)
    if unknown:
        return unknown_setting(flag, _choices(_typehint(action)), cls, unknown[1], given, message)
    hints = typing.get_type_hints(cls.__init__)
    required = re.search(r'Key "(\w+)" is required', message)
    if required:
        needed = f"{flag}.{required[1]}"
        return f"{flag} {cls.__name__} needs {needed} ({takes_text(hints[required[1]])}), which was not given."
    setting = re.search(r'Parser key "(\w+)":', message[chosen.end() :])
    if setting:
        name = f"{flag}.{setting[1]}"
        return must_be(name, hints[setting[1]], _value(given, name, message))
    return " ".join(message.split())


def unknown_setting(flag: str, choices: list[str], cls, setting: str, given: list[str], message: str) -> str:
    """``--data.<setting>`` that the chosen class (``cls``) does not take, or given before any ``--data``."""
    name = f"{flag}.{setting}"
    as_given = _given(name, _value(given, name, message))
    owners = [f"{flag} {owner}" for owner in choices if _has_setting(cls, owner, setting)]
    owned = f"{name} is a setting of {' and '.join(owners)}" if owners else ""
    if cls.__name__ not in choices:  # no class chosen before it: jsonargparse tried the base class
        if owners:
            return f"{as_given}: give {flag} first ({owned})."
        return f"{as_given}: no {flag} choice has a setting {setting} ({flag}.help NAME lists the settings of one)."
    settings = [f"{flag}.{known}" for known in inspect.signature(cls).parameters]
    close = difflib.get_close_matches(name, settings, n=1, cutoff=0.75)
    if close:
        advice = f"Did you mean {close[0]}?"
    else:
        advice = f"It takes {', '.join(settings)}" + (f"; {owned}." if owned else ".")
    return f"{as_given}: {flag} {cls.__name__} has no setting {setting}. {advice}"


def must_be(flag: str, typehint, value: str | None) -> str:
    """``--flag must be <what it takes>, got 'value'.``, and the closest allowed value where it takes a few."""
    got = f", got {value!r}" if value is not None else ""
    choices = {choice.lower(): choice for choice in _choices(typehint)}
    close = difflib.get_close_matches((value or "").lower(), list(choices), n=1)
    hint = f" Did you mean {choices[close[0]]}?" if close else ""
    return f"{flag} must be {takes_text(typehint)}{got}.{hint}"


def takes_text(typehint) -> str:
    """What a value of ``typehint`` is, in words: ``a whole number or null``, ``one of truncate, drop, error``."""
    choices = _choices(typehint)
    if choices:
        return f"one of {', '.join(choices)}"
    words = [_WORDS.get(kind, getattr(kind, "__name__", str(kind))) for kind in _alternatives(typehint)]
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


def _alternatives(typehint) -> list:
    """The types and the values a type hint allows, unions and literals unpacked: a value as its text (None as
    "null", as the command line spells it), a class flag (``--data``) as the names of the classes it can be."""
    if typing.get_origin(typehint) in (typing.Union, types.UnionType):
        return [alternative for part in typing.get_args(typehint) for alternative in _alternatives(part)]
    if typing.get_origin(typehint) is typing.Literal:
        return [str(value).lower() if isinstance(value, bool) else str(value) for value in typing.get_args(typehint)]
    if typehint is bool:
        return ["true", "false"]
    if typehint is type(None):
        return ["null"]
    if inspect.isclass(typehint) and typehint not in _WORDS:  # the subclasses its package offers (--data JSON)
        offered = vars(importlib.import_module(typehint.__module__.rpartition(".")[0])).items()
        names = [name for name, cls in offered if inspect.isclass(cls) and issubclass(cls, typehint)]
        return [name for name in names if name != typehint.__name__] or [typehint.__name__]
    return [typehint]


def _choices(typehint) -> list[str]:
    """The allowed values when the type allows only values (a Literal, a bool, a class flag); else none."""
    alternatives = _alternatives(typehint)
    return alternatives if all(isinstance(alternative, str) for alternative in alternatives) else []


def _has_setting(cls, name: str, setting: str) -> bool:
    """Whether the class ``name`` of ``cls``'s package (another ``--data`` choice) takes ``setting``."""
    other = getattr(importlib.import_module(cls.__module__.rpartition(".")[0]), name, None)
    return inspect.isclass(other) and setting in inspect.signature(other).parameters


def _action(parser, dest: str):
    return next((action for action in parser._actions if action.dest == dest), None)


def _typehint(action):
    """The type jsonargparse checks the flag's value against (None for --config and the groups' own flags)."""
    return getattr(action, "_typehint", None)


def _takes_in_brackets(action) -> str:
    return f" ({takes_text(_typehint(action))})" if action is not None and _typehint(action) is not None else ""


def _given(flag: str, value: str | None) -> str:
    return f"{flag} {value}" if value else flag


def _value(given: list[str], flag: str, message: str) -> str | None:
    """The value the command line gave ``flag`` (the last one: it wins), else the one jsonargparse's message names."""
    spellings = (flag, flag.replace(".", ".init_args.", 1))
    for at in range(len(given) - 1, -1, -1):
        name, equals, value = given[at].partition("=")
        if name in spellings:
            if equals:
                return value
            return given[at + 1] if at + 1 < len(given) else None
    named = re.findall(r"(?:Given|Got) value: (.*)", message)
    return named[-1].strip() if named and not named[-1].startswith(("Namespace(", "NestedArg(")) else None


def _resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
