"""The command line: the flags of litgpt's own script for the method (``finetune_lora``, ``finetune_full``, ...) plus
``--seq.*`` and ``--resume``, checked before any class is built."""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from litgpt.finetune.full import setup as litgpt_finetune_full

from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.cli.mistakes import explain
from litgpt_seqlen.cli.optimizer_flags import optimizer_in_one_value
from litgpt_seqlen.data.files import check_json_paths
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods import COMMANDS, DEFAULT, Method
from litgpt_seqlen.ranks import launched_as_rank_zero

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
    """jsonargparse's parser, with the data paths checked before the data module is built from them, a mistake on the
    command line raised as a ``UserInputError`` of one paragraph (``mistakes.explain``) instead of usage text, and
    ``--optimizer NAME --optimizer.lr X`` read as litgpt's one value (``optimizer_flags``)."""

    def parse_args(self, args=None, *more, **kwargs):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_args(optimizer_in_one_value(self.given), *more, **kwargs)

    def error(self, message, ex=None):
        if not self.exit_on_error:  # a parser jsonargparse makes inside: it catches the error to try another type
            super().error(message, ex)
        try:
            paragraph = explain(self, message, getattr(self, "given", []))
        except Exception:  # a message of a shape explain does not know: jsonargparse's own words, in one paragraph
            paragraph = " ".join(message.split())
        raise UserInputError(paragraph) from None

    def instantiate_classes(self, cfg, *args, **kwargs):
        """The classes built. litgpt's JSON module defaulting --data.val_split_fraction is said in one ``warning: ...``
        line by rank 0, not in Python's ``<string>:10: UserWarning`` form on every rank; other warnings as before."""
        check_parsed(cfg)
        try:
            with warnings.catch_warnings(record=True) as caught:
                built = super().instantiate_classes(cfg, *args, **kwargs)
        except ValueError as problem:  # jsonargparse wraps what a class built from user input raised in a ValueError
            raise UserInputError(instantiation_error_message(problem)) from None
        for warning in caught:
            if "val_split_fraction" not in str(warning.message):  # any other: as Python would have shown it
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            elif launched_as_rank_zero():
                print(f"warning: {warning.message}", file=sys.stderr)
        return built


def use_flow_help(parser: ArgumentParser) -> None:
    """The help of the flags whose meaning this flow changed (``HELP``); every other text stays upstream's."""
    for action in parser._actions:
        if action.dest in HELP:
            action.help = HELP[action.dest]


def check_parsed(cfg) -> None:
    """Checks that would otherwise surface as exceptions inside jsonargparse's ``instantiate_classes``: the JSON data
    module's paths (``JSON.__post_init__``) and ``--train.lr_warmup_fraction`` (``TrainArgs.__post_init__``)."""
    data = cfg.get("data")
    if data is not None:
        init = data.get("init_args") or {}
        check_prompt_style(init.get("prompt_style"))
        if _is_json_module(data.get("class_path")):
            check_json_paths(Path(init.get("json_path")), init.get("val_split_fraction"))
    train = cfg.get("train")
    if train is not None and train.get("lr_warmup_fraction") is not None:
        raise UserInputError(
            f"--train.lr_warmup_fraction {train.get('lr_warmup_fraction')} is not supported here (nor by"
            " litgpt's fine-tuning scripts): give the warmup in optimizer steps with --train.lr_warmup_steps N (0 for no warmup)."
        )


def check_prompt_style(style) -> None:
    """A ``--data.prompt_style`` given by name must be one of litgpt's (its data modules look it up when built)."""
    from litgpt.prompts import prompt_styles

    if isinstance(style, str) and style not in prompt_styles:
        raise UserInputError(
            f"--data.prompt_style {style!r} is not a prompt style litgpt knows. Use one of: {', '.join(sorted(prompt_styles))}."
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


def build_parser(method: Method, description: str | None = None) -> FlowParser:
    """The command line: the method's upstream flags, defaults and help (read from litgpt's own ``setup`` for it), plus
    --seq.* and finetune_full's --resume. ``FlowParser`` checks the data paths before the data module is built."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # help text from the dataclasses' docstrings
    description = description or method.upstream.setup.__doc__.partition("\n")[0]
    parser = FlowParser(default_meta=False, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file (yaml).")
    upstream = method.upstream.setup
    parser.add_function_arguments(upstream, as_group=False, as_positional=True, sub_configs=True, skip={"resume"})
    parser.add_class_arguments(SeqArgs, "seq", sub_configs=True)
    not_resume = set(inspect.signature(litgpt_finetune_full).parameters) - {"resume"}
    parser.add_function_arguments(litgpt_finetune_full, as_group=False, skip=not_resume)  # --resume, as upstream's
    use_flow_help(parser)
    return parser


def split_command(args: list[str]) -> tuple[Method, list[str]]:
    """The method a command line names with litgpt's command word (``finetune_lora``, ``finetune_adapter``,
    ``finetune_adapter_v2``, ``finetune_full``, or ``finetune`` for LoRA, as litgpt's alias), and the rest of it.
    Without a command word: ``methods.DEFAULT``."""
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]], list(args[1:])
    return DEFAULT, list(args)
